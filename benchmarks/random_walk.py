"""AffinityNet random walk (psa): the sparse walk against psa's dense matrix power.

Both methods compute the same thing, out[c] = T^t cams[c] with T = D⁻¹ A^β (β = 8, t = 256,
radius 5: 69 offsets, C = 3 maps) on the stride-8 grid of a square image (256² ... 1024²
pixels: 32² ... 128² positions). ``sparse`` applies the CSR T 256 times to the (N, C) maps;
``dense`` (the baseline, psa's way) builds the N x N T and squares it 8 times.

Each (size, method) runs in a fresh subprocess, with 1 torch thread: its peak memory is the
peak resident set (VmHWM, reset through /proc/self/clear_refs after the inputs exist; else
ru_maxrss) minus the resident set after the inputs (cams, affinities) were allocated, with
glibc's mmap threshold pinned to 128 KiB (``mallopt``) so that every larger block goes back
to the system when freed and the resident set follows the live allocations. A dense case whose
N x N matrices would exceed MEM_CAP, or whose time, extrapolated as N³ from the largest dense
case measured in this run, would exceed TIME_CAP, is not run: its bytes are computed (2 N²
floats: T^(2^k) and its square) and its seconds estimated, and the table says so. Every dense
run checks its output against the sparse walk on the same inputs, and the parent checks both
against the plain loop reference at a small size first, so a broken path cannot post a number.

    python benchmarks/random_walk.py [--quick] [--out FILE]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from common import parse_args, print_table, timeit, write_results

ROOT = Path(__file__).resolve().parent.parent
RADIUS, BETA, STEPS, MAPS, STRIDE = 5, 8.0, 256, 3, 8
MEM_CAP = 6 * 2**30  # bytes of dense N x N matrices we are willing to allocate
TIME_CAP = 90.0  # seconds one dense walk may take (estimated before running it)
GOAL_MEM = 10.0  # at 1024²: sparse peak >= 10x below dense


def _mmap_threshold(nbytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``; False where that is not available."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_inputs(side: int, seed: int = 0):
    """cams (MAPS, side, side) in [0, 1] and AffinityNet-like symmetric affinities
    a_ij = exp(−mean_c |f_i − f_j|) (69, side, side) from random smooth features."""
    import torch
    import torch.nn.functional as F

    from mcis_dist.affinity.random_walk import neighbour_offsets

    gen = torch.Generator().manual_seed(seed)
    offs = neighbour_offsets(RADIUS)
    pad = RADIUS - 1
    feat = torch.rand(1, 8, side // 4 + 2, side // 4 + 2, generator=gen)
    feat = F.interpolate(feat, size=(side + 2 * pad,) * 2, mode="bilinear")[0] * 4  # (8, S, S)
    centre = feat[:, pad : pad + side, pad : pad + side]
    aff = torch.empty(len(offs), side, side)
    for k, (dy, dx) in enumerate(offs):
        there = feat[:, pad + dy : pad + dy + side, pad + dx : pad + dx + side]
        aff[k] = torch.exp(-(centre - there).abs().mean(0))
    cams = torch.rand(MAPS, side, side, generator=gen)
    return cams, aff, offs


def worker(method: str, side: int, repeat: int) -> dict:
    """One case in this process: peak extra memory of the first walk, then timings."""
    import torch

    from mcis_dist.affinity.random_walk import random_walk

    torch.set_num_threads(1)
    tiny = make_inputs(8)
    random_walk(*tiny, beta=BETA, steps=4, method=method)  # warm up the code paths
    pinned = _mmap_threshold(128 * 1024)
    cams, aff, offs = make_inputs(side)
    base = _rss_bytes()
    reset = _reset_peak()

    def walk():
        return random_walk(cams, aff, offs, beta=BETA, steps=STEPS, method=method)

    first = timeit(walk, repeat=1)
    peak = _peak_bytes(reset) - base
    out = first.result
    if pinned:
        _mmap_threshold(32 * 2**20)
    runs = first.runs + (timeit(walk, repeat=repeat - 1).runs if repeat > 1 else [])
    err = 0.0
    if method == "dense":  # the same inputs through the sparse walk
        sparse = random_walk(cams, aff, offs, beta=BETA, steps=STEPS, method="sparse")
        err = (out - sparse).abs().max().item()
    if not torch.isfinite(out).all():
        raise SystemExit(f"{method} at {side}²: non-finite output")
    return {
        "peak_mb": peak / 2**20,
        "seconds": min(runs),
        "max_abs_err_vs_sparse": err,
        "peak_source": "VmHWM" if reset else "ru_maxrss",
        "mmap_pinned": pinned,
    }


def check_small() -> float:
    """Both methods against the plain loop reference (float64, 12 x 11 grid, t = 100)."""
    import torch

    from mcis_dist.affinity.random_walk import random_walk, random_walk_dense_reference

    cams, aff, offs = make_inputs(12, seed=1)
    cams, aff = cams[:, :, :11].double(), aff[:, :, :11].double()
    ref = random_walk_dense_reference(cams, aff, offs, beta=BETA, steps=100)
    worst = 0.0
    for method in ("sparse", "dense"):
        got = random_walk(cams, aff, offs, beta=BETA, steps=100, method=method)
        worst = max(worst, (got - ref).abs().max().item())
    if worst > 1e-10 or not torch.isfinite(ref).all():
        raise SystemExit(f"random walk differs from the loop reference: {worst:.3g}")
    return worst


def run_case(method: str, side: int, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(side), str(repeat)]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = parse_args("random_walk", "sparse random walk against the dense matrix power")
    sys.path.insert(0, str(ROOT))
    from mcis_dist.affinity.random_walk import dense_bytes, neighbour_offsets, sparse_nnz

    images = [256, 512] if args.quick else [256, 512, 768, 1024]
    exact = check_small()
    print(f"exactness vs the loop reference (float64, 12x11, t=100): max abs err {exact:.2e}")
    offs = neighbour_offsets(RADIUS)
    metrics: dict = {
        "small_check_max_abs_err": exact,
        "radius": RADIUS,
        "beta": BETA,
        "steps": STEPS,
        "maps": MAPS,
        "offsets": len(offs),
        "torch_threads": 1,
        "mem_cap_bytes": MEM_CAP,
        "time_cap_s": TIME_CAP,
    }
    rows, ratios = [], {}
    dense_ref: tuple[int, float] | None = None  # (positions, seconds) of the largest dense run
    for image in images:
        side = image // STRIDE
        n = side * side
        case = f"{image}x{image}"
        sparse = run_case("sparse", side, 3)
        sparse["nnz"] = sparse_nnz(side, side, offs)
        sparse["source"] = "measured"
        metrics[f"{case}_sparse"] = sparse
        dense_mem = dense_bytes(n)
        est = dense_ref[1] * (n / dense_ref[0]) ** 3 if dense_ref else 0.0
        if dense_mem > MEM_CAP or est > TIME_CAP:
            why = "memory cap" if dense_mem > MEM_CAP else "time cap"
            dense = {
                "peak_mb": dense_mem / 2**20,
                "seconds": est,
                "source": f"computed ({why}: not run)",
            }
        else:
            dense = run_case("dense", side, 1 if args.quick or n >= 64 * 64 else 2)
            dense["source"] = "measured"
            dense["computed_mb"] = dense_mem / 2**20
            dense_ref = (n, dense["seconds"])
            if dense["max_abs_err_vs_sparse"] > 1e-4:
                raise SystemExit(f"dense and sparse differ at {case}: {dense}")
        metrics[f"{case}_dense"] = dense
        for m, r in (("sparse", sparse), ("dense", dense)):
            rows.append(
                {
                    "image": case,
                    "positions": n,
                    "method": m,
                    "peak_mb": r["peak_mb"],
                    "computed_mb": dense_mem / 2**20 if m == "dense" else "-",
                    "seconds": r["seconds"],
                    "source": r["source"],
                }
            )
        ratios[f"{case}_mem_dense_over_sparse"] = dense["peak_mb"] / sparse["peak_mb"]
        ratios[f"{case}_time_dense_over_sparse"] = dense["seconds"] / sparse["seconds"]
    first, last = (metrics[f"{i}x{i}_sparse"] for i in (images[0], images[-1]))
    growth_pos = (images[-1] / images[0]) ** 2
    ratios["sparse_mem_growth_over_positions_growth"] = (
        last["peak_mb"] / first["peak_mb"] / growth_pos
    )
    ratios["sparse_time_growth_over_positions_growth"] = (
        last["seconds"] / first["seconds"] / growth_pos
    )
    print_table(
        rows,
        ["image", "positions", "method", "peak_mb", "computed_mb", "seconds", "source"],
        title=f"random walk, radius {RADIUS}, beta {BETA}, t {STEPS}, C {MAPS}, 1 thread: "
        "peak memory beyond inputs (MiB; computed_mb: 2 N² floats), best seconds",
    )
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    key = f"{images[-1]}x{images[-1]}_mem_dense_over_sparse"
    lin = ratios["sparse_mem_growth_over_positions_growth"]
    met = ratios[key] >= GOAL_MEM and lin <= 1.5
    print(
        f"goal: sparse memory linear in positions (growth ratio {lin:.2f}, want <= 1.5) and "
        f">= {GOAL_MEM}x below dense at {images[-1]}² ({ratios[key]:.1f}x): "
        f"{'met' if met else 'NOT met'}"
    )
    write_results(args.out, "random_walk", metrics, ratios)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, side, repeat = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(worker(method, side, repeat)))
    else:
        main()
