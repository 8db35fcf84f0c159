"""Image, mask and saliency checks: originals kept, odd inputs normalised, bad ones rejected."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from mcis_dist.shards.images import (
    ImageError,
    check_image,
    check_mask,
    check_saliency,
    mask_labels,
)

from conftest import encode, jpeg_bytes, noise_image, png_bytes


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize(
    "data, ext",
    [
        (jpeg_bytes(80, 60), "jpg"),
        (jpeg_bytes(80, 60, mode="L"), "jpg"),
        (png_bytes(noise_image(80, 60)), "png"),
        (png_bytes(noise_image(80, 60, channels=1)), "png"),
    ],
    ids=["rgb-jpeg", "grey-jpeg", "rgb-png", "grey-png"],
)
@pytest.mark.parametrize("verify", ["header", "full"])
def test_plain_images_keep_their_original_bytes(data, ext, verify):
    out = check_image(data, verify=verify)
    assert out.data is data and out.normalised is None
    assert (out.ext, out.width, out.height) == (ext, 80, 60)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n" * 10, "not a readable image"),
        (jpeg_bytes(80, 60)[:-300], "truncated JPEG"),
        (png_bytes(noise_image(80, 60))[:-40], "truncated PNG"),
    ],
    ids=["zero-byte", "text", "truncated-jpeg", "truncated-png"],
)
def test_bad_files_are_rejected_with_the_reason(data, words):
    with pytest.raises(ImageError, match=words):
        check_image(data, "photo.jpg")


def _png_with_bad_idat() -> bytes:
    """A PNG whose header and IEND are fine but whose pixel data is corrupt."""
    data = bytearray(png_bytes(noise_image(64, 64)))
    start = data.index(b"IDAT") + 4 + 20
    data[start : start + 40] = bytes(40)
    return bytes(data)


def test_corrupt_pixel_data_needs_full_verification():
    data = _png_with_bad_idat()
    assert check_image(data, verify="header").data == data  # header and tail look fine
    with pytest.raises(ImageError, match="fails to decode"):
        check_image(data, verify="full")


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    bomb = _png_header_only(60000, 60000)  # 3.6 gigapixels announced in a few hundred bytes
    assert len(bomb) < 1000
    with pytest.raises(ImageError, match=r"60000x60000 .* above the limit"):
        check_image(bomb, verify="full")
    with pytest.raises(ImageError, match="limit of 0.0 MP"):
        check_image(jpeg_bytes(100, 100), max_pixels=5000)


def test_cmyk_jpeg_becomes_rgb_jpeg():
    src = encode(Image.fromarray(noise_image(64, 48)).convert("CMYK"), "JPEG", quality=95)
    out = check_image(src)
    assert (out.ext, out.normalised) == ("jpg", "cmyk")
    got = decode(out.data)
    assert got.shape == (48, 64, 3)
    want = np.asarray(Image.open(io.BytesIO(src)).convert("RGB"), dtype=np.int16)
    assert np.abs(got.astype(np.int16) - want).mean() < 5  # one JPEG (q95) round trip of noise


def test_16bit_png_is_scaled_to_8_bits():
    arr16 = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 31).astype(np.uint16)
    out = check_image(png_bytes(arr16))
    assert (out.ext, out.normalised) == ("png", "16-bit")
    got = decode(out.data)
    want = np.clip(np.round(arr16.astype(np.float64) * 255 / 65535), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red-ish, right half fully transparent
    out = check_image(png_bytes(rgba, mode="RGBA"))
    assert out.normalised == "alpha"
    got = decode(out.data)
    assert got.shape == (20, 30, 3)
    np.testing.assert_array_equal(got[:, :15], np.broadcast_to([200, 0, 0], (20, 15, 3)))
    np.testing.assert_array_equal(got[:, 15:], np.full((20, 15, 3), 255))


def test_palette_and_other_formats_become_png():
    pal = Image.fromarray(noise_image(40, 30)).convert("P")
    out = check_image(encode(pal, "PNG"))
    assert (out.ext, out.normalised) == ("png", "palette")
    np.testing.assert_array_equal(decode(out.data), np.asarray(pal.convert("RGB")))
    bmp = Image.fromarray(noise_image(40, 30))
    out = check_image(encode(bmp, "BMP"))
    assert (out.ext, out.normalised) == ("png", "format")
    np.testing.assert_array_equal(decode(out.data), np.asarray(bmp))


def _exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_is_applied_to_image_and_mask(orientation):
    arr = noise_image(60, 40)
    data = _exif_jpeg(arr, orientation)
    out = check_image(data)
    assert out.normalised == "exif-rotated" and out.ext == "jpg"
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert (out.width, out.height) == want.size
    assert np.abs(decode(out.data).astype(int) - np.asarray(want).astype(int)).mean() < 4
    # The mask comes in the stored (raw) grid and must follow the same transpose.
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:10, :20] = 3
    _, got = check_mask(png_bytes(mask), out, num_classes=5)
    want_mask = np.asarray(ImageOps.exif_transpose(_tagged(mask, orientation)))
    np.testing.assert_array_equal(got, want_mask)


def _tagged(mask: np.ndarray, orientation: int) -> Image.Image:
    img = Image.fromarray(mask)
    img.getexif()[0x0112] = orientation
    return img


def test_mask_validation():
    image = check_image(jpeg_bytes(30, 20))
    good = np.zeros((20, 30), dtype=np.uint8)
    good[5:10, 5:10], good[0, :] = 2, 255
    png, arr = check_mask(png_bytes(good), image, num_classes=3)
    np.testing.assert_array_equal(decode(png), good)
    assert mask_labels(arr, 3) == [1]
    with pytest.raises(ImageError, match="value 9 .* 3 classes"):
        check_mask(png_bytes(np.full((20, 30), 9, np.uint8)), image, num_classes=3)
    with pytest.raises(ImageError, match="31x20 but its image is 30x20"):
        check_mask(png_bytes(np.zeros((20, 31), np.uint8)), image, num_classes=3)
    with pytest.raises(ImageError, match="mode RGB"):
        check_mask(png_bytes(np.zeros((20, 30, 3), np.uint8)), image, num_classes=3)


def test_palette_mask_keeps_indices_not_colours():
    idx = np.zeros((20, 30), dtype=np.uint8)
    idx[2:8, 3:9], idx[10:, :] = 1, 255
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * (253 * 3) + [224, 224, 192])
    image = check_image(jpeg_bytes(30, 20))
    png, arr = check_mask(encode(pal, "PNG"), image, num_classes=20)
    np.testing.assert_array_equal(arr, idx)
    stored = Image.open(io.BytesIO(png))
    assert stored.mode == "L"
    np.testing.assert_array_equal(np.asarray(stored), idx)


def test_saliency_checks_size_and_stores_grey():
    image = check_image(jpeg_bytes(30, 20))
    sal = noise_image(30, 20, channels=1)
    assert check_saliency(png_bytes(sal), image) == png_bytes(sal)
    rgb = check_saliency(png_bytes(noise_image(30, 20)), image)
    assert Image.open(io.BytesIO(rgb)).mode == "L"
    with pytest.raises(ImageError, match="saliency map is 10x20"):
        check_saliency(png_bytes(np.zeros((20, 10), np.uint8)), image)
