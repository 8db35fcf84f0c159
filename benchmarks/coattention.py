"""Co-attention (MCIS Eq. 2-4): memory-efficient ``coattention`` against the dense reference.

Each (case, method) runs forward + backward in a fresh subprocess, so that peak memory is the
process's own: on the CPU the peak resident set (``ru_maxrss``) of the first forward+backward
minus the resident set after the inputs (features, W_P, output gradients) were allocated, with
glibc's mmap threshold pinned to 128 KiB for that run (``mallopt``) so that every larger
block is returned to the system when freed and the resident set follows the live allocations
(otherwise freed heap memory stays resident and inflates whichever method frees more small
blocks); on CUDA ``max_memory_allocated`` minus the allocated bytes after the inputs. The
timed runs that follow use a 32 MiB threshold (glibc's own dynamic maximum). The baseline is
the dense reference (``coattention_dense``: the whole (B, HW, HW) affinity, as the authors'
code). Every efficient run checks its outputs against the dense reference on the first pair,
and the parent checks values and gradients of every method at a small size first, so a broken
path cannot post a fast number.

    python benchmarks/coattention.py [--quick] [--out FILE]
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
METHODS = ("dense", "chunked", "sdpa")
GOAL_MEM, GOAL_TIME = 5.0, 1.3  # at 56x56, C=512: >= 5x less memory, <= 1.3x the time


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


def worker(method: str, side: int, channels: int, batch: int, repeat: int) -> dict:
    """One case in this process: peak extra memory of the first fwd+bwd, then timings."""
    import torch

    from mcis_dist.models.coattention import coattention, coattention_dense

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def make(c, s, b):
        gen = torch.Generator(device="cpu").manual_seed(0)
        fm = torch.rand(b, c, s, s, generator=gen).to(dev).requires_grad_()  # ReLU-like
        fn = torch.rand(b, c, s, s, generator=gen).to(dev).requires_grad_()
        w_p = (torch.randn(c, c, generator=gen) / c).to(dev).requires_grad_()
        grads = [torch.randn(b, c, s, s, generator=gen).to(dev) for _ in range(2)]
        return fm, fn, w_p, grads

    def step(fm, fn, w_p, grads):
        for t in (fm, fn, w_p):
            t.grad = None
        if method == "dense":
            outs = coattention_dense(fm, fn, w_p)
        else:
            outs = coattention(fm, fn, w_p, backend=method)
        torch.autograd.backward(outs, grads)
        sync()
        return outs

    step(*make(16, 4, 2))  # warm up threads, BLAS and the allocator on a tiny case
    pinned = not cuda and _mmap_threshold(128 * 1024)
    fm, fn, w_p, grads = make(channels, side, batch)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    first = timeit(lambda: step(fm, fn, w_p, grads), repeat=1)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    outs = [o.detach()[:1] for o in first.result]
    if pinned:
        _mmap_threshold(32 * 2**20)
    runs = first.runs + (
        timeit(lambda: step(fm, fn, w_p, grads), repeat=repeat - 1).runs if repeat > 1 else []
    )
    err = 0.0
    if method != "dense":
        with torch.no_grad():
            ref = coattention_dense(fm[:1], fn[:1], w_p)
        err = max((a - b).abs().max().item() for a, b in zip(outs, ref, strict=True))
    return {
        "peak_mb": peak / 2**20,
        "seconds": min(runs),
        "max_abs_err": err,
        "rss_exact": pinned or cuda,
    }


def check_small() -> float:
    """Values and gradients of every method against the dense reference at a small size."""
    import torch

    from mcis_dist.models.coattention import coattention, coattention_dense

    gen = torch.Generator().manual_seed(1)
    fm = torch.rand(2, 32, 7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = torch.rand(2, 32, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w_p = (torch.randn(32, 32, generator=gen, dtype=torch.float64) / 4).requires_grad_()
    grads = [
        torch.randn(2, 32, 6, 5, generator=gen, dtype=torch.float64),
        torch.randn(2, 32, 7, 9, generator=gen, dtype=torch.float64),
    ]

    def run(fn_):
        outs = fn_()
        return [*outs, *torch.autograd.grad(outs, (fm, fn, w_p), grads)]

    ref = run(lambda: coattention_dense(fm, fn, w_p))
    worst = 0.0
    for method in ("chunked", "sdpa"):
        got = run(lambda m=method: coattention(fm, fn, w_p, backend=m, chunk_size=10))
        worst = max(worst, *((a - b).abs().max().item() for a, b in zip(got, ref, strict=True)))
    if worst > 1e-9:
        raise SystemExit(f"co-attention differs from the dense reference: {worst:.3g}")
    return worst


def run_case(method: str, side: int, channels: int, batch: int, repeat: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        str(side),
        str(channels),
        str(batch),
        str(repeat),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = parse_args("coattention", "memory-efficient co-attention against the dense one")
    if args.quick:  # (side, channels, batch, timed runs); sdpa only where C = 512
        cases = [(32, 512, 2, 2), (56, 512, 2, 1), (32, 4096, 2, 1)]
    else:
        cases = [(32, 512, 8, 3), (56, 512, 8, 2), (32, 4096, 8, 2), (56, 4096, 8, 1)]
    exact = check_small()
    print(f"exactness vs dense (float64, values and gradients): max abs err {exact:.2e}")
    rows, metrics, ratios = [], {"small_check_max_abs_err": exact}, {}
    for side, channels, batch, repeat in cases:
        case = f"{side}x{side}_c{channels}_b{batch}"
        methods = METHODS if channels <= 512 else METHODS[:2]
        res = {m: run_case(m, side, channels, batch, repeat) for m in methods}
        for m, r in res.items():
            metrics[f"{case}_{m}"] = r
            rows.append({"case": case, "method": m, **r, "max_abs_err": f"{r['max_abs_err']:.1e}"})
        for m in methods[1:]:
            ratios[f"{case}_{m}_mem_saving"] = res["dense"]["peak_mb"] / res[m]["peak_mb"]
            ratios[f"{case}_{m}_time_vs_dense"] = res[m]["seconds"] / res["dense"]["seconds"]
    for channels, batch in {(c, b) for _, c, b, _ in cases}:  # growth from 32x32 to 56x56
        small, big = (metrics.get(f"{s}x{s}_c{channels}_b{batch}_chunked") for s in (32, 56))
        if small and big:
            key = f"c{channels}_b{batch}_chunked_mem_56_over_32"
            ratios[key] = big["peak_mb"] / small["peak_mb"]  # positions x3.06, squared x9.4
    print_table(
        rows,
        ["case", "method", "peak_mb", "seconds", "max_abs_err"],
        title="forward + backward, peak memory beyond inputs (MiB), best seconds",
    )
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    for side, channels, batch, _ in cases:
        key = f"{side}x{side}_c{channels}_b{batch}"
        mem, t = ratios[f"{key}_chunked_mem_saving"], ratios[f"{key}_chunked_time_vs_dense"]
        want_mem = GOAL_MEM if (side, channels, batch) == (56, 512, 8) else 1.0
        if channels == 4096 or want_mem > 1:
            met = mem >= want_mem and t <= GOAL_TIME
            print(
                f"goal {key}: memory saving >= {want_mem}x at <= {GOAL_TIME}x time: "
                f"{'met' if met else 'NOT met'} ({mem:.2f}x, {t:.2f}x)"
            )
    write_results(args.out, "coattention", metrics, ratios)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, side, channels, batch, repeat = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(worker(method, side, channels, batch, repeat)))
    else:
        main()
