"""``JointLoader``: images joined by key with per-pixel label maps (confident labels for
AffinityNet, pseudo masks for DeepLab) and augmented together; the input of both trainers.

Output contract: an iterable of ``len(loader)`` batches per epoch, the same number on every rank
(DDP hangs otherwise), each a dict

=========  ====================================================================================
``image``  (B, 3, S, S) float32, normalised with ``mean``/``std``, on ``device``; padding is 0
``label``  (B, S, S) int64 on ``device``: 0 background, k+1 class k, 255 ignore (and padding)
``keys``   list of B sample keys
=========  ====================================================================================

A label folder (format ``mcis-labels/1``) holds ``labels-NNNNNN.tar`` shards, each made from one
image shard (its ``source``) and holding ``<key>.label.png`` (8-bit, the image's size) and
``<key>.json`` for a subsequence, in the same order, of that shard's keys. Label shards are what
ranks and loader workers share out (``sharding.py``); a reader streams a label shard and its
image shard side by side, so nothing is looked up at random. Images without a label are skipped
(counted from the manifests at construction); samples whose image or label does not decode, or
whose sizes differ, are skipped and counted as they are met.

Resume is exact, as with ``PairLoader``: a worker's sample stream is a pure function of (seed,
epoch, rank, worker), each sample's augmentation is seeded from its key, and the keys of samples
that failed to decode travel in ``state_dict``; resuming at batch ``n`` replays the stream
without decoding up to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mcis_dist.data.loader import LoaderError, open_manifest
from mcis_dist.data.sharding import (
    Unit,
    assign,
    batches_per_rank,
    consumed_by_worker,
    rank_and_world,
    worker_quota,
)
from mcis_dist.data.stream import IMAGE_EXTS, MAX_LISTED, iter_shard
from mcis_dist.data.transforms import decode_rgb, normalize, sample_seed
from mcis_dist.formats.labels import FORMAT as LABELS_FORMAT
from mcis_dist.formats.labels import IGNORE, LABEL_MEMBER, decode_label
from mcis_dist.formats.shards import FORMAT as SHARDS_FORMAT
from mcis_dist.formats.shards import MANIFEST_NAME
from mcis_dist.storage import StorageError, open_storage

__all__ = [
    "JointAugmentSpec",
    "JointLoader",
    "augment_with_box",
    "joint_augment",
    "open_label_folder",
    "plan_join",
]

COUNTS = ("samples", "bad_decode", "bad_label", "size_mismatch", "bad_record", "shard_errors")


# ------------------------------------------------------------------------------- label folders
def open_label_folder(url: str, endpoint_url: str | None = None, check_shards: bool = True):
    """The label folder's manifest and storage; with ``check_shards``, every listed shard must
    exist (a clear error at start, not a hang mid-epoch)."""
    storage = open_storage(url, endpoint_url=endpoint_url)
    where = storage.describe(MANIFEST_NAME)
    try:
        if not storage.exists(MANIFEST_NAME):
            raise LoaderError(
                f"{where} does not exist: no finished label folder here (the stage that writes "
                "it has not run, or has not finished)"
            )
        raw = storage.read_bytes(MANIFEST_NAME)
    except StorageError as e:
        raise LoaderError(str(e)) from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise LoaderError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != LABELS_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        hint = " (an image split: labels_url must name a label folder)" * (got == SHARDS_FORMAT)
        raise LoaderError(f"{where} has format {got!r}, expected {LABELS_FORMAT!r}{hint}")
    missing = [k for k in ("classes", "shards") if k not in manifest]
    if missing:
        raise LoaderError(f"{where} lacks {', '.join(missing)}")
    if check_shards:
        try:
            sizes = storage.sizes()
        except StorageError as e:
            raise LoaderError(str(e)) from None
        problems = []
        for shard in manifest["shards"]:
            got, want = sizes.get(shard["name"]), shard.get("bytes")
            if got is None:
                problems.append(f"{shard['name']} is missing")
            elif want and got != want:
                problems.append(f"{shard['name']} has {got} bytes, the manifest says {want}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise LoaderError(
                f"{storage.describe()}: the label shards do not match {MANIFEST_NAME}: "
                f"{'; '.join(problems[:5])}{more}"
            )
    return manifest, storage


def _show(names: list[str], limit: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{', '.join(names[:limit])}{more}]"


def _check_classes(images: list[str], labels: list[str], image_where: str, label_where: str):
    if images == labels:
        return
    first = next((i for i, (a, b) in enumerate(zip(images, labels, strict=False)) if a != b), None)
    if first is None:
        why = f"{len(labels)} classes against {len(images)}"
    else:
        why = f"class {first} is {labels[first]!r} in the labels, {images[first]!r} in the images"
    raise LoaderError(
        f"the label folder {label_where} has classes {_show(labels)}, but the image split "
        f"{image_where} has {_show(images)} ({why}): the labels were made for another class list"
    )


@dataclass(frozen=True)
class JoinPlan:
    """Which label shard goes with which image shard, and what the join leaves out."""

    label_shards: tuple[str, ...]  # label shard names (non-empty ones), manifest order
    image_shards: tuple[str, ...]  # the image shard of each
    images: int  # images in the split
    labelled: int  # images with a label: the epoch's samples
    no_label_keys: tuple[str, ...]  # images without a label, split order


def _is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(k in it for k in sub)


def plan_join(images: dict, labels: dict, image_where: str, label_where: str) -> JoinPlan:
    """Match label shards to their source image shards; a label shard whose keys are not a
    subsequence of its source shard's keys is an error (labels of another split)."""
    by_name = {s["name"]: s for s in images["shards"]}
    problems, labelled, label_shards, image_shards = [], set(), [], []
    for ls in labels["shards"]:
        keys, src = ls.get("keys", []), by_name.get(ls.get("source"))
        if src is None:
            problems.append(f"{ls['name']} names source {ls.get('source')!r}, not in the split")
        elif not _is_subsequence(keys, src["keys"]):
            unknown = sorted(set(keys) - set(src["keys"]))
            problems.append(
                f"{ls['name']} holds keys {_show(unknown, 3)} that {src['name']} lacks"
                if unknown
                else f"{ls['name']} lists its keys in another order than {src['name']}"
            )
        elif labelled & set(keys):
            problems.append(f"{ls['name']} labels {_show(sorted(labelled & set(keys)), 3)} again")
        elif keys:
            labelled.update(keys)
            label_shards.append(ls["name"])
            image_shards.append(src["name"])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LoaderError(
            f"the label folder {label_where} does not match the image split {image_where}: "
            f"{'; '.join(problems[:5])}{more}; were the labels made from another split?"
        )
    all_keys = [k for s in images["shards"] for k in s["keys"]]
    return JoinPlan(
        tuple(label_shards),
        tuple(image_shards),
        len(all_keys),
        len(labelled),
        tuple(k for k in all_keys if k not in labelled),
    )


# -------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class JointAugmentSpec:
    """Joint augmentation parameters (from ``JointDataConfig`` and the backbone's mean)."""

    crop_size: int = 448
    scale: tuple[float, float] = (0.9, 1.5)  # the image is rescaled by a factor in U[lo, hi]
    hflip: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    fill: tuple[int, int, int] = field(init=False)  # the image's padding colour

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale={self.scale}: expected 0 < lo <= hi")
        if self.crop_size <= 0:
            raise ValueError(f"crop_size={self.crop_size}: expected a positive size")
        object.__setattr__(self, "fill", tuple(int(round(m * 255)) for m in self.mean))


def augment_with_box(
    img: torch.Tensor, label: torch.Tensor, spec: JointAugmentSpec, rng: np.random.Generator
):
    """:func:`joint_augment`, plus the box ``(y0, x0, y1, x1)`` of the crop that holds image
    pixels (outside it is padding)."""
    _, h, w = img.shape  # (3, H, W)
    f = float(rng.uniform(*spec.scale))
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    if (nh, nw) != (h, w):
        img = TF.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        # nearest-exact samples at pixel centres, as bilinear (align_corners=False) does; plain
        # "nearest" floors and drifts up to a pixel from the image when upscaling
        label = TF.resize(label[None], [nh, nw], interpolation=InterpolationMode.NEAREST_EXACT)[0]
    if spec.hflip and rng.random() < 0.5:
        img, label = img.flip(-1), label.flip(-1)
    size = spec.crop_size
    ch, cw = min(nh, size), min(nw, size)
    sy, sx = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))  # source
    dy, dx = int(rng.integers(0, size - ch + 1)), int(rng.integers(0, size - cw + 1))  # dest
    out_img = torch.empty((3, size, size), dtype=img.dtype)  # (3, S, S)
    out_img[:] = torch.tensor(spec.fill, dtype=img.dtype).view(3, 1, 1)
    out_label = torch.full((size, size), IGNORE, dtype=label.dtype)  # (S, S)
    out_img[:, dy : dy + ch, dx : dx + cw] = img[:, sy : sy + ch, sx : sx + cw]
    out_label[dy : dy + ch, dx : dx + cw] = label[sy : sy + ch, sx : sx + cw]
    return out_img, out_label, (dy, dx, dy + ch, dx + cw)


def joint_augment(
    img: torch.Tensor, label: torch.Tensor, spec: JointAugmentSpec, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) uint8 image and (H, W) uint8 label → (3, S, S) and (S, S), S = crop_size:
    rescale by a factor in ``spec.scale`` (bilinear image, nearest label), horizontal flip, and a
    random S×S crop; where the image is smaller it sits at a random place on a canvas of the mean
    colour (normalising to 0) and the label's canvas is 255 (ignored)."""
    img, label, _ = augment_with_box(img, label, spec, rng)
    return img, label


# ---------------------------------------------------------------------------------- the stream
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
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != spec.num_workers:
            raise RuntimeError(
                f"spec says {spec.num_workers} loader workers, running {num_workers}"
            )
        rank_batches = spec.batches_per_rank
        done = min(self.skip_batches, rank_batches)
        # The DataLoader always starts its round-robin at worker 0, but after ``done`` batches
        # the next batch is due from logical worker ``done % W``: shift the roles to match.
        worker = (physical + done) % num_workers
        unit = Unit(spec.rank, spec.world_size, worker, num_workers)
        quota = worker_quota(rank_batches, worker, num_workers)
        emitted = consumed_by_worker(done, worker, num_workers)
        to_skip = emitted * spec.batch_size  # samples already in consumed batches: replay only
        stats, pending = WorkerStats(worker=worker), []
        usable, this_pass = 0, 0
        if emitted >= quota:
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


# ---------------------------------------------------------------------------------- the loader
class JointLoader:
    """Batches of (image, label map) for one rank (see the module docstring for the contract).

    Args:
        images_url: the image split (``mcis-shards/1``), local folder or ``s3://``.
        labels_url: the label folder (``mcis-labels/1``) made from that split.
        cfg: a ``JointDataConfig`` (batch size, workers, crop, scale, flip, shuffle, seed).
        mean, std: the backbone's normalisation (0-1 scale); padding normalises to 0.
        rank, world_size: default: Ray Train's context (else ``RANK``/``WORLD_SIZE``, else 0/1).
        device: where batches go.
        endpoint_url: S3 endpoint for both folders.
        label_key: the label member of each sample of the label shards.
    """

    def __init__(
        self,
        images_url: str,
        labels_url: str,
        cfg,
        *,
        mean,
        std,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device = "cpu",
        endpoint_url: str | None = None,
        label_key: str = LABEL_MEMBER,
    ):
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside a world of {world_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise LoaderError(
                f"mean={list(mean)}, std={list(std)}: expected 3 values each, std > 0"
            )
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.manifest, self.storage = open_manifest(images_url, endpoint_url)
        self.label_manifest, self.label_storage = open_label_folder(labels_url, endpoint_url)
        self.classes = list(self.manifest["classes"])
        _check_classes(
            self.classes,
            list(self.label_manifest["classes"]),
            self.storage.describe(),
            self.label_storage.describe(),
        )
        self.plan = plan_join(
            self.manifest,
            self.label_manifest,
            self.storage.describe(),
            self.label_storage.describe(),
        )
        self.augment = JointAugmentSpec(
            crop_size=cfg.crop_size, scale=tuple(cfg.scale), hflip=cfg.hflip, mean=self.mean
        )
        self.spec = JointSpec(
            label_urls=tuple(self.label_storage.describe(n) for n in self.plan.label_shards),
            image_urls=tuple(self.storage.describe(n) for n in self.plan.image_shards),
            num_samples=self.plan.labelled,
            num_classes=len(self.classes),
            batch_size=cfg.batch_size,
            augment=self.augment,
            label_key=label_key,
            rank=rank,
            world_size=world_size,
            num_workers=max(1, cfg.num_workers),
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            endpoint_url=endpoint_url,
        )
        try:
            self._len = self.spec.batches_per_rank
        except ValueError as e:
            raise LoaderError(f"{self.plan.labelled} labelled images: {e}") from None
        self.epoch, self.position = 0, 0
        self._bad_keys: set[str] = set()
        self._base = dict.fromkeys(COUNTS, 0)  # counts of earlier iterations of this epoch
        self._worker_stats: dict[int, dict] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self._len

    # -- position -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start of an epoch (call before iterating, as with DistributedSampler)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        """Where the loader stands: the next batch is ``batches`` of ``epoch`` (0-based)."""
        fresh = self.position == 0
        return {
            "epoch": self.epoch,
            "batches": self.position,
            "bad_keys": [] if fresh else sorted(self._bad_keys),
            "counts": dict.fromkeys(COUNTS, 0) if fresh else self._counts(),
            "world_size": self.world_size,
            "num_workers": self.spec.num_workers,
            "batch_size": self.spec.batch_size,
            "seed": self.spec.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("world_size", "num_workers", "batch_size", "seed"):
            if k in state and state[k] != getattr(self.spec, k):
                raise LoaderError(
                    f"loader state has {k}={state[k]}, this loader {getattr(self.spec, k)}: an "
                    f"exact resume needs the same {k} (or start the epoch again: batches=0)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])
        self._bad_keys = set(state.get("bad_keys", ()))
        self._base = {k: int(state.get("counts", {}).get(k, 0)) for k in COUNTS}
        self._worker_stats.clear()

    # -- statistics -----------------------------------------------------------------------------
    def _counts(self) -> dict:
        return {k: self._base[k] + sum(w[k] for w in self._worker_stats.values()) for k in COUNTS}

    def stats(self) -> dict:
        """This rank's counts over the epoch so far (``samples`` yielded, ``bad_decode``,
        ``bad_label`` (values outside the classes), ``size_mismatch``, ``bad_record``,
        ``shard_errors``, a few ``bad_keys``), and the join's over the whole split: ``images``,
        ``labelled``, ``no_label`` (images without a label, never read) and ``no_label_keys``."""
        last = [w["last_error"] for w in self._worker_stats.values() if w["last_error"]]
        return {
            **self._counts(),
            "bad_keys": sorted(self._bad_keys)[:MAX_LISTED],
            "last_error": last[-1] if last else "",
            "images": self.plan.images,
            "labelled": self.plan.labelled,
            "no_label": len(self.plan.no_label_keys),
            "no_label_keys": list(self.plan.no_label_keys[:MAX_LISTED]),
        }

    # -- iteration ------------------------------------------------------------------------------
    def _finish(self, batch: dict) -> dict:
        stats = batch.pop("stats")
        self._worker_stats[stats["worker"]] = stats
        self._bad_keys.update(stats["new_bad"])
        image = normalize(batch["image"].to(self.device, non_blocking=True), self.mean, self.std)
        valid = batch.pop("valid").to(self.device)  # (B, 4)
        r = torch.arange(image.shape[-1], device=self.device)
        rows = (r >= valid[:, 0:1]) & (r < valid[:, 2:3])  # (B, S)
        cols = (r >= valid[:, 1:2]) & (r < valid[:, 3:4])  # (B, S)
        inside = rows[:, :, None] & cols[:, None, :]  # (B, S, S)
        batch["image"] = image.masked_fill_(~inside[:, None], 0.0)  # padding: exactly 0
        batch["label"] = batch["label"].to(self.device, non_blocking=True).long()  # (B, S, S)
        return batch

    def __iter__(self):
        if self.position == 0:  # a new epoch: its own counts and bad keys
            self._bad_keys.clear()
            self._base = dict.fromkeys(COUNTS, 0)
        else:  # later in the same epoch: keep what earlier iterations counted
            self._base = self._counts()
        self._worker_stats.clear()
        stream = JointStream(self.spec)
        stream.set_position(self.epoch, self.position, self._bad_keys)
        workers = self.cfg.num_workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=self.cfg.mp_context if workers else None,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # its own generator: creating the iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch),
        )
        for batch in loader:
            if self.position >= self._len:
                break
            batch = self._finish(batch)
            self.position += 1
            yield batch
        if self.position >= self._len:  # the epoch is complete: the next one starts at 0
            self.epoch, self.position = self.epoch + 1, 0
