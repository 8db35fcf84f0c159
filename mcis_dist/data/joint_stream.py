"""``JointStream``: the per-worker side of :class:`~mcis_dist.data.joint.JointLoader`, an
``IterableDataset`` that streams each label shard beside its image shard, decodes and checks
every sample, augments image and label together and yields uint8 batches.

A worker's sample stream is a pure function of (seed, epoch, rank, worker) and each sample's
augmentation is seeded from its key, so resuming at batch ``n`` replays the stream without
decoding up to it; samples that fail are skipped, counted in :class:`WorkerStats` and their keys
reported with each batch so a resumed loader skips them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mcis_dist.data.joint_augment import JointAugmentSpec, augment_with_box
from mcis_dist.data.sharding import Unit, assign, batches_per_rank, worker_plan
from mcis_dist.data.stream import IMAGE_EXTS, iter_shard
from mcis_dist.data.transforms import decode_rgb, sample_seed
from mcis_dist.formats.labels import IGNORE, LABEL_MEMBER, decode_label

__all__ = ["COUNTS", "JointSpec", "JointStream", "WorkerStats", "collate"]

COUNTS = ("samples", "bad_decode", "bad_label", "size_mismatch", "bad_record", "shard_errors")


@dataclass(frozen=True)
class JointSpec:
    """Everything a worker needs (picklable; sent to each DataLoader worker)."""

    label_urls: tuple[str, ...]
    image_urls: tuple[str, ...]
    num_samples: int
    num_classes: int
    batch_size: int
    augment: JointAugmentSpec
    label_key: str = LABEL_MEMBER
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    seed: int = 0
    shuffle_buffer: int = 256
    endpoint_url: str | None = None

    @property
    def batches_per_rank(self) -> int:
        return batches_per_rank(self.num_samples, self.world_size, self.batch_size)


@dataclass
class WorkerStats:
    worker: int = 0
    samples: int = 0
    bad_decode: int = 0
    bad_label: int = 0
    size_mismatch: int = 0
    bad_record: int = 0
    shard_errors: int = 0
    passes: int = 0
    last_error: str = ""
    new_bad: list[str] = field(default_factory=list)  # since the last batch: every one (resume)
    known_bad: set[str] = field(default_factory=set)  # met in this worker: skipped, not recounted

    def bad(self, kind: str, key: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.new_bad.append(key)
        self.known_bad.add(key)
        self.last_error = f"{key}: {why}"

    def report(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "known_bad"}
        out["new_bad"] = list(self.new_bad)
        self.new_bad.clear()
        return out


class JointStream(IterableDataset):
    """Yields uint8 batches for one rank; each DataLoader worker runs its own slice."""

    def __init__(self, spec: JointSpec):
        super().__init__()
        self.spec = spec
        self.epoch, self.skip_batches = 0, 0
        self.bad_keys: frozenset[str] = frozenset()  # samples known to fail (resume)

    def set_position(self, epoch: int, skip_batches: int = 0, bad_keys=()) -> None:
        self.epoch, self.skip_batches, self.bad_keys = epoch, skip_batches, frozenset(bad_keys)

    def _joined(self, shard: int):
        """(key, image bytes | None, label bytes | None) of every sample of a label shard, the
        image found by walking the image shard forward (label keys are a subsequence)."""
        spec = self.spec
        images = iter_shard(spec.image_urls[shard], spec.endpoint_url)
        try:
            for raw in iter_shard(spec.label_urls[shard], spec.endpoint_url):
                key = raw["__key__"]
                image = next((im for im in images if im["__key__"] == key), {})
                data = next((image[e] for e in IMAGE_EXTS if e in image), None)
                yield key, data, raw.get(spec.label_key)
        finally:
            images.close()

    def _samples(self, unit: Unit, stats: WorkerStats):
        """(key, image bytes, label bytes, pass), cycling over the unit's shards without end. Each
        pass drains its shuffle buffer, so a pass holds each of the unit's samples exactly once."""
        spec = self.spec
        plan = assign(len(spec.label_urls), unit, spec.seed, self.epoch)
        rng = np.random.default_rng([spec.seed, self.epoch, unit.index, 2])
        for cycle in range(1 << 30):
            stats.passes = cycle + 1
            order = plan.shards if cycle == 0 or plan.stride > 1 else rng.permutation(plan.shards)
            buffer, position, kept = [], 0, 0
            for shard in order:
                try:
                    for sample in self._joined(int(shard)):
                        keep = position % plan.stride == plan.offset
                        position += 1
                        if keep:
                            kept += 1
                            buffer.append((*sample, cycle))
                            if len(buffer) >= spec.shuffle_buffer:
                                yield buffer.pop(int(rng.integers(len(buffer))))
                except Exception as e:  # a broken or unreachable shard costs its samples only
                    stats.shard_errors += 1
                    stats.last_error = f"{spec.label_urls[shard]}: {type(e).__name__}: {e}"
            if kept == 0:
                why = (
                    f"none of its {len(order)} label shard(s) gave a readable sample (last "
                    f"error: {stats.last_error})"
                    if position == 0
                    else f"its share of the {position} samples is empty: there are more readers "
                    f"({unit.count} = ranks x loader workers) than samples; use fewer workers"
                )
                raise RuntimeError(f"rank {unit.rank} loader worker {unit.worker}: {why}")
            while buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))

    def _decode(self, key: str, image: bytes, label: bytes, cycle: int, stats: WorkerStats):
        """The augmented (image, label, box) of one sample, or None (skipped and counted)."""
        spec = self.spec
        try:
            img = decode_rgb(image)  # (3, H, W) uint8
            lab = torch.from_numpy(decode_label(label))  # (H, W) uint8
        except Exception as e:
            stats.bad("bad_decode", key, f"{type(e).__name__}: {e}")
            return None
        if lab.shape != img.shape[1:]:
            stats.bad(
                "size_mismatch",
                key,
                f"label {tuple(lab.shape)}, image {tuple(img.shape[1:])} (H, W)",
            )
            return None
        if ((lab > spec.num_classes) & (lab != IGNORE)).any():
            stats.bad(
                "bad_label",
                key,
                f"label values {lab.unique().tolist()} outside 0..{spec.num_classes} and {IGNORE}",
            )
            return None
        rng = np.random.default_rng(sample_seed(spec.seed, self.epoch, cycle, key))
        return augment_with_box(img, lab, spec.augment, rng)

    def __iter__(self):
        spec = self.spec
        plan = worker_plan(spec, self.skip_batches, get_worker_info())
        unit, quota, emitted = plan.unit, plan.quota, plan.emitted
        to_skip = emitted * spec.batch_size  # samples already in consumed batches: replay only
        stats, pending = WorkerStats(worker=unit.worker), []
        usable, this_pass = 0, 0
        if plan.finished:
            return
        for key, image, label, cycle in self._samples(unit, stats):
            if cycle != this_pass:
                if usable == 0:
                    raise RuntimeError(
                        f"rank {unit.rank} loader worker {unit.worker}: no sample "
                        f"of a whole pass was usable (last: {stats.last_error})"
                    )
                this_pass, usable = cycle, 0
            if key in self.bad_keys or key in stats.known_bad:  # (a later pass: counted once)
                continue
            if image is None or label is None:
                if not to_skip:  # (replayed ones were counted before the resume)
                    what = "no image in its source shard" if image is None else "no label member"
                    stats.bad("bad_record", key, f"{what} ({spec.label_key})")
                continue
            if to_skip:
                to_skip, usable = to_skip - 1, usable + 1
                continue
            out = self._decode(key, image, label, cycle, stats)
            if out is None:
                continue
            usable += 1
            stats.samples += 1
            pending.append((key, *out))
            if len(pending) == spec.batch_size:
                emitted += 1
                yield collate(pending, stats)
                pending = []
                if emitted == quota:
                    return


def collate(items, stats: WorkerStats) -> dict:
    """A raw batch from ``(key, image, label, box)`` items (uint8; normalised on the device)."""
    return {
        "image": torch.stack([it[1] for it in items]),  # (B, 3, S, S) uint8
        "label": torch.stack([it[2] for it in items]),  # (B, S, S) uint8
        "valid": torch.tensor([it[3] for it in items], dtype=torch.int64),  # (B, 4) y0 x0 y1 x1
        "keys": [it[0] for it in items],
        "stats": stats.report(),
    }
