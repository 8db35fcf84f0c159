"""Built-in "synthetic" WSSS dataset: multi-label images with pixel-exact masks.

No real data can be downloaded where the demo and tests run, so this module draws a deterministic,
procedurally generated dataset that still exercises what Mining Cross-Image Semantics is about.

Design:

* **Discriminative head vs shared body.**  Every object is a class-specific shape whose *head*
  (a slice of 25-35% of its area, cut off by a random half-plane) carries the class colour and
  pattern, while the *body* (the rest) carries a texture shared by every class of the object's
  context group (and also used by background distractors).  A global-average-pooling classifier
  only needs the head to tell classes apart, so its CAMs cover objects partially -- the failure
  mode that cross-image co-attention is meant to fix.  The mask still labels the WHOLE object.
* **Context groups.**  Classes form groups (``CONTEXT_GROUPS``); after the first object, each
  further object comes from the first object's group with probability 0.7, so same-group classes
  co-occur far more often than under independent choice.
* **Clutter and occlusion.**  Backgrounds are a low-frequency colour field with noise, random
  lines, blobs and distractor polygons (class 0 in the mask).  Objects have 15-60% of the short side
  as diameter and are painted in order (later ones on top); an object must keep at least 30% of
  its area and 25% of its head visible, else the newcomer is re-placed (or finally dropped).
* **Determinism.**  Each sample uses ``numpy.random.default_rng(SeedSequence([seed, split, index]))``
  so the same (spec, split, index) gives byte-identical arrays in any order and any process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mcis_dist.config import ExperimentConfig

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
    "crescent",
)
SYNTHETIC_SPLITS: tuple[str, ...] = ("train", "val")
# Context groups (class indices): round things, boxy things, pointy things.
CONTEXT_GROUPS: tuple[tuple[int, ...], ...] = ((0, 4, 7), (1, 5, 6), (2, 3))
CONTEXT_PROB = 0.7  # chance that a further object is drawn from the first object's group
_GROUP_OF = {c: g for g, group in enumerate(CONTEXT_GROUPS) for c in group}

# Heads: saturated class colour alternating with near-black in a class-specific pattern.
_HEAD_RGB = (
    (230, 40, 40),
    (245, 140, 20),
    (240, 220, 40),
    (40, 200, 60),
    (30, 200, 220),
    (40, 70, 235),
    (220, 50, 200),
    (255, 150, 190),
)
_HEAD_DARK = (25, 25, 25)
_HEAD_PATTERN = (  # (kind, period in px, angle in degrees)
    ("stripes", 6, 0),
    ("checker", 6, 0),
    ("stripes", 5, 45),
    ("dots", 7, 0),
    ("stripes", 4, 90),
    ("stripes", 6, 135),
    ("checker", 4, 45),
    ("rings", 5, 0),
)
# Bodies: muted group colour alternating with a darker shade (factor _BODY_DARK) in a group pattern.
_BODY_RGB = ((165, 135, 100), (105, 120, 140), (120, 130, 75))
_BODY_DARK = 0.78
_BODY_PATTERN = (("stripes", 12, 30), ("checker", 14, 0), ("stripes", 10, 120))

_MIN_DIAM, _MAX_DIAM = 0.15, 0.60  # object diameter as a fraction of the short side
_MIN_VISIBLE, _MIN_HEAD_VISIBLE, _MIN_PIXELS = 0.30, 0.25, 100
_PLACE_TRIES = 6


@dataclass(frozen=True)
class SyntheticSpec:
    num_train: int = 600
    num_val: int = 150
    min_size: int = 128
    max_size: int = 176
    max_objects: int = 3
    num_classes: int = 8  # <= len(SYNTHETIC_CLASSES); uses the first num_classes names
    ignore_border: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(
                f"num_classes={self.num_classes} out of range; expected 1..{len(SYNTHETIC_CLASSES)}"
            )
        if self.min_size < 32 * max(1, self.ignore_border):  # objects must outlive outlines
            raise ValueError(
                f"min_size={self.min_size} too small for ignore_border={self.ignore_border};"
                " expected min_size >= 32 * max(1, ignore_border)"
            )
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size={self.min_size} > max_size={self.max_size}; expected min_size <= max_size"
            )
        for name in ("num_train", "num_val", "ignore_border", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is negative; expected >= 0")
        if self.max_objects < 1:
            raise ValueError(f"max_objects={self.max_objects} invalid; expected >= 1")

    def num_samples(self, split: str) -> int:
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SYNTHETIC_SPLITS}")
        return self.num_train if split == "train" else self.num_val


@dataclass
class SyntheticSample:
    key: str  # "synth_<split>_<index:06d>"
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, k+1 class k, 255 ignore
    labels: list[int]  # sorted unique 0-based classes visible in the mask


def class_names(spec: SyntheticSpec) -> list[str]:
    return list(SYNTHETIC_CLASSES[: spec.num_classes])


def _choose_classes(rng: np.random.Generator, n: int, num_classes: int) -> list[int]:
    classes = [int(rng.integers(num_classes))]
    group = CONTEXT_GROUPS[_GROUP_OF[classes[0]]]
    mates = [c for c in group if c != classes[0] and c < num_classes]
    for _ in range(n - 1):
        fresh = [c for c in mates if c not in classes]
        if rng.random() < CONTEXT_PROB and mates:
            classes.append(int(rng.choice(fresh or mates)))
        else:
            classes.append(int(rng.integers(num_classes)))
    return classes


def _unit_polygons(cls: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Class shape as (points (N, 2) in unit radius, fill 255 or 0) polygons painted in order."""

    def ngon(n: int, radii: np.ndarray | float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
        t = phase + np.arange(n) * 2 * math.pi / n
        return np.stack([np.cos(t), np.sin(t)], 1) * np.reshape(radii, (-1, 1))  # (n, 2)

    aspect = rng.uniform(0.75, 1.0)
    ellipse = ngon(36) * [1.0, aspect]
    if cls == 0:  # disc
        return [(ellipse, 255)]
    if cls == 1:  # square / rectangle
        return [(ngon(4, phase=math.pi / 4) * [1.0, aspect], 255)]
    if cls == 2:  # triangle
        return [(ngon(3), 255)]
    if cls == 3:  # five-pointed star
        return [(ngon(10, np.tile([1.0, 0.45], 5)), 255)]
    if cls == 4:  # ring
        return [(ellipse, 255), (ellipse * 0.55, 0)]
    if cls == 5:  # plus-shaped cross, arm half-width a
        a = 0.32
        right = np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1)])  # (6, 2)
        return [(np.concatenate([right, -right]), 255)]
    if cls == 6:  # hexagon
        return [(ngon(6, phase=0.0), 255)]
    if cls == 7:  # crescent: disc minus an offset disc
        return [(ngon(36), 255), (ngon(36) * 0.8 + [0.5, 0.0], 0)]
    raise AssertionError(cls)


def _paint_polygons(polys, cx: float, cy: float, r: float, rot: float, h: int, w: int):
    """Rasterise unit polygons scaled by r, rotated by rot, at (cx, cy) -> (H, W) bool."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    rmat = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    for pts, fill in polys:
        xy = pts @ rmat.T * r + [cx, cy]  # (N, 2)
        draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)
    return np.asarray(canvas) > 0  # (H, W)


def _pattern(kind: str, period: float, angle: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean "dark" pattern at pixel coordinates x, y (same shape)."""
    t = math.radians(angle)
    u = x * math.cos(t) + y * math.sin(t)
    v = -x * math.sin(t) + y * math.cos(t)
    half = period / 2
    if kind == "stripes":
        return np.floor(u / half) % 2 == 1
    if kind == "checker":
        return (np.floor(u / half) + np.floor(v / half)) % 2 == 1
    if kind == "dots":
        du, dv = u % period - half, v % period - half
        return du * du + dv * dv < (0.32 * period) ** 2
    if kind == "rings":
        return np.floor(np.sqrt(u * u + v * v) / half) % 2 == 1
    raise AssertionError(kind)


def _fill(img, sel, light, dark, pattern, origin, rng) -> None:
    """Paint pixels sel ((H, W) bool) of img ((H, W, 3) float32) with a two-tone pattern."""
    ys, xs = np.nonzero(sel)
    kind, period, angle = pattern
    dark_px = _pattern(kind, period, angle + rng.uniform(-10, 10), xs - origin[0], ys - origin[1])
    gain = rng.uniform(0.9, 1.1)
    img[ys, xs] = np.where(dark_px[:, None], dark, light).astype(np.float32) * gain  # (N, 3)


def _muted(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.uniform(50, 200) + rng.uniform(-30, 30, 3), 0, 255)  # (3,)


def _background(rng: np.random.Generator, h: int, w: int, short: int) -> np.ndarray:
    """Cluttered background -> (H, W, 3) float32."""
    coarse = np.clip(rng.uniform(70, 190, (4, 4, 1)) + rng.uniform(-25, 25, (4, 4, 3)), 0, 255)
    field = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR)
    canvas = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(2, 6))):  # blobs
        cx, cy, rx, ry = rng.uniform(0, w), rng.uniform(0, h), *rng.uniform(4, short / 6, 2)
        canvas.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(_muted(rng).astype(int)))
    for _ in range(int(rng.integers(3, 9))):  # lines
        (x0, x1), (y0, y1), colour = rng.uniform(0, w, 2), rng.uniform(0, h, 2), _muted(rng)
        fill, width = tuple(colour.astype(int)), int(rng.integers(1, 5))
        canvas.line([(x0, y0), (x1, y1)], fill=fill, width=width)
    img = np.asarray(field, dtype=np.float32)  # (H, W, 3)
    img = img + rng.normal(0, 9, (h, w, 1)) + rng.normal(0, 5, (h, w, 3))  # grain
    for _ in range(int(rng.integers(1, 4))):  # distractor polygons (irregular blobs, bars)
        r = rng.uniform(0.08, 0.2) * short
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.5:
            n = int(rng.integers(5, 9))
            t = np.sort(rng.uniform(0, 2 * math.pi, n))
            pts = np.stack([np.cos(t), np.sin(t)], 1) * rng.uniform(0.5, 1.0, (n, 1))  # (n, 2)
        else:
            pts = np.array([[-1, -0.18], [1, -0.18], [1, 0.18], [-1, 0.18]])
        sel = _paint_polygons([(pts, 255)], cx, cy, r, rng.uniform(0, 2 * math.pi), h, w)
        if rng.random() < 0.4:  # a group's body texture, so bodies are not object-specific
            g = int(rng.integers(len(_BODY_RGB)))
            light = np.array(_BODY_RGB[g], np.float32)
            _fill(img, sel, light, light * _BODY_DARK, _BODY_PATTERN[g], (cx, cy), rng)
        else:
            light = _muted(rng)
            _fill(img, sel, light, light * 0.7, ("stripes", 8, rng.uniform(0, 180)), (cx, cy), rng)
    return img


def _place(rng, cls: int, h: int, w: int, short: int, near, min_r: float):
    """One candidate object (near an earlier one's centre if given) -> (shape, head, (cx, cy))."""
    r = max(rng.uniform(_MIN_DIAM, _MAX_DIAM) * short / 2, min_r)  # tiny images: survive borders
    cx, cy = rng.uniform(0.6 * r, w - 0.6 * r), rng.uniform(0.6 * r, h - 0.6 * r)
    if near is not None:  # cluster objects so that occlusion is common
        cx, cy = np.clip(near + rng.normal(0, 0.25 * short, 2), 0.6 * r, [w - 0.6 * r, h - 0.6 * r])
    shape = _paint_polygons(_unit_polygons(cls, rng), cx, cy, r, rng.uniform(0, 2 * math.pi), h, w)
    ys, xs = np.nonzero(shape)
    t = rng.uniform(0, 2 * math.pi)
    proj = xs * math.cos(t) + ys * math.sin(t)  # (N,) position along the head direction
    head = np.zeros_like(shape)
    if proj.size:
        keep = proj >= np.quantile(proj, 1.0 - rng.uniform(0.25, 0.35))
        head[ys[keep], xs[keep]] = True
    return shape, head, (cx, cy)


def _edges(labels: np.ndarray, b: int) -> np.ndarray:
    """(H, W) label map -> (H, W) bool: pixels within b (Chebyshev) of a different label."""
    h, w = labels.shape
    padded = np.pad(labels, b, mode="edge")
    edge = np.zeros((h, w), bool)
    for dy in range(-b, b + 1):
        for dx in range(-b, b + 1):
            edge |= padded[b + dy : b + dy + h, b + dx : b + dx + w] != labels
    return edge


def synthetic_sample(spec: SyntheticSpec, split: str, index: int) -> SyntheticSample:
    n = spec.num_samples(split)  # validates split
    if not 0 <= index < n:
        raise ValueError(f"index={index} out of range for split {split!r}; expected 0..{n - 1}")
    rng = np.random.default_rng([spec.seed, SYNTHETIC_SPLITS.index(split), index])  # SeedSequence
    h, w = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, 2))
    short = min(h, w)
    min_px = min(_MIN_PIXELS, max(20, short * short // 320))  # inner pixels per object
    img = _background(rng, h, w, short)  # (H, W, 3) float32

    n_obj = int(rng.integers(1, spec.max_objects + 1))
    check_b = max(1, spec.ignore_border)  # objects must keep min_px pixels outside the outline
    inst = np.full((h, w), -1, np.int16)  # (H, W) topmost object index, -1 background
    objs: list[tuple[int, np.ndarray, np.ndarray, tuple[float, float]]] = []
    for cls in _choose_classes(rng, n_obj, spec.num_classes):
        for _ in range(_PLACE_TRIES if objs else 4 * _PLACE_TRIES):  # the first one must fit
            near = objs[int(rng.integers(len(objs)))][3] if objs and rng.random() < 0.5 else None
            shape, head, origin = _place(rng, cls, h, w, short, near, 3.0 + 3.0 * check_b)
            trial = inst.copy()
            trial[shape] = len(objs)
            inner = np.where(_edges(trial, check_b), -1, trial)  # (H, W) outlines dropped
            if (
                all(
                    (trial == k).sum() >= _MIN_VISIBLE * s.sum()
                    and ((trial == k) & hd).sum() >= _MIN_HEAD_VISIBLE * hd.sum()
                    for k, (_, s, hd, _) in enumerate(objs)
                )
                and np.bincount(inner.ravel() + 1, minlength=len(objs) + 2)[1:].min() >= min_px
            ):
                inst = trial
                objs.append((cls, shape, head, origin))
                break

    for cls, shape, head, origin in objs:  # paint in order: later objects occlude earlier ones
        g = _GROUP_OF[cls]
        body_rgb = np.array(_BODY_RGB[g], np.float32)
        _fill(img, shape & ~head, body_rgb, body_rgb * _BODY_DARK, _BODY_PATTERN[g], origin, rng)
        head_rgb = np.array(_HEAD_RGB[cls], np.float32)
        _fill(img, head, head_rgb, np.array(_HEAD_DARK), _HEAD_PATTERN[cls], origin, rng)
    img += rng.normal(0, 4, img.shape)  # sensor noise over everything
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)  # (H, W, 3)

    lut = np.array([0] + [c + 1 for c, *_ in objs], np.uint8)
    mask = lut[inst + 1]  # (H, W)
    mask[_edges(inst, spec.ignore_border)] = 255  # VOC-style ignore outlines, also between objects
    labels = sorted(int(v) - 1 for v in np.unique(mask) if v not in (0, 255))
    return SyntheticSample(f"synth_{split}_{index:06d}", image, mask, labels)


def synthetic_spec(cfg: ExperimentConfig) -> SyntheticSpec:
    """The built-in dataset's spec from an experiment's ``synthetic`` section."""
    s = cfg.synthetic
    return SyntheticSpec(
        num_train=s.num_train,
        num_val=s.num_val,
        min_size=s.min_size,
        max_size=s.max_size,
        num_classes=s.num_classes,
        seed=s.seed,
    )
