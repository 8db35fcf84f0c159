"""Training augmentation for the classifier: random rescale of the long side, horizontal flip,
colour jitter, crop (padded with the mean colour) to a square, ImageNet normalisation.

Every random choice comes from a generator seeded per sample (see ``sample_seed``), so an image's
augmentation depends only on (seed, epoch, pass, key): a loader replaying a stream to resume
produces exactly the same pixels without having decoded them the first time.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentSpec:
    """Augmentation parameters (from the experiment config's ``data`` section)."""

    crop_size: int = 256
    resize_long: tuple[int, int] = (256, 512)  # the long side is rescaled to U[lo, hi] pixels
    hflip: bool = True
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)  # b, c, s, hue
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fill: tuple[int, int, int] = field(init=False)

    def __post_init__(self):
        lo, hi = self.resize_long
        if not 0 < lo <= hi:
            raise ValueError(f"resize_long={self.resize_long}: expected 0 < lo <= hi")
        if self.crop_size <= 0:
            raise ValueError(f"crop_size={self.crop_size}: expected a positive size")
        object.__setattr__(self, "fill", tuple(int(round(m * 255)) for m in self.mean))


def sample_seed(seed: int, epoch: int, cycle: int, key: str) -> list[int]:
    """The seed sequence of one sample's augmentation (stable across processes and runs)."""
    return [seed, epoch, cycle, zlib.crc32(key.encode("utf-8"))]


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG bytes → (3, H, W) uint8. Raises on undecodable data."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W)


def decode_rgb_array(data: bytes) -> np.ndarray:
    """Encoded JPEG/PNG bytes → (H, W, 3) uint8 numpy (for figures)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """An encoded mask PNG (grey or palette: the pixel values are class indices) → (H, W)
    uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L") if im.mode not in ("L", "P") else im, dtype=np.uint8)


def augment(img: torch.Tensor, spec: AugmentSpec, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) uint8 → (3, S, S) uint8, S = spec.crop_size."""
    _, h, w = img.shape
    lo, hi = spec.resize_long
    target = int(rng.integers(lo, hi + 1))
    scale = target / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = TF.resize(img, [nh, nw], antialias=True)
    if spec.hflip and rng.random() < 0.5:
        img = TF.horizontal_flip(img)
    b, c, s, hue = spec.color_jitter
    if b or c or s or hue:
        factors = (
            float(rng.uniform(max(0.0, 1 - b), 1 + b)) if b else 1.0,
            float(rng.uniform(max(0.0, 1 - c), 1 + c)) if c else 1.0,
            float(rng.uniform(max(0.0, 1 - s), 1 + s)) if s else 1.0,
            float(rng.uniform(-hue, hue)) if hue else 0.0,
        )
        img = color_jitter(img, *factors)
    return random_crop(img, spec.crop_size, spec.fill, rng)


# RGB -> YIQ (NTSC). Y is the luma torchvision's grayscale uses, so saturation and hue below leave
# a grey pixel grey.
_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=torch.float64,
)


def jitter_matrix(brightness: float, contrast: float, saturation: float, hue: float):
    """(A, k): colour jitter as one affine map, x' = A x + k * mean_luma(x).

    brightness multiplies; contrast blends with the image's mean luma (torchvision's
    definitions); saturation blends each pixel with its luma (torchvision's); hue rotates the
    chroma plane of YIQ by ``hue`` turns (as DALI's hsv does; torchvision shifts H in HSV,
    which is close but costs a non-linear round trip). Composed in that order, the map is
    linear up to the contrast term, so the whole jitter costs one 3x3 product per pixel.
    """
    theta = -2 * np.pi * hue  # sign: a positive hue turns red towards yellow, as torchvision
    rot = torch.tensor(
        [[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]],
        dtype=torch.float64,
    )
    luma = _YIQ[0:1]  # (1, 3)
    sat = saturation * torch.eye(3, dtype=torch.float64) + (1 - saturation) * luma.expand(3, 3)
    chroma = torch.linalg.inv(_YIQ) @ rot @ _YIQ @ sat
    return chroma * (brightness * contrast), (1 - contrast) * brightness


def color_jitter(img: torch.Tensor, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
    """(3, H, W) uint8 → (3, H, W) uint8 with the jitter of :func:`jitter_matrix`."""
    a, k = jitter_matrix(brightness, contrast, saturation, hue)
    x = img.float()  # (3, H, W)
    mean_luma = (_YIQ[0].float() @ x.flatten(1)).mean()
    out = torch.einsum("ij,jhw->ihw", a.float(), x) + k * mean_luma
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_crop(img: torch.Tensor, size: int, fill, rng: np.random.Generator) -> torch.Tensor:
    """A size×size window at a random place; a smaller image sits at a random place inside a
    canvas of the mean colour (so padding normalises to zero)."""
    _, h, w = img.shape  # (3, H, W)
    out = torch.empty((3, size, size), dtype=img.dtype)
    out[:] = torch.tensor(fill, dtype=img.dtype).view(3, 1, 1)
    ch, cw = min(h, size), min(w, size)
    sy = int(rng.integers(0, h - ch + 1))  # source window
    sx = int(rng.integers(0, w - cw + 1))
    dy = int(rng.integers(0, size - ch + 1))  # destination offset
    dx = int(rng.integers(0, size - cw + 1))
    out[:, dy : dy + ch, dx : dx + cw] = img[:, sy : sy + ch, sx : sx + cw]
    return out


def normalize(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 → float32, ImageNet-normalised, on the batch's device."""
    m = torch.tensor(mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (batch.float() - m) / s
