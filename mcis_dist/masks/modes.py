"""The label modes: one image's CAMs (+ image, saliency map, affinities) -> its label map.

Each mode is a :class:`LabelMode` in :data:`MODES`, the one registry of label modes, filled
here: its output kind, the settings its labels depend on (the stage's fingerprint) and a
builder of its per-image function ``Sample -> (H, W) uint8 label`` (0 background, k + 1 class
k, 255 ignore), which raises :class:`SkipSample` for an image it leaves out.

* ``confident`` (kind ``confident``; AffinityNet's training labels, ``affinity.*``): psa's
  confident foreground / background (:func:`mcis_dist.affinity.labels.confident_labels`) on the
  CAMs at full image resolution, optionally CRF-refined (psa);
* ``random_walk`` (kind ``pseudo``, ``masks.*``): AffinityNet's affinities at stride 8 and the
  random walk of the stride-8 CAMs (:func:`mcis_dist.affinity.random_walk.propagate_to_labels`),
  optionally with an ignore margin and a CRF on the walked scores (psa);
* ``saliency`` (kind ``pseudo``): the VOC route, saliency map ``<key>.sal.png`` + CAMs
  (:func:`mcis_dist.affinity.labels.saliency_labels`, paper §3.2);
* ``cams`` (kind ``pseudo``, the baseline): argmax over [``cams.bg_threshold``, CAMs].

Plain numpy / PyTorch, no Ray: :mod:`mcis_dist.masks.stage` runs them over whole splits.
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mcis_dist.affinity.labels import confident_labels, saliency_labels
from mcis_dist.affinity.random_walk import neighbour_offsets, propagate_to_labels, random_walk
from mcis_dist.cams.maps import cam_labels, upsample_cams
from mcis_dist.config import ExperimentConfig
from mcis_dist.crf import crf_inference
from mcis_dist.data.stream import IMAGE_EXTS
from mcis_dist.data.transforms import decode_rgb, normalize
from mcis_dist.errors import reason
from mcis_dist.formats.labels import IGNORE
from mcis_dist.models.build import build_affinity_net

SALIENCY_MEMBER = "sal.png"  # shards/README.md: the image shard's saliency map (grey PNG)

__all__ = [
    "MODES",
    "SALIENCY_MEMBER",
    "LabelMode",
    "RandomWalkLabeller",
    "Sample",
    "SkipSample",
    "cams_label",
    "cams_on_grid",
    "confident_label",
    "make_sample",
    "saliency_label",
]


# ------------------------------------------------------------------------------- one image
class SkipSample(ValueError):
    """An input the stage leaves out; the message is the reason listed in the manifest."""


@dataclass
class Sample:
    """One image and its CAMs, as the label functions see them."""

    key: str
    class_ids: list[int]  # (L,) 0-based class index of each map
    cams: np.ndarray  # (L, ceil(H/s), ceil(W/s)) float32 maps in [0, 1] at stride s
    stride: int
    rgb: np.ndarray  # (H, W, 3) uint8
    saliency: np.ndarray | None = None  # (H, W) uint8

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    def full_cams(self) -> np.ndarray:
        """(L, H, W) float32 maps on the image's pixel grid."""
        return upsample_cams(self.cams, self.stride, self.size)


Labeller = Callable[[Sample], np.ndarray]  # -> (H, W) uint8 label; raises SkipSample


def confident_label(sample: Sample, a) -> np.ndarray:
    """AffinityNet's training label (psa) with ``affinity.*`` settings ``a``."""

    crf = crf_inference if a.crf else None
    cams, ids, rgb = sample.full_cams(), sample.class_ids, sample.rgb
    if a.label_mode == "threshold":
        return confident_labels(
            cams, ids, fg_threshold=a.fg_threshold, bg_threshold=a.bg_threshold, crf=crf, image=rgb
        )
    return confident_labels(cams, ids, a.alpha_low, a.alpha_high, crf=crf, image=rgb)


def saliency_label(sample: Sample) -> np.ndarray:
    """The VOC route's pseudo label (paper §3.2); images it leaves out are skipped."""
    if sample.saliency is None:
        raise SkipSample(f"no saliency map ({SALIENCY_MEMBER}) in the image shard")
    label, keep = saliency_labels(sample.full_cams(), sample.class_ids, sample.saliency)
    if not keep:
        raise SkipSample("foreground under 1% of the image (the saliency route leaves it out)")
    return label


def cams_label(sample: Sample, threshold: float) -> np.ndarray:
    """The baseline: argmax over [threshold, CAMs] at full resolution."""
    return cam_labels(sample.full_cams(), sample.class_ids, threshold)


def cams_on_grid(
    maps: np.ndarray, stride: int, size: tuple[int, int], grid: tuple[int, int], grid_stride: int
) -> Tensor:
    """(L, h, w) maps at ``stride`` -> (L, *grid) on the embedding's grid at ``grid_stride``:
    as they are when the strides agree, else each cell the mean of the image's pixels it covers
    (the last row and column of cells may cover fewer than grid_stride² of them)."""
    if stride == grid_stride and tuple(maps.shape[1:]) == tuple(grid):
        return torch.from_numpy(np.asarray(maps, dtype=np.float32))
    if maps.shape[0] == 0:
        return torch.zeros(0, *grid)
    full = torch.from_numpy(upsample_cams(maps, stride, size))[None]  # (1, L, H, W)
    pad = (0, grid[1] * grid_stride - size[1], 0, grid[0] * grid_stride - size[0])
    sums = F.avg_pool2d(F.pad(full, pad), grid_stride)  # (1, L, *grid), zeros padded
    share = F.avg_pool2d(F.pad(torch.ones_like(full[:, :1]), pad), grid_stride)  # (1, 1, *grid)
    return (sums / share)[0]  # (L, *grid)


class RandomWalkLabeller:
    """AffinityNet + random walk (psa's inference) with ``masks.*`` settings.

    The embedding of the image at scale 1 gives the affinities a(i, i + d) for the offsets d
    of ``masks.radius``; the stride-8 CAMs (resized to that grid if stored at another stride)
    are walked, upsampled and arg-maxed with :func:`propagate_to_labels`. With
    ``ignore_margin`` or ``crf`` the walked scores are needed, so the same steps run through
    :func:`random_walk`; the CRF then refines the scores (normalised to sum to 1), and pixels
    whose best two (refined) scores differ by less than the margin become 255.
    """

    def __init__(self, model, m, mean, std, device: torch.device) -> None:
        self.model, self.m, self.device = model.to(device).eval(), m, device
        self.mean, self.std = tuple(mean), tuple(std)
        self.offsets = neighbour_offsets(m.radius)
        self.stride = int(model.output_stride)

    @torch.no_grad()
    def affinities(self, rgb: np.ndarray) -> Tensor:
        """(H, W, 3) uint8 -> (O, ceil(H/8), ceil(W/8)) affinities, float32."""

        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W)
        feats = self.model(normalize(x.to(self.device), self.mean, self.std))  # (1, D, h, w)
        aff, _ = self.model.affinities(feats, self.offsets)  # (1, O, h, w)
        return aff[0].float()

    def scores(self, cams: Tensor, aff: Tensor, size: tuple[int, int]) -> Tensor:
        """(1 + K, H, W) walked scores (background first): the steps of propagate_to_labels."""
        m = self.m
        if m.background == "power":
            bg = (1 - cams.clamp(0, 1).amax(0, keepdim=True)).pow(m.bg_power)  # (1, h, w)
            walked = random_walk(torch.cat([bg, cams]), aff, self.offsets, m.beta, m.steps)
        else:
            fg = random_walk(cams, aff, self.offsets, m.beta, m.steps)  # (K, h, w)
            peak = fg.flatten(1).amax(1).view(-1, 1, 1)
            fg = torch.where(peak > 0, fg / peak.clamp_min(torch.finfo(fg.dtype).tiny), fg)
            walked = torch.cat([torch.full_like(fg[:1], m.bg_threshold), fg])
        h, w = cams.shape[-2:]
        up = F.interpolate(
            walked[None],
            size=(h * self.stride, w * self.stride),
            mode="bilinear",
            align_corners=False,
        )[0]
        return up[:, : size[0], : size[1]]

    def __call__(self, sample: Sample) -> np.ndarray:
        m, size = self.m, sample.size
        aff = self.affinities(sample.rgb)  # (O, h, w)
        grid = (aff.shape[-2], aff.shape[-1])
        cams = cams_on_grid(sample.cams, sample.stride, size, grid, self.stride)  # (K, h, w)
        cams = cams.to(self.device)
        ids = [k + 1 for k in sample.class_ids]
        if not ids:
            return np.zeros(size, dtype=np.uint8)
        if not m.ignore_margin and not m.crf:
            return (
                propagate_to_labels(
                    cams,
                    aff,
                    self.offsets,
                    size,
                    background=m.background,
                    bg_power=m.bg_power,
                    bg_threshold=m.bg_threshold,
                    beta=m.beta,
                    steps=m.steps,
                    stride=self.stride,
                    class_ids=ids,
                )
                .cpu()
                .numpy()
            )
        scores = self.scores(cams, aff, size).cpu().numpy()  # (1 + K, H, W)
        if m.crf:
            probs = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-5)
            scores = crf_inference(sample.rgb, probs.astype(np.float32))
        label = np.array([0, *ids], dtype=np.uint8)[scores.argmax(axis=0)]
        if m.ignore_margin:
            top2 = np.partition(scores, scores.shape[0] - 2, axis=0)[-2:]  # (2, H, W)
            label[top2[1] - top2[0] < m.ignore_margin] = IGNORE
        return label


def _random_walk_labeller(cfg: ExperimentConfig, state, device) -> Labeller:
    model = build_affinity_net(cfg)
    model.load_state_dict(state)
    return RandomWalkLabeller(model, cfg.masks, cfg.data.mean, cfg.data.std, device)


def _rw_settings(cfg: ExperimentConfig) -> dict:
    m = cfg.masks
    bg = "bg_power" if m.background == "power" else "bg_threshold"
    keys = ("beta", "steps", "radius", "background", bg, "ignore_margin", "crf")
    out = {k: getattr(m, k) for k in keys}
    out["mean"], out["std"] = cfg.data.mean, cfg.data.std
    out["affinity_net"] = {
        "backbone": cfg.affinity.backbone or cfg.model.backbone,
        "head_width": cfg.affinity.head_width,
    }
    return out


def _confident_settings(cfg: ExperimentConfig) -> dict:
    a = cfg.affinity
    alpha = a.label_mode == "alpha"
    keys = ("alpha_low", "alpha_high") if alpha else ("fg_threshold", "bg_threshold")
    return {"label_mode": a.label_mode, **{k: getattr(a, k) for k in keys}, "crf": a.crf}


@dataclass(frozen=True)
class LabelMode:
    """A label mode: its output kind, the settings its labels depend on (the fingerprint's),
    and ``build(cfg, model state or None, device) -> labeller`` run once per actor."""

    kind: str
    settings: Callable[[ExperimentConfig], dict]
    build: Callable[[ExperimentConfig, dict | None, torch.device], Labeller]
    needs_model: bool = False
    needs_saliency: bool = False


_SALIENCY_DEFAULTS = {
    n: p.default
    for n, p in inspect.signature(saliency_labels).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}

MODES: dict[str, LabelMode] = {
    "confident": LabelMode(
        "confident",
        _confident_settings,
        lambda cfg, state, dev: partial(confident_label, a=cfg.affinity),
    ),
    "random_walk": LabelMode("pseudo", _rw_settings, _random_walk_labeller, needs_model=True),
    "saliency": LabelMode(
        "pseudo",
        lambda cfg: dict(_SALIENCY_DEFAULTS),
        lambda cfg, state, dev: saliency_label,
        needs_saliency=True,
    ),
    "cams": LabelMode(
        "pseudo",
        lambda cfg: {"bg_threshold": cfg.cams.bg_threshold},
        lambda cfg, state, dev: partial(cams_label, threshold=cfg.cams.bg_threshold),
    ),
}


def _grey(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def make_sample(raw: dict, meta: dict, maps: np.ndarray, saliency: bool = False) -> Sample:
    """Join an image shard sample with its CAM record; SkipSample for inputs that do not fit."""

    key, labels = meta["key"], [int(k) for k in meta["labels"]]
    data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if data is None:
        raise SkipSample(f"no image member ({', '.join(IMAGE_EXTS)}) for key {key!r}")
    try:
        rgb = decode_rgb(data).permute(1, 2, 0).numpy()  # (H, W, 3)
    except Exception as e:
        raise SkipSample(f"undecodable image: {reason(e)}") from None
    size, stride = [int(rgb.shape[0]), int(rgb.shape[1])], int(meta["stride"])
    if list(meta["size"]) != size:
        raise SkipSample(f"the CAM is for size {list(meta['size'])} but the image is {size}")
    grid = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    if maps.shape != (len(labels), *grid):
        raise SkipSample(
            f"CAM shape {list(maps.shape)} does not fit labels {labels} and "
            f"size {size} at stride {stride}"
        )
    sal = None
    if saliency and SALIENCY_MEMBER in raw:
        try:
            sal = _grey(raw[SALIENCY_MEMBER])
        except Exception as e:
            raise SkipSample(f"undecodable saliency map: {reason(e)}") from None
        if list(sal.shape) != size:
            raise SkipSample(f"saliency map {list(sal.shape)} but the image is {size}")
    return Sample(key, labels, maps.astype(np.float32), stride, rgb, sal)
