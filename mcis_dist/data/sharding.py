"""Who reads what: shards across ranks and loader workers, and how many batches each yields.

Two rules keep distributed training correct:

1. **Disjoint within an epoch.** The shard list is permuted with (seed, epoch), the same on
   every rank; the reader units (rank × loader worker) take interleaved slices of it. When there
   are fewer shards than units, every unit reads all shards and keeps every U-th sample (the
   samples are still split disjointly; each unit just reads more bytes).
2. **Equal batches on every rank.** DDP hangs if one rank runs out of batches before the others,
   so every rank yields exactly ``batches_per_rank = num_samples // (world_size * batch_size)``
   batches per epoch, whatever its shards hold: a unit that reaches the end of its slice starts
   it again (a new pass, with new augmentations) until its quota is met, and stops at the quota
   even if samples remain. Corrupt samples therefore never change the count.

Within a rank, batches come round-robin from the DataLoader workers (PyTorch's order for
iterable datasets), so worker ``w`` contributes batch ``j`` when ``j % num_workers == w``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Unit:
    """One reader: loader worker ``worker`` of rank ``rank``."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def rank_and_world() -> tuple[int, int]:
    """The Ray Train world rank and size inside a Ray Train worker, else ``RANK``/``WORLD_SIZE``
    (torchrun's variables), else a single process."""
    try:
        import ray.train  # lazy: a probe; runs without Ray

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:  # not inside a Ray Train worker
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    n = num_samples // (world_size * batch_size)
    if n == 0:
        raise ValueError(
            f"{num_samples} samples cannot give every one of {world_size} ranks a batch of "
            f"{batch_size}: lower batch_size or the number of workers"
        )
    return n


def worker_quota(rank_batches: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` yields so that round-robin gives the rank exactly its quota."""
    return rank_batches // num_workers + (1 if worker < rank_batches % num_workers else 0)


def consumed_by_worker(rank_batches_consumed: int, worker: int, num_workers: int) -> int:
    """How many of the first ``n`` rank batches came from ``worker`` (round-robin order)."""
    return worker_quota(rank_batches_consumed, worker, num_workers)


@dataclass(frozen=True)
class WorkerPlan:
    """One loader worker's part of a rank's epoch, resumed after ``done`` rank batches."""

    unit: Unit
    quota: int  # batches this worker yields in the whole epoch
    emitted: int  # of which already consumed before the resume point

    @property
    def finished(self) -> bool:
        return self.emitted >= self.quota


def worker_plan(spec, skip_batches: int, worker_info=None) -> WorkerPlan:
    """The plan of the calling DataLoader worker (``worker_info``: ``get_worker_info()``) for a
    stream spec with ``rank``, ``world_size``, ``num_workers`` and ``batches_per_rank``.

    The DataLoader always starts its round-robin at worker 0, but after ``done`` batches the
    next batch is due from logical worker ``done % W``: the roles are shifted to match, so a
    resumed epoch yields exactly the batches an uninterrupted one would have yielded next.
    """
    physical, num_workers = (worker_info.id, worker_info.num_workers) if worker_info else (0, 1)
    if num_workers != spec.num_workers:
        raise RuntimeError(f"spec says {spec.num_workers} loader workers, running {num_workers}")
    rank_batches = spec.batches_per_rank
    done = min(skip_batches, rank_batches)
    worker = (physical + done) % num_workers
    return WorkerPlan(
        Unit(spec.rank, spec.world_size, worker, num_workers),
        worker_quota(rank_batches, worker, num_workers),
        consumed_by_worker(done, worker, num_workers),
    )


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation, identical on every rank."""
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)]


@dataclass(frozen=True)
class Assignment:
    shards: list[int]  # shard indices this unit reads, in order
    stride: int  # keep every ``stride``-th sample of them ...
    offset: int  # ... starting at this one (stride 1: every sample)


def assign(num_shards: int, unit: Unit, seed: int, epoch: int) -> Assignment:
    order = epoch_shard_order(num_shards, seed, epoch)
    if num_shards >= unit.count:
        return Assignment(order[unit.index :: unit.count], 1, 0)
    return Assignment(order, unit.count, unit.index)
