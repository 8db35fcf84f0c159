"""Checking and, only where needed, normalising encoded images and masks for the shards.

The rule is to keep the original bytes: a baseline RGB or greyscale JPEG or 8-bit PNG is stored
exactly as it came (no decode, no re-encode, no quality loss). Only inputs that the readers
downstream would decode wrongly or differently are re-encoded, and each sample records why
(``normalised`` in its JSON), so the manifest can count them:

============  ==============================================================================
reason        what is done
============  ==============================================================================
exif-rotated  EXIF orientation applied (JPEG, quality 95); an attached mask gets the same
              transpose: masks are taken to be in the stored pixel grid, as VOC's are
cmyk          CMYK/YCCK JPEG converted to RGB (JPEG, quality 95)
16-bit        16/32-bit integer or float image scaled to 8 bits (PNG)
alpha         transparency composited on white (PNG)
palette       palette image expanded to RGB (PNG)
format        any other format Pillow reads (BMP, TIFF, WebP, GIF...) stored as PNG
============  ==============================================================================

Rejected (``ImageError``, the message is the reason listed in the manifest): zero-byte,
unidentifiable or non-image files, images above the pixel limit (decompression bombs are caught
from the header alone, before any decode), truncated JPEG/PNG streams, and - with
``verify="full"`` - any stream that fails to decode completely.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "ImageError",
    "CheckedImage",
    "DEFAULT_MAX_PIXELS",
    "check_image",
    "check_mask",
    "check_saliency",
    "encode_png",
    "mask_labels",
]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112
# Pillow's transpose for each EXIF orientation value (ImageOps.exif_transpose uses the same).
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_SWAPS_AXES = {
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
}


class ImageError(ValueError):
    """A sample's image, mask or saliency map cannot be used; the message is the reason."""


@dataclass
class CheckedImage:
    data: bytes  # the bytes to store
    ext: str  # "jpg" or "png"
    width: int
    height: int
    normalised: str | None  # None when ``data`` is the original bytes
    transpose: Image.Transpose | None = None  # applied to the image; apply it to masks too


def encode_png(array_or_image, compress_level: int = 3) -> bytes:
    img = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4, no chroma loss
    return buf.getvalue()


def _open(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(f"{what} is an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # our own limit below, from the header alone
            try:
                img = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except Exception as e:  # PIL raises many types for garbage input
        raise ImageError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of "
            f"{max_pixels / 1e6:.1f} MP (--max-pixels); refusing to decode it"
        )
    if w == 0 or h == 0:
        raise ImageError(f"{what} has an empty size {w}x{h}")
    return img


def _check_complete(data: bytes, fmt: str, what: str) -> None:
    """Cheap truncation check from the stream's tail: JPEG must hold its EOI marker (FF D9)
    near the end (entropy-coded data never contains FF D9), PNG must end with its IEND chunk."""
    tail = data[-1024:]
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise ImageError(f"{what} is a truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail[-64:]:
        raise ImageError(f"{what} is a truncated PNG (no IEND chunk)")


def _full_decode(img: Image.Image, what: str) -> None:
    try:
        img.load()
    except Exception as e:
        raise ImageError(f"{what} fails to decode ({type(e).__name__}: {e})") from None


def _to_rgb8(img: Image.Image) -> tuple[Image.Image, str]:
    """Convert an image that cannot be stored as-is into 8-bit RGB (or L); return the reason."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)  # (H, W)
        peak = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L"), "16-bit"
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), "alpha"
    if mode == "P":
        return img.convert("RGB"), "palette"
    if mode == "CMYK" or mode == "YCbCr":
        return img.convert("RGB"), "cmyk"
    if mode == "1":
        return img.convert("L"), "format"
    if mode in ("RGB", "L"):
        return img, "format"
    return img.convert("RGB"), "format"


def check_image(
    data: bytes, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS, verify: str = "header"
) -> CheckedImage:
    """Validate one encoded image; return the bytes to store (the original ones when possible).

    ``verify="header"`` reads only the header and the stream's tail (fast: the build runs at
    file-copy speed); ``verify="full"`` decodes every pixel, catching corruption inside the
    entropy-coded data too.
    """
    if verify not in ("header", "full"):
        raise ValueError(f"verify={verify!r}: expected 'header' or 'full'")
    img = _open(data, what, max_pixels)
    fmt = img.format
    if fmt in ("JPEG", "PNG"):
        _check_complete(data, fmt, what)
    orientation = 1
    if fmt == "JPEG":
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:
            orientation = 1  # unreadable EXIF: keep the stored pixel grid
    keep = fmt in ("JPEG", "PNG") and img.mode in ("RGB", "L") and orientation in (0, 1)
    if keep:
        if verify == "full":
            _full_decode(img, what)
        w, h = img.size
        return CheckedImage(data, "jpg" if fmt == "JPEG" else "png", w, h, None)

    _full_decode(img, what)  # normalising decodes anyway
    transpose = _ORIENTATION_OPS.get(orientation)
    if transpose is not None:
        out = img.transpose(transpose)
        if out.mode not in ("RGB", "L"):
            out = out.convert("RGB")
        w, h = out.size
        return CheckedImage(_encode_jpeg(out), "jpg", w, h, "exif-rotated", transpose)
    out, reason = _to_rgb8(img)
    w, h = out.size
    if fmt == "JPEG":  # a CMYK/YCCK JPEG: stay lossy, as the source was
        return CheckedImage(_encode_jpeg(out), "jpg", w, h, reason)
    return CheckedImage(encode_png(out), "png", w, h, reason)


def _read_index_map(data: bytes, what: str, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    img = _open(data, what, max_pixels)
    _full_decode(img, what)
    if img.mode not in ("L", "P"):
        raise ImageError(
            f"{what} must be a single-channel PNG of class indices (mode L or P), got mode {img.mode}"
        )
    if img.size != size:
        raise ImageError(
            f"{what} is {img.size[0]}x{img.size[1]} but its image is {size[0]}x{size[1]}"
        )
    return np.asarray(img, dtype=np.uint8)  # (H, W); for mode P these are the palette indices


def check_mask(
    data: bytes,
    image: CheckedImage,
    num_classes: int,
    what: str = "mask",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, np.ndarray]:
    """Validate a segmentation mask (0 background, k+1 class k, 255 ignore) against its image.

    Returns the PNG to store (always mode L: a palette PNG would be colour-expanded by some
    decoders) and the (H, W) uint8 array. Masks are in the stored pixel grid of the image, so an
    EXIF transpose applied to the image is applied to its mask too.
    """
    size = (image.width, image.height)
    if image.transpose in _SWAPS_AXES:
        size = (image.height, image.width)  # the mask is in the raw (pre-rotation) grid
    arr = _read_index_map(data, what, size, max_pixels)
    bad = np.unique(arr[(arr > num_classes) & (arr != 255)])
    if bad.size:
        raise ImageError(
            f"{what} has value {int(bad[0])} but there are {num_classes} classes "
            f"(valid: 0 background, 1..{num_classes}, 255 ignore)"
        )
    if image.transpose is not None:
        arr = np.asarray(Image.fromarray(arr).transpose(image.transpose))
    return encode_png(Image.fromarray(arr, mode="L")), arr


def mask_labels(mask: np.ndarray, num_classes: int) -> list[int]:
    """Image-level labels from a mask: the 0-based classes present (background, ignore dropped)."""
    values = np.unique(mask)
    return [int(v) - 1 for v in values if 1 <= v <= num_classes]


def check_saliency(
    data: bytes,
    image: CheckedImage,
    what: str = "saliency map",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    """Validate a saliency map (grey, 0..255, same size as the image); store it as an L PNG."""
    img = _open(data, what, max_pixels)
    _full_decode(img, what)
    if img.size != (image.width, image.height):
        raise ImageError(
            f"{what} is {img.size[0]}x{img.size[1]} but its image is {image.width}x{image.height}"
        )
    if img.format == "PNG" and img.mode == "L":
        return data
    return encode_png(img.convert("L"))
