"""How large must the class-keyed pair pool be for a stream of many classes?

MCIS trains on pairs of images that share a class (paper §3.1). A stream cannot look images up
by class, so each loader worker keeps a pool of recent samples (``data.pool_size``) and a queue
of samples still waiting for a partner (``data.max_wait``; ``mcis_dist.data.pairs``). With C
classes drawn uniformly, a new sample finds no class-mate among P pooled samples with probability
about (1 - 1/C)^P, and a waiting sample meets its next class-mate after about C more samples; so
for C = 202 (Tiny-ImageNet) a pool of a few hundred still leaves many samples waiting, and a
short queue drops them.

This script measures it on the stream one rank sees, without images: a class-balanced set of
``n`` single-label samples in random order (what the shard builder's seeded shuffle gives), then
the loader's shuffle buffer (the same algorithm as ``PairStream._raw_samples``), cycled until the
rank's quota of pairs is met (as the loader does), pushed through the real ``PairPool``. Per
setting: the share of pushed samples that found a class-sharing partner, the mean wait (samples
pushed between a sample's arrival and its pairing; 0 when paired on arrival), samples dropped by
the queue, pairs without a shared class (0 by construction: the check is kept honest here), and
the pool's memory at the crop size (uint8 crops). Waits are computed here from ``push``'s output,
independently of the pool's own counters.

    python experiments/pool_sizing.py --classes 202 --per-rank 500,5000,50000 \
        --out runs/pool_sizing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mcis_dist.data.pairs import PairPool, PoolItem


def rank_stream(classes: int, n: int, shuffle_buffer: int, seed: int):
    """Endless (key, label) stream of one rank: passes over a class-balanced set of ``n``
    samples in a seeded random order, each pass through a shuffle buffer of ``shuffle_buffer``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)  # the shard builder's shuffled cut
    buffer: list[tuple[str, int]] = []
    for cycle in range(1 << 30):
        order = np.arange(n) if cycle == 0 else rng.permutation(n)
        for i in order:
            buffer.append((f"s{i}", int(labels[i])))
            if len(buffer) >= max(1, shuffle_buffer):
                yield buffer.pop(int(rng.integers(len(buffer))))


def measure(
    classes: int,
    n: int,
    pool_size: int,
    max_wait: int,
    shuffle_buffer: int = 256,
    seed: int = 0,
) -> dict:
    """One epoch of one rank: push until ``n`` pairs are out (the rank's quota); the figures
    of the module docstring."""
    pool = PairPool(pool_size, max_wait, rng=np.random.default_rng([seed, 1]))
    arrival: dict[str, int] = {}
    pushed, pairs, waits, unshared = 0, 0, [], 0
    for key, label in rank_stream(classes, n, shuffle_buffer, seed):
        uid = f"{key}@{pushed}"  # a key comes back on the next pass: one arrival per push
        arrival[uid] = pushed
        for m, partner in pool.push(PoolItem(key, (label,), 0, uid)):
            waits.append(pushed - arrival.pop(m.payload))
            unshared += not set(m.labels) & set(partner.labels)
            pairs += 1
        pushed += 1
        if pairs >= n:
            break
    return {
        "classes": classes,
        "n_per_rank": n,
        "pool_size": pool_size,
        "max_wait": max_wait,
        "shuffle_buffer": shuffle_buffer,
        "pushed": pushed,
        "pairs": pairs,
        "partner_share": pairs / pushed,
        "mean_wait": float(np.mean(waits)),
        "p95_wait": float(np.percentile(waits, 95)),
        "immediate_share": float(np.mean(np.asarray(waits) == 0)),
        "dropped": pool.stats.dropped,
        "unshared": unshared,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=202)
    p.add_argument("--per-rank", default="500,5000,50000", help="samples per rank per epoch")
    p.add_argument("--pool-sizes", default="64,128,256,512,1024,2048")
    p.add_argument("--max-waits", default="16,64,256,1024")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=128, help="crop size for the memory column")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows, t0 = [], time.time()
    print(
        f"{'n/rank':>7} {'pool':>5} {'wait':>5}  partner%  immediate%  mean wait  p95 wait  "
        f"dropped  pool MB"
    )
    for n in (int(x) for x in args.per_rank.split(",")):
        for pool_size in (int(x) for x in args.pool_sizes.split(",")):
            for max_wait in (int(x) for x in args.max_waits.split(",")):
                r = measure(args.classes, n, pool_size, max_wait, args.shuffle_buffer, args.seed)
                r["pool_mb"] = round(pool_size * 3 * args.crop**2 / 2**20, 1)
                rows.append(r)
                print(
                    f"{n:>7} {pool_size:>5} {max_wait:>5}  {100 * r['partner_share']:8.2f}  "
                    f"{100 * r['immediate_share']:10.2f}  {r['mean_wait']:9.1f}  "
                    f"{r['p95_wait']:8.0f}  {r['dropped']:7d}  {r['pool_mb']:7.1f}",
                    flush=True,
                )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    print(f"{len(rows)} settings in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
