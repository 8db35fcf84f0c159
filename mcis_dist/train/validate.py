"""Per-epoch validation of the trained stages on a split with masks (``val_every_epochs``).

What a stage's ``Built.validate(epoch)`` runs on every Ray Train worker after an epoch. Each rank
scores its share of the split's images (every ``world``-th sample, in manifest order), the raw
confusion matrices are summed across ranks (never per-rank mIoUs), and every rank returns the
same numbers, reported with the epoch's metrics (what ``mcis tune`` optimises):

* **classifier** (``train.val_every_epochs``): single-round maps S_n (Eq. 1) at scale 1 (x flip
  with ``cams.flip``) of the images of ``seg.val_url``, labelled as ``mcis eval cams`` does at
  ``cams.bg_threshold`` (argmax over [threshold, maps]), scored on their masks. Single-round at
  one scale keeps it to seconds; the pipeline's co-attentive multi-scale maps score higher.
* **AffinityNet** (``affinity.train.val_every_epochs``): the random walk (``masks.*``) of the
  CAMs in ``affinity.val_cams_url`` (made once, e.g. of the val split) with the current
  AffinityNet, scored on their images' masks as ``mcis eval masks`` does.

Plain PyTorch and numpy; the only collective is ``gather`` (``all_gather_object``) of the counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mcis_dist.cams.infer import CamEngine, CamSettings
from mcis_dist.cams.maps import cam_labels, upsample_cams
from mcis_dist.config import ExperimentConfig
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.stream import parse_record
from mcis_dist.data.transforms import decode_mask, decode_rgb
from mcis_dist.evaluation import ConfusionMatrix
from mcis_dist.formats.cams import iter_cam_shard, read_cam_manifest
from mcis_dist.formats.shards import decode_boxes, iter_shard
from mcis_dist.masks.evaluate import count_labels
from mcis_dist.masks.modes import RandomWalkLabeller, SkipSample, make_sample
from mcis_dist.runtime.paths import endpoint_url
from mcis_dist.runtime.trainer import TrainingError, gather

__all__ = [
    "ValImage",
    "read_val_images",
    "classifier_validator",
    "affinity_validator",
    "summed_metrics",
]


@dataclass
class ValImage:
    key: str
    labels: list[int]  # 0-based classes of the image
    rgb: torch.Tensor  # (3, H, W) uint8
    mask: np.ndarray | None  # (H, W) uint8: 0 background, k + 1 class k, 255 ignore
    boxes: np.ndarray | None = None  # (N, 5) int32 rows class, x0, y0, x1, y1 (half-open)


def read_val_images(
    url: str,
    endpoint: str | None,
    rank: int,
    world: int,
    num_classes: int,
    need_mask: bool = True,
) -> tuple[list[ValImage], list[str]]:
    """This rank's share (every ``world``-th sample) of the images with masks of a split, and
    the split's class names. Each image's boxes come with it where the split has them (None
    otherwise); with ``need_mask=False`` images without a mask are read too (``mask`` None),
    for splits with boxes only (Tiny-ImageNet)."""

    manifest, storage = open_manifest(url, endpoint, check_shards=False)
    if len(manifest["classes"]) != num_classes:
        raise TrainingError(
            f"validation split {url} has {len(manifest['classes'])} classes, "
            f"the model {num_classes}"
        )
    out, index = [], 0
    for shard in manifest["shards"]:
        for raw in iter_shard(
            storage.describe(shard["name"]), getattr(storage, "endpoint_url", None)
        ):
            mine, index = index % world == rank, index + 1
            if not mine or (need_mask and "mask.png" not in raw):
                continue
            key, labels, _domain, data = parse_record(raw, num_classes)
            mask = decode_mask(raw["mask.png"]) if "mask.png" in raw else None
            out.append(ValImage(key, list(labels), decode_rgb(data), mask, decode_boxes(raw)))
    return out, manifest["classes"]


def summed_metrics(matrices: dict[str, ConfusionMatrix], images: int, seconds: float) -> dict:
    """Sum every rank's raw counts: ``{name: mIoU}`` for each matrix, ``val_pixel_accuracy``
    (of the first), ``val_images`` and ``val_seconds`` (the slowest rank): the same on every
    rank."""
    everyone = gather({"m": {k: m.matrix for k, m in matrices.items()}, "n": images, "s": seconds})
    out: dict = {}
    for i, name in enumerate(matrices):
        total = ConfusionMatrix.from_matrix(sum(e["m"][name] for e in everyone))
        if total.total == 0:
            raise TrainingError("validation counted no pixel: the split has no masks")
        out[name] = total.miou()
        if i == 0:
            out["val_pixel_accuracy"] = total.pixel_accuracy()
    out["val_images"] = sum(e["n"] for e in everyone)
    out["val_seconds"] = round(max(e["s"] for e in everyone), 3)
    return out


def classifier_validator(
    cfg: ExperimentConfig, model, rank: int, world: int, device, num_classes: int
) -> Callable[[int], dict]:
    """``validate(epoch)``: the CAM mIoU of single-round maps at scale 1 on ``seg.val_url``."""

    settings = CamSettings(
        mode="single",
        scales=(1.0,),
        flip=cfg.cams.flip,
        out_stride=cfg.cams.out_stride,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        amp=cfg.cams.amp,
    )
    images: list[ValImage] | None = None

    def validate(epoch: int) -> dict:
        nonlocal images
        start = time.perf_counter()
        if images is None:  # read once, kept for the run (150 small images: a few MB)
            images, _ = read_val_images(
                cfg.seg.val_url, endpoint_url(cfg), rank, world, num_classes
            )
        engine = CamEngine(model, settings, None, device)
        matrix = ConfusionMatrix(num_classes + 1)
        was_training = model.training
        model.eval()
        try:
            for im in images:
                maps, _ = engine.cams(im.rgb, im.labels, im.key)  # (L, h, w) at out_stride
                scores = upsample_cams(maps.cpu().numpy(), settings.out_stride, im.mask.shape)
                matrix.update(im.mask, cam_labels(scores, im.labels, cfg.cams.bg_threshold))
        finally:
            model.train(was_training)
        return summed_metrics({"val_miou": matrix}, len(images), time.perf_counter() - start)

    return validate


def affinity_validator(
    cfg: ExperimentConfig, net, rank: int, world: int, device
) -> Callable[[int], dict]:
    """``validate(epoch)``: the pseudo-mask mIoU of the random walk (``masks.*``) of the CAMs
    in ``affinity.val_cams_url`` with the current AffinityNet."""

    samples: list | None = None
    classes: list[str] = []

    def validate(epoch: int) -> dict:
        nonlocal samples, classes
        start = time.perf_counter()
        if samples is None:
            samples, classes = read_val_cams(cfg, rank, world)
        names = len(classes) + 1
        left_out, as_bg = ConfusionMatrix(names), ConfusionMatrix(names)
        was_training = net.training
        try:
            labeller = RandomWalkLabeller(net, cfg.masks, cfg.data.mean, cfg.data.std, device)
            for sample, mask in samples:
                count_labels(left_out, as_bg, mask, labeller(sample))
        finally:
            net.train(was_training)
        return summed_metrics(
            {"val_miou": left_out, "val_miou_ignore_as_bg": as_bg},
            len(samples),
            time.perf_counter() - start,
        )

    return validate


def read_val_cams(cfg: ExperimentConfig, rank: int, world: int) -> tuple[list, list[str]]:
    """This rank's share of (``Sample``, mask) of the CAM folder ``affinity.val_cams_url``
    joined with its images, and the class names."""

    endpoint = endpoint_url(cfg)
    manifest, cams = read_cam_manifest(cfg.affinity.val_cams_url, endpoint)
    _, source = open_manifest(manifest["source"]["url"], endpoint, check_shards=False)
    out, index = [], 0
    for shard in manifest["shards"]:
        maps = {meta["key"]: (meta, m) for meta, m in iter_cam_shard(cams, shard["name"])}
        for raw in iter_shard(
            source.describe(shard["source"]), getattr(source, "endpoint_url", None)
        ):
            key = raw["__key__"]
            if key not in maps or "mask.png" not in raw:
                continue
            mine, index = index % world == rank, index + 1
            if not mine:
                continue
            meta, m = maps[key]
            try:
                out.append((make_sample(raw, meta, m), decode_mask(raw["mask.png"])))
            except SkipSample:
                continue
    return out, manifest["classes"]
