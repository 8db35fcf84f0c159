"""The ``webdataset`` backend: shards are streamed with webdataset's tar iterators, images decoded
with PIL and augmented with torchvision's v2 functions in DataLoader worker processes, then
paired by :class:`~mcis_dist.data.pairs.PairPool` and batched inside each worker.

Resume is exact: a worker's stream is a pure function of (seed, epoch, rank, worker), every
sample's augmentation is seeded from its key, and the pool decides from metadata alone. To
resume at batch ``n`` a worker replays its stream reading only the JSON records (no decoding),
recreating the pool's state, and decodes only what it will emit from there on.

A flaky object store does not cost samples: shards are read through
:func:`mcis_dist.storage.open_url`, whose S3 body resumes a broken or stalled read with a ranged
GET at the next byte (botocore's standard retries cover the requests themselves), so webdataset's
tar iterator sees each shard's bytes once, in order. webdataset's own retry (``curl --retry`` in
its ``pipe:`` URLs) is not on this path, and s3fs is not used here. Only a shard that stays
unreadable after those retries is counted in ``shard_errors`` and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen_schemes

from mcis_dist.data.pairs import DOMAIN_IDS, PairPool, PoolItem, pair_type
from mcis_dist.data.sharding import Unit, assign, batches_per_rank, worker_plan
from mcis_dist.data.transforms import AugmentSpec, augment, decode_rgb, sample_seed
from mcis_dist.formats.shards import iter_shard
from mcis_dist.storage import open_url

IMAGE_EXTS = ("jpg", "png")
MAX_LISTED = 100  # bad keys listed per worker (all are counted)


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs (picklable; sent to each DataLoader worker)."""

    shard_urls: tuple[str, ...]
    num_samples: int
    num_classes: int
    batch_size: int
    augment: AugmentSpec
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    seed: int = 0
    pool_size: int = 256
    max_wait: int = 64
    cross_domain_share: float | None = None
    shuffle_buffer: int = 256
    endpoint_url: str | None = None
    pairing: str = "reuse"

    @property
    def batches_per_rank(self) -> int:
        """Batches of ``batch_size`` pairs: N pairs an epoch (reuse), N / 2 (disjoint)."""
        per_pair = 2 if self.pairing == "disjoint" else 1
        return batches_per_rank(self.num_samples // per_pair, self.world_size, self.batch_size)


@dataclass
class _Lazy:
    """An image that is decoded and augmented only when it is about to be emitted."""

    data: bytes
    rng_seed: list[int]
    image: torch.Tensor | None = None

    def get(self, spec: AugmentSpec) -> torch.Tensor:
        if self.image is None:
            self.image = augment(decode_rgb(self.data), spec, np.random.default_rng(self.rng_seed))
            self.data = b""  # keep only the (smaller, fixed-size) result
        return self.image


@dataclass
class WorkerStats:
    worker: int = 0
    samples: int = 0
    bad_decode: int = 0
    bad_record: int = 0
    shard_errors: int = 0
    passes: int = 0
    last_error: str = ""
    bad_keys: list[str] = field(default_factory=list)

    def note_bad(self, key: str) -> None:
        if len(self.bad_keys) < MAX_LISTED:
            self.bad_keys.append(key)


def parse_record(raw: dict, num_classes: int) -> tuple[str, tuple[int, ...], int, bytes]:
    """(key, labels, domain id, image bytes) of a raw webdataset sample; ValueError if malformed."""
    key = raw.get("__key__", "?")
    try:
        meta = json.loads(raw["json"])
        labels = tuple(sorted({int(k) for k in meta["labels"]}))
        domain = DOMAIN_IDS[meta.get("domain", "target")]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"sample {key!r}: malformed label record ({type(e).__name__}: {e})"
        ) from None
    if not labels or labels[0] < 0 or labels[-1] >= num_classes:
        raise ValueError(f"sample {key!r}: labels {list(labels)} outside 0..{num_classes - 1}")
    data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if data is None:
        raise ValueError(f"sample {key!r}: no image member ({', '.join(IMAGE_EXTS)})")
    return key, labels, domain, data


def register_webdataset_s3(endpoint_url: str | None = None) -> None:
    """Let webdataset open ``s3://`` URLs itself (``wds.WebDataset("s3://b/p/shard-{000000..000009}.tar")``)
    through boto3, with the standard AWS credentials and an optional endpoint."""

    def gopen_s3(url, mode="rb", bufsize=8192):
        if mode[0] != "r":
            raise ValueError(f"{url}: the s3 handler only reads (mode {mode!r})")
        return open_url(url, endpoint_url=endpoint_url)

    gopen_schemes["s3"] = gopen_s3


class PairStream(IterableDataset):
    """Yields batches of pairs for one rank; each DataLoader worker runs its own slice."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.epoch = 0
        self.skip_batches = 0  # rank batches already consumed in this epoch (resume)
        self.bad_keys: frozenset[str] = frozenset()  # samples known to fail decoding (resume)

    def set_position(self, epoch: int, skip_batches: int = 0, bad_keys=()) -> None:
        self.epoch, self.skip_batches, self.bad_keys = epoch, skip_batches, frozenset(bad_keys)

    # -- the worker's sample stream --------------------------------------------------------------
    def _raw_samples(self, unit: Unit, stats: WorkerStats):
        """(raw sample, pass number), cycling over the unit's shards without end."""
        spec = self.spec
        plan = assign(len(spec.shard_urls), unit, spec.seed, self.epoch)
        rng = np.random.default_rng([spec.seed, self.epoch, unit.index, 2])
        buffer: list = []
        for cycle in range(1 << 30):
            stats.passes = cycle + 1
            position, usable = 0, 0
            order = plan.shards if cycle == 0 else list(rng.permutation(plan.shards))
            for shard in order:
                try:
                    for raw in iter_shard(spec.shard_urls[shard], spec.endpoint_url):
                        keep = position % plan.stride == plan.offset
                        position += 1
                        if not keep:
                            continue
                        usable += 1
                        buffer.append((raw, cycle))
                        if len(buffer) >= max(1, spec.shuffle_buffer):
                            yield buffer.pop(int(rng.integers(len(buffer))))
                except Exception as e:  # unreadable after the storage's retries: skip the rest
                    stats.shard_errors += 1
                    stats.last_error = f"{spec.shard_urls[shard]}: {type(e).__name__}: {e}"
            if usable == 0:
                raise RuntimeError(
                    f"rank {unit.rank} loader worker {unit.worker}: none of its "
                    f"{len(order)} shard(s) gave a readable sample (last error: {stats.last_error})"
                )

    def __iter__(self):
        spec = self.spec
        plan = worker_plan(spec, self.skip_batches, get_worker_info())
        unit, quota, emitted = plan.unit, plan.quota, plan.emitted
        stats = WorkerStats(worker=unit.worker)
        pool = PairPool(
            spec.pool_size,
            spec.max_wait,
            spec.cross_domain_share,
            np.random.default_rng([spec.seed, self.epoch, unit.index, 1]),
            pairing=spec.pairing,
        )
        pairs_to_skip = emitted * spec.batch_size
        pending = []
        if plan.finished:
            return
        for raw, cycle in self._raw_samples(unit, stats):
            try:
                key, labels, domain, data = parse_record(raw, spec.num_classes)
            except ValueError:
                stats.bad_record += 1
                stats.note_bad(str(raw.get("__key__", "?")))
                continue
            if key in self.bad_keys:
                continue
            lazy = _Lazy(data, sample_seed(spec.seed, self.epoch, cycle, key))
            if pairs_to_skip == 0:  # live: decode now, so a bad image never enters the pool
                try:
                    lazy.get(spec.augment)
                except Exception:
                    stats.bad_decode += 1
                    stats.note_bad(key)
                    continue
            stats.samples += 1
            for m, n in pool.push(PoolItem(key, labels, domain, lazy)):
                if pairs_to_skip:
                    pairs_to_skip -= 1
                    continue
                pending.append((m, n))
                if len(pending) == spec.batch_size:
                    emitted += 1
                    yield self._collate(pending, pool, stats)
                    pending = []
                    if emitted == quota:
                        return

    def _collate(self, pairs, pool: PairPool, stats: WorkerStats) -> dict:
        augment = self.spec.augment
        return collate_pairs(
            pairs, self.spec.num_classes, lambda it: it.payload.get(augment), pool, stats
        )


def collate_pairs(pairs, num_classes: int, image_of, pool: PairPool, stats: WorkerStats) -> dict:
    """A batch in the loader's raw format from ``(m, n)`` pool items; ``image_of(item)`` gives
    an item's (3, S, S) image (uint8 from the webdataset backend, normalised from DALI)."""
    ms, ns = [p[0] for p in pairs], [p[1] for p in pairs]
    labels = torch.zeros(2, len(pairs), num_classes)  # (2, B, K) multi-hot
    for i, (m, n) in enumerate(pairs):
        labels[0, i, list(m.labels)] = 1
        labels[1, i, list(n.labels)] = 1
    return {
        "image_m": torch.stack([image_of(m) for m in ms]),  # (B, 3, S, S)
        "image_n": torch.stack([image_of(n) for n in ns]),
        "labels_m": labels[0],
        "labels_n": labels[1],
        "domain_m": torch.tensor([m.domain for m in ms]),
        "domain_n": torch.tensor([n.domain for n in ns]),
        "pair_type": torch.tensor([pair_type(m.domain, n.domain) for m, n in pairs]),
        "key_m": [m.key for m in ms],
        "key_n": [n.key for n in ns],
        "stats": {
            "worker": {**stats.__dict__, "bad_keys": list(stats.bad_keys)},
            "pairs": {**pool.stats.__dict__, "pair_types": list(pool.stats.pair_types)},
        },
    }
