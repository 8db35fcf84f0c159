"""Localization maps of one image: single-round or co-attentive, multi-scale × flip (§3.2).

Plain PyTorch, no Ray: ``CamEngine.cams(rgb, labels, key)`` returns one max-normalised map per
labelled class. The Ray stage (``mcis_dist.cams.stage``) calls it for every image of a shard.

For each test scale s the image is resized to s·(H, W) and run with its mirror image as one
batch of 2; each raw map is flipped back, passed through ReLU, resized to the output grid
(ceil(H / out_stride), ceil(W / out_stride)) and summed over scales and flips; each class's sum
is finally divided by its own maximum (``normalize_cam``), so maps lie in [0, 1]. With
``normalize="minmax"`` the raw maps are summed without the ReLU and each class's sum is mapped to
[0, 1] by its own minimum and maximum (``minmax_cam``; the score maps of Choe et al., CVPR 2020,
for box scores): a class whose evidence is negative everywhere still gets a map.

* ``single``: S_n[k] = phi(F_n)[k] (Eq. 1); with ``class_layer="phi_co"``, phi_co(F_n)[k]
  instead: the layer trained on co-attentive features applied to the image's own features, a
  control that separates what co-attention taught the class layer from what the related
  images add at inference.
* ``coattentive``: for each labelled class k, |R| related images holding k are drawn (seeded by
  the image's key; ``RelatedSampler``); the map is 1/|R| Σ_r phi_co(F_n^{n∩r})[k]
  (``coattentive_map``). A class no other image holds falls back to S_n[k] (counted).
  Options: ``contrastive`` also averages in contrastive maps against |R| images without k
  (``contrastive_map``); ``self_pairs`` adds the image's own flip, 0.75× and 2× copies to every
  class's related set (the authors' code); ``related_classes="other"`` is a control: the |R|
  related images hold none of the image's classes (what co-attention adds from images that
  share nothing with it).

* ``authors``: the authors' test-time code. A pair (x, v) is one forward of their model:
  co_map1 = phi_co(F_x^{x∩v}) on x's grid (read from v), co_map2 = phi_co(F_v^{x∩v}) on v's
  grid (read from x). For each labelled class k, five maps on x's feature grid: (1) co_map1 of
  (x, mirror image); (2) co_map2 of that pair, flipped back; (3) co_map2 of (x, 0.75x copy), the
  copy's map read from x, resized bicubically to x's grid; (4) likewise with the 2x copy; (5)
  the mean of co_map1 of (x, r) over K related images r of k (drawn with replacement, x itself
  allowed). Map 1 is ReLU'd and divided by (its maximum + 1e-8); maps 2-5 are added, normalised
  alike, only when sigmoid(mean of the raw map) (the co-attentive score, Eq. 5) exceeds
  ``authors_gate`` (0.1); the sum is divided by 5 (not by the number kept). With ``square`` = S,
  x, its copies (int(0.75 S), 2 S) and the related images are square resizes of the original
  image, as the authors' loader (S = 256); without it x keeps its size, the copies are rescaled
  and the related images take a long side of ``related_size``. Two deliberate differences from
  the authors: the maps stay float (no x255 and uint8 truncation of the sum), and the final
  resize is the bilinear one to the output grid (theirs: cubic to the image size). ``scales``
  and ``flip`` are unused.

With ``class_scores=True`` (the CAM stage) every ``cams`` call also leaves the classifier's
single-image class scores over all K classes in ``last_scores``: GAP(phi(F_n)) of Eq. 1 on the
unflipped image at scale 1 when 1 is one of ``scales``, else at the first listed scale (single
and coattentive modes: the features of a scale the maps use, no extra backbone pass; authors
mode: scale 1, its own forward's features unless ``square``). The stage stores the top-1 and
top-5 classes from them (top-1 localization and classification in ``mcis eval cams``).

Related images are resized to a long side of ``related_size`` (authors mode with ``square``: to
square x square); their features are kept in a bounded LRU cache (``FeatureCache``, keyed by
sample and size), so an image drawn by many queries is decoded and encoded once per actor.

Over 400 lines because the three map modes share one engine, its cache and its sizes.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mcis_dist.data.pairs import DOMAIN_IDS, pair_type
from mcis_dist.data.transforms import decode_rgb, normalize
from mcis_dist.models.mcis import (
    MCISClassifier,
    coattentive_map,
    contrastive_map,
    contribution_map,
    minmax_cam,
    normalize_cam,
)

__all__ = [
    "CamSettings",
    "FeatureCache",
    "CamEngine",
    "resize_long",
    "authors_maps",
    "top_classes",
]

MODES = ("single", "coattentive", "authors")


@dataclass
class CamSettings:
    mode: str = "coattentive"  # single | coattentive | authors
    related: int = 3
    contrastive: bool = False
    self_pairs: bool = False
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    flip: bool = True
    out_stride: int = 8
    related_size: int = 256
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    amp: bool = True
    square: int | None = None
    authors_gate: float = 0.1
    readout: str = "feature"  # coattentive mode: feature (phi_co of F^{n∩r}) | contribution
    readout_layer: str = "phi_co"  # ... read with phi_co (Eq. 5) | phi (Eq. 1)
    class_layer: str = "phi"  # single mode (and fallbacks): phi (S_n) | phi_co
    related_classes: str = "same"  # coattentive: related images hold k | none of the labels
    normalize: str = "relu_max"  # ReLU each scale, / peak | min-max of the raw sum (boxes)

    @classmethod
    def from_config(cls, cfg) -> CamSettings:
        c = cfg.cams
        return cls(
            mode=c.mode,
            related=c.related,
            contrastive=c.contrastive,
            self_pairs=c.self_pairs,
            scales=tuple(c.scales),
            flip=c.flip,
            out_stride=c.out_stride,
            related_size=c.related_size or cfg.data.crop_size,
            mean=tuple(cfg.data.mean),
            std=tuple(cfg.data.std),
            amp=c.amp,
            square=c.square,
            authors_gate=c.authors_gate,
            readout=c.readout,
            class_layer=c.class_layer,
            related_classes=c.related_classes,
            readout_layer=c.readout_layer,
            normalize=c.normalize,
        )


@dataclass
class FeatureCache:
    """LRU cache of feature tensors, bounded by their total bytes (0: caches nothing)."""

    max_bytes: int
    hits: int = 0
    misses: int = 0
    _items: OrderedDict = field(default_factory=OrderedDict)
    _bytes: int = 0

    def get(self, key):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key, value) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        if key in self._items:
            self._bytes -= _nbytes(self._items.pop(key))
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= _nbytes(old)

    def stats(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self._items),
            "mb": round(self._bytes / 2**20, 1),
        }


def _nbytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value) if isinstance(value, tuple) else 64


def resize_long(x: Tensor, long_side: int) -> Tensor:
    """(B, 3, H, W) -> the same aspect with max(H, W) = long_side (bilinear)."""
    h, w = x.shape[-2:]
    s = long_side / max(h, w)
    return F.interpolate(
        x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False
    )


def _square(x: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size) (bilinear), the authors' square test-time resize."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _rescale(x: Tensor, s: float) -> Tensor:
    if s == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CamEngine:
    """Computes the maps of one image at a time with a loaded classifier (eval mode).

    Args:
        model: the trained classifier, on ``device``, in eval mode.
        settings: ``CamSettings``.
        sampler: a ``RelatedSampler`` over the split (co-attentive mode only).
        cache_bytes: bound of the related-feature cache (0: no cache).
        class_scores: also compute the single-image class scores of every mapped image
            (``last_scores``, module docstring).
    """

    def __init__(
        self,
        model: MCISClassifier,
        settings: CamSettings,
        sampler=None,
        device: torch.device | str = "cpu",
        cache_bytes: int = 0,
        class_scores: bool = False,
    ) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {settings.mode!r}")
        if settings.mode in ("coattentive", "authors") and sampler is None:
            raise ValueError(f"{settings.mode} maps need a RelatedSampler")
        self.model, self.s, self.sampler = model, settings, sampler
        self.device = torch.device(device)
        self.cache = FeatureCache(cache_bytes)
        self.counts = {"fallback_classes": 0, "fallback_images": 0, "related_bad": 0}
        self.class_scores = class_scores
        self.last_scores: Tensor | None = None  # (K,) float32 on the CPU, of the last image

    # ---- pieces ---------------------------------------------------------------------------
    def _autocast(self):
        on_gpu = self.device.type == "cuda" and self.s.amp
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=on_gpu)

    def prepare(self, rgb: Tensor) -> Tensor:
        """(3, H, W) uint8 -> (1, 3, H, W) normalised float on the device."""
        return normalize(rgb.unsqueeze(0).to(self.device), self.s.mean, self.s.std)

    def features(self, x: Tensor) -> Tensor:
        with self._autocast():
            return self.model.backbone(x).float()

    def related_features(self, g: int, square: int | None = None) -> tuple[Tensor, int] | None:
        """(features (1, C, h', w'), domain id) of sample g of the split, resized to a long side
        of ``related_size`` (or to ``square`` x ``square``), cached by (g, square); None if its
        image cannot be read or decoded (counted)."""
        hit = self.cache.get((g, square))
        if hit is not None:
            return hit
        try:
            sample = self.sampler.read(g)
            meta = json.loads(sample["json"])
            x = self.prepare(decode_rgb(sample.get("jpg", sample.get("png"))))  # (1, 3, H, W)
            x = _square(x, square) if square else resize_long(x, self.s.related_size)
        except Exception:
            self.counts["related_bad"] += 1
            return None
        item = (self.features(x), DOMAIN_IDS.get(meta.get("domain", "target"), 0))
        self.cache.put((g, square), item)
        return item

    def _flip_batch(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.flip(-1)]) if self.s.flip else x

    def _accumulate(self, total: Tensor, maps: Tensor, out_size) -> Tensor:
        """maps (B, L, h, w) raw (B = 1 or 2 with the flip) -> total += Σ_B up(ReLU(maps))
        (without the ReLU for ``normalize="minmax"``)."""
        if self.s.flip:
            maps = torch.stack([maps[0], maps[1].flip(-1)])
        maps = maps.float() if self.s.normalize == "minmax" else F.relu(maps.float())
        up = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
        return total + up.sum(dim=0)

    # ---- the maps -------------------------------------------------------------------------
    @torch.no_grad()
    def cams(self, rgb: Tensor, labels, key: str = "", domain: int = 0) -> tuple[Tensor, list[int]]:
        """Maps of the labelled classes: (L, ceil(H/s), ceil(W/s)) float32 in [0, 1] (s the
        output stride), in the order of ``labels``; and the classes that fell back to S_n."""
        labels = [int(k) for k in labels]
        self.last_scores = None
        x = self.prepare(rgb)  # (1, 3, H, W)
        h, w = x.shape[-2:]
        out_size = (math.ceil(h / self.s.out_stride), math.ceil(w / self.s.out_stride))
        if self.s.mode == "authors":
            maps = self._authors(x, labels, key, out_size)
            self._ensure_scores(x)
            return maps, []
        related, fallback = self._related_sets(x, labels, key, domain)
        total = x.new_zeros((len(labels), *out_size))
        score_scale = 1.0 if 1.0 in self.s.scales else self.s.scales[0]
        for scale in self.s.scales:
            feats = self.features(self._flip_batch(_rescale(x, scale)))  # (B, C, h, w)
            if self.class_scores and scale == score_scale and self.last_scores is None:
                self.last_scores = self._single_scores(feats[:1])
            with self._autocast():
                maps = torch.stack(
                    [self._class_map(feats, k, related.get(k)) for k in labels], dim=1
                )  # (B, L, h, w)
            total = self._accumulate(total, maps, out_size)
        if fallback:
            self.counts["fallback_classes"] += len(fallback)
            self.counts["fallback_images"] += 1
        self._ensure_scores(x)
        if self.s.normalize == "minmax":
            return minmax_cam(total), fallback
        return normalize_cam(total), fallback

    def _single_scores(self, feats: Tensor) -> Tensor:
        """(1, C, h, w) features -> (K,) single-image class scores GAP(phi(F)) (Eq. 1; phi is
        a 1x1 convolution, so it is applied to the pooled features)."""
        pooled = feats.float().mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
        return self.model.phi(pooled).flatten().float().cpu()

    def _ensure_scores(self, x: Tensor) -> None:
        """``last_scores`` of the image x (1, 3, H, W) when asked for and not yet computed."""
        if self.class_scores and self.last_scores is None:
            self.last_scores = self._single_scores(self.features(x))

    def _authors(self, x: Tensor, labels: list[int], key: str, out_size) -> Tensor:
        """The ``authors`` mode's maps (L, out_h, out_w) in [0, 1] (see the module docstring)."""
        sq = self.s.square
        if sq:  # the authors' loader: every view a square resize of the original image
            x, small, big = (_square(x, s) for s in (sq, int(sq * 0.75), 2 * sq))
        else:
            small, big = _rescale(x, 0.75), _rescale(x, 2.0)
        feats = self.features(x)  # (1, C, h, w)
        if self.class_scores and not sq:  # x unresized: its features are scale 1's
            self.last_scores = self._single_scores(feats)
        copies = [self.features(v) for v in (x.flip(-1), small, big)]
        related = {}
        for k in labels:
            got = [
                self.related_features(g, sq)
                for g in self.sampler.draw(k, self.s.related, key, replace=True)
            ]
            related[k] = [f for f, _ in (i for i in got if i is not None)]
        with self._autocast():
            maps = authors_maps(self.model, feats, copies, related, labels, self.s.authors_gate)
        return F.interpolate(
            maps[None].float(), size=out_size, mode="bilinear", align_corners=False
        )[0]

    def _class_map(self, feats: Tensor, k: int, rel) -> Tensor:
        """(B, h, w) raw map of class k: S_n[k], or the co-attentive (+ contrastive) average."""
        if rel is None:  # single-round mode, or no other image holds k
            phi = self.model.phi_co if self.s.class_layer == "phi_co" else self.model.phi
            bias = None if phi.bias is None else phi.bias[k : k + 1]
            return F.conv2d(feats, phi.weight[k : k + 1], bias)[:, 0]
        pos, neg = rel
        layer = self.s.readout_layer
        if self.s.readout == "feature":
            maps = [coattentive_map(self.model, feats, f, k, t, layer=layer) for f, t in pos]
        else:
            obj = self.s.readout == "object"
            evidence = "minmax" if self.s.normalize == "minmax" else "raw"
            maps = [
                contribution_map(
                    self.model, feats, f, k, t, layer=layer, from_object=obj, evidence=evidence
                )
                for f, t in pos
            ]
        maps += [contrastive_map(self.model, feats, f, k, t) for f, t in neg]
        return torch.stack(maps).mean(dim=0)

    def _related_sets(self, x: Tensor, labels: list[int], key: str, domain: int):
        """class -> (related [(feats, pair type)], others [(feats, pair type)]) and fallbacks."""
        if self.s.mode != "coattentive":
            return {}, []
        domains = self.model.domains

        def typed(item):
            feats, d = item
            return feats, (pair_type(domain, d) if domains == 3 else None)

        own = []
        if self.s.self_pairs:  # the authors' self-pair copies: flip, 0.75x, 2x
            own_type = 0 if domains == 3 else None
            own = [
                (self.features(v), own_type)
                for v in (x.flip(-1), _rescale(x, 0.75), _rescale(x, 2.0))
            ]
        related, fallback = {}, []
        for k in labels:
            if self.s.related_classes == "other":  # the control: images sharing no class
                drawn = self.sampler.draw_unrelated(labels, self.s.related, key, salt=k)
            else:
                drawn = self.sampler.draw(k, self.s.related, key)
            got = [self.related_features(g) for g in drawn]
            pos = [typed(i) for i in got if i is not None]
            neg = []
            if self.s.contrastive:
                others = self.sampler.draw_without(k, self.s.related, key)
                neg = [typed(i) for i in map(self.related_features, others) if i is not None]
            if not pos:
                fallback.append(k)
                continue
            related[k] = (pos + own, neg)
        return related, fallback


def _max_normalise(m: Tensor) -> Tensor:
    """ReLU, then divide by (the map's own maximum + 1e-8), as the authors' ``aggregate``
    (an all-zero map stays 0): (h, w)."""
    m = F.relu(m.float())
    return m / (m.amax() + 1e-8)


@torch.no_grad()
def authors_maps(
    model: MCISClassifier,
    feats: Tensor,
    copies: list[Tensor],
    related: dict[int, list[Tensor]],
    labels: list[int],
    gate: float = 0.1,
) -> Tensor:
    """The authors' five-map aggregation on backbone features (module docstring, ``authors``).

    Args:
        feats: (1, C, h, w) features of the image x.
        copies: features of x's mirror image, 0.75x and 2x copies, each (1, C, ., .).
        related: class k -> features of its related images, each (1, C, ., .) (may be empty:
            map 5 is then 0).
        labels: the classes to map.
        gate: maps 2-5 count only when sigmoid(mean of the raw map) > gate.
    Returns:
        (L, h, w) maps on x's grid, the sum of the kept normalised maps divided by 5.
    """
    grid = feats.shape[-2:]
    if not labels:
        return feats.new_zeros((0, *grid), dtype=torch.float32)
    pt = 0 if model.domains == 3 else None  # with three W_P: the target-target one
    w = model.phi_co.weight[labels].to(feats.dtype)  # (L, C, 1, 1)
    b = None if model.phi_co.bias is None else model.phi_co.bias[labels].to(feats.dtype)

    def phi(f: Tensor) -> Tensor:  # (1, C, h', w') -> (L, h', w') float
        return F.conv2d(f, w, b)[0].float()

    def to_grid(m: Tensor) -> Tensor:  # (L, h', w') -> (L, h, w), their bicubic upsample
        return F.interpolate(m[None], size=grid, mode="bicubic", align_corners=False)[0]

    flip, small, big = copies
    x_from_flip, flip_from_x = model.coattentive_features(feats, flip, pt)  # co_map1, co_map2
    small_from_x = model.coattentive_features(feats, small, pt)[1]  # (1, C, hs, ws)  co_map2
    big_from_x = model.coattentive_features(feats, big, pt)[1]  # (1, C, hb, wb)  co_map2
    raw = [
        phi(x_from_flip),  # (L, h, w)
        phi(flip_from_x).flip(-1),
        to_grid(phi(small_from_x)),
        to_grid(phi(big_from_x)),
    ]
    out = []
    for i, k in enumerate(labels):
        rel = [phi(model.coattentive_features(feats, r, pt)[0])[i] for r in related.get(k, [])]
        maps = [m[i] for m in raw]
        maps.append(torch.stack(rel).mean(0) if rel else torch.zeros_like(maps[0]))  # (h, w)
        total = _max_normalise(maps[0])
        for m in maps[1:]:
            if torch.sigmoid(m.mean()) > gate:
                total = total + _max_normalise(m)
        out.append(total / 5)
    return torch.stack(out)


def top_classes(scores: Tensor, k: int = 5) -> list[int]:
    """The indices of the ``k`` highest class scores (K,), highest first; ties: lower index."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return [int(i) for i in order[:k]]
