"""Dense CRF (pydensecrf2): images/s of ``crf_map`` with all cores against one process.

Every image is a synthetic 'photo' (smooth colour regions plus pixel noise) with 21-class
probabilities (softmax of smooth random logits, sharpened towards the regions), 512 x 512
(--quick: 256 x 256). The baseline is ``crf_map(..., processes=1)`` (inline, this process);
the case is ``processes=0`` (``os.cpu_count()`` spawned workers), timed end to end: pool
start-up (spawning, importing numpy and pydensecrf) and pickling the (21, H, W) float32
probabilities to the workers and the marginals back are included, as a caller pays them. The
parallel marginals must equal the inline ones exactly, so a broken path cannot post a number.

    python benchmarks/crf.py [--quick] [--out FILE]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from common import parse_args, print_table, timeit, write_results

ROOT = Path(__file__).resolve().parent.parent
LABELS = 21


def make_item(side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (side, side, 3) uint8, probs (LABELS, side, side) float32 summing to 1)."""
    rng = np.random.default_rng(seed)
    cells = 6
    region = rng.integers(0, LABELS, (cells, cells))  # a coarse label layout
    idx = (np.arange(side) * cells) // side
    labels = region[idx[:, None], idx[None, :]]  # (side, side)
    palette = rng.integers(0, 256, (LABELS, 3))
    image = palette[labels] + rng.normal(0, 15, (side, side, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    coarse = rng.normal(0, 1, (LABELS, cells + 1, cells + 1))
    up = np.linspace(0, cells, side)
    i0 = np.minimum(up.astype(int), cells - 1)
    f = (up - i0)[None, :]
    rows = coarse[:, i0] * (1 - f[..., None]) + coarse[:, i0 + 1] * f[..., None]  # (L, S, c+1)
    logits = rows[:, :, i0] * (1 - f) + rows[:, :, i0 + 1] * f  # (L, S, S) bilinear
    logits[labels, np.arange(side)[:, None], np.arange(side)] += 1.5
    probs = np.exp(logits - logits.max(0))
    return image, (probs / probs.sum(0)).astype(np.float32)


def main() -> None:
    args = parse_args("crf", "dense CRF images/s: all cores against one process")
    sys.path.insert(0, str(ROOT))
    from mcis_dist.crf import CRFParams, crf_map

    side, count, repeat = (256, 8, 2) if args.quick else (512, 12, 2)
    cores = os.cpu_count() or 1
    items = [make_item(side, seed) for seed in range(count)]
    params = CRFParams()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tiny = [make_item(16, seed) for seed in range(cores)]  # pool start-up, almost no work
    startup = timeit(lambda: crf_map(tiny, params, processes=0), repeat=repeat)
    inline = timeit(lambda: crf_map(items, params, processes=1), repeat=repeat)
    pooled = timeit(lambda: crf_map(items, params, processes=0), repeat=repeat)
    for a, b in zip(inline.result, pooled.result, strict=True):
        if a.shape != (LABELS, side, side) or not np.array_equal(a, b):
            raise SystemExit("parallel CRF marginals differ from the inline ones")
    pairs = zip(items, inline.result, strict=True)
    kept = np.mean([(p.argmax(0) == q.argmax(0)).mean() for (_, p), q in pairs])
    metrics = {
        "side": side,
        "labels": LABELS,
        "images": count,
        "cores": cores,
        "params": vars(params),
        "argmax_kept_share": float(kept),
        "pool_startup_s": startup.best,
        "load_avg_1min_at_start": load,
    }
    rows = []
    for name, procs, t in (("1_process", 1, inline), ("all_cores", cores, pooled)):
        r = {
            "case": name,
            "processes": procs,
            "images_per_s": count / t.best,
            "s_per_image": t.best / count,
            "seconds": t.best,
            "runs": [round(x, 3) for x in t.runs],
        }
        metrics[name] = r
        rows.append(r)
    warm = count / (pooled.best - startup.best)  # the pool's rate once its workers are up
    metrics["all_cores"]["images_per_s_after_startup"] = warm
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    ratios = {
        "all_cores_vs_1_process": speedup,
        "scaling_efficiency": speedup / cores,
        "all_cores_after_startup_vs_1_process": warm / rows[0]["images_per_s"],
    }
    print_table(
        rows,
        ["case", "processes", "images_per_s", "s_per_image", "seconds"],
        title=f"dense CRF, {count} images {side}x{side}, {LABELS} labels, 10 iterations "
        f"(best of {repeat}, pool start-up included)",
    )
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    print(
        f"pool start-up (spawn {cores} workers, {cores} 16x16 images): {startup.best:.2f} s; "
        f"1-minute load average at start: {load:.2f} (other work on the cores lowers scaling)"
    )
    write_results(args.out, "crf", metrics, ratios)


if __name__ == "__main__":
    main()
