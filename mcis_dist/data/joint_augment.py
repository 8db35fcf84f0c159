"""Augmenting an image and its per-pixel label map together, so pixels and labels stay aligned:
one random rescale (bilinear image, nearest-exact label), horizontal flip and crop, the image
padded with the mean colour and the label with 255 (ignored) where the crop is larger than the
image. The random draws come from the caller's generator (seeded per sample for exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mcis_dist.formats.labels import IGNORE

__all__ = ["JointAugmentSpec", "augment_with_box", "joint_augment"]


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
