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

The parts live beside this module: planning the image/label join in ``join.py``, the joint
augmentation in ``joint_augment.py``, and the per-worker stream in ``joint_stream.py``.
"""

from __future__ import annotations

import torch

from mcis_dist.data.join import check_classes, open_label_folder, plan_join
from mcis_dist.data.joint_augment import JointAugmentSpec
from mcis_dist.data.joint_stream import COUNTS, JointSpec, JointStream
from mcis_dist.data.loader import LoaderError, epoch_dataloader, open_manifest
from mcis_dist.data.sharding import rank_and_world
from mcis_dist.data.stream import MAX_LISTED
from mcis_dist.data.transforms import normalize
from mcis_dist.formats.labels import LABEL_MEMBER

__all__ = ["JointLoader"]


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
        check_classes(
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
        for batch in epoch_dataloader(stream, self.cfg, self.epoch, self.device):
            if self.position >= self._len:
                break
            batch = self._finish(batch)
            self.position += 1
            yield batch
        if self.position >= self._len:  # the epoch is complete: the next one starts at 0
            self.epoch, self.position = self.epoch + 1, 0
