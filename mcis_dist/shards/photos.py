"""A VOC2012-style set of real photos with hand-traced masks, made offline.

The photos ship inside installed packages (no download): scikit-image's ``chelsea`` (a cat),
``astronaut`` (Eileen Collins), ``camera`` (a man behind a camera, greyscale), the stereo pair
``stereo_motorcycle`` (left and right views of one motorcycle), ``coffee`` and ``rocket`` (no VOC
class: background-only tiles), and matplotlib's ``grace_hopper.jpg``.

Their masks are hand-made, VOC style (0 background, k+1 for VOC class k, 255 ignore), so they are
approximate: every outline below was traced by eye on the image drawn over a 50-pixel grid
(polygon vertices and two wheel ellipses in the photo's own pixel coordinates), rasterised with
PIL's ``ImageDraw.polygon`` / ``ellipse``, and a band of ``BAND`` pixels on either side of each
outline (a square dilation minus erosion, PIL's Max/MinFilter) is set to 255 so that the tracing
error is not scored. Also 255: the helmet the astronaut
holds (not part of her) and the red bicycle at the left edge of the motorcycle photos (a VOC
class not labelled here). The right motorcycle view's mask is the left one shifted 50 px to the
left, the motorcycle's disparity in scikit-image's ``motorcycle_disp`` (48-53 px on it).

Needs the ``photos`` extra (scikit-image). Used by ``tests/test_efficientnet.py`` and
``experiments/photos_compare.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mcis_dist.shards.sources import VOC_CLASSES

__all__ = ["COLLAGES", "TEST_COLLAGES", "make_photo_voc", "photos"]

BAND = 8  # ignore band on either side of a traced outline, in pixels of the original photo
CAT, MOTORBIKE, PERSON = (VOC_CLASSES.index(n) + 1 for n in ("cat", "motorbike", "person"))
# Outlines in the photos' own pixel coordinates (x, y), traced by eye over a 50-px grid.
OUTLINES = {
    "cat": [
        (0, 0),
        (398, 0),
        (378, 45),
        (368, 75),
        (362, 110),
        (357, 150),
        (353, 200),
        (350, 250),
        (348, 300),
        (0, 300),
    ],
    "astronaut": [
        (150, 75),
        (160, 40),
        (190, 18),
        (225, 14),
        (265, 24),
        (293, 52),
        (300, 100),
        (290, 140),
        (282, 160),
        (300, 185),
        (305, 230),
        (330, 262),
        (348, 292),
        (358, 322),
        (365, 348),
        (330, 362),
        (298, 388),
        (283, 425),
        (280, 470),
        (285, 512),
        (15, 512),
        (18, 430),
        (22, 380),
        (30, 330),
        (45, 290),
        (70, 262),
        (110, 232),
        (115, 188),
        (140, 162),
        (152, 130),
    ],
    "hopper": [
        (240, 25),
        (200, 35),
        (175, 60),
        (160, 90),
        (150, 130),
        (160, 170),
        (160, 200),
        (165, 250),
        (175, 290),
        (190, 322),
        (150, 345),
        (90, 370),
        (40, 400),
        (20, 440),
        (10, 500),
        (10, 600),
        (512, 600),
        (512, 420),
        (490, 390),
        (440, 360),
        (370, 330),
        (350, 300),
        (360, 250),
        (370, 200),
        (372, 140),
        (360, 100),
        (350, 70),
        (330, 40),
        (290, 25),
    ],
    "camera": [
        (200, 65),
        (240, 70),
        (262, 95),
        (265, 130),
        (255, 150),
        (260, 175),
        (300, 172),
        (325, 172),
        (330, 190),
        (320, 215),
        (305, 235),
        (280, 245),
        (255, 250),
        (250, 280),
        (225, 300),
        (180, 310),
        (150, 320),
        (150, 512),
        (0, 512),
        (0, 240),
        (30, 170),
        (80, 135),
        (130, 110),
        (160, 95),
    ],
    "moto": [
        (95, 200),
        (150, 178),
        (148, 158),
        (175, 152),
        (250, 168),
        (330, 185),
        (360, 175),
        (380, 160),
        (440, 155),
        (470, 165),
        (480, 150),
        (500, 125),
        (520, 115),
        (560, 125),
        (585, 130),
        (585, 140),
        (560, 160),
        (545, 190),
        (520, 200),
        (510, 215),
        (530, 250),
        (560, 265),
        (630, 275),
        (640, 300),
        (600, 300),
        (520, 290),
        (470, 300),
        (470, 340),
        (440, 375),
        (400, 380),
        (350, 380),
        (340, 400),
        (345, 440),
        (320, 440),
        (315, 380),
        (290, 360),
        (250, 330),
        (200, 300),
        (160, 260),
        (110, 245),
        (100, 230),
    ],
    "moto_handlebar": [(350, 165), (480, 115), (485, 125), (355, 177)],
}
MOTO_WHEELS = [((200, 320), (80, 80)), ((597, 365), (87, 85))]  # (centre, radii) of the ellipses
IGNORE = {
    "astronaut": [
        (285, 512),
        (280, 455),
        (295, 400),
        (330, 365),
        (380, 345),
        (430, 345),
        (470, 365),
        (500, 400),
        (512, 430),
        (512, 512),
    ],  # the helmet she holds
    "moto": [(0, 130), (50, 130), (50, 235), (0, 235)],  # the red bicycle at the left edge
}
MOTO_DISPARITY = 50
SINGLES = ("cat", "astronaut", "hopper", "camera", "moto_l", "moto_r")
COLLAGES = (  # two photos in one image; coffee and rocket hold no VOC class (background)
    ("cat", "astronaut"),
    ("hopper", "cat"),
    ("cat", "camera"),
    ("cat", "moto_l"),
    ("moto_r", "cat"),
    ("astronaut", "moto_l"),
    ("moto_r", "astronaut"),
    ("hopper", "moto_l"),
    ("moto_r", "hopper"),
    ("camera", "moto_l"),
    ("moto_r", "camera"),
    ("cat", "coffee"),
    ("rocket", "cat"),
    ("astronaut", "coffee"),
    ("rocket", "hopper"),
    ("camera", "coffee"),
    ("moto_l", "rocket"),
    ("coffee", "moto_r"),
)
TEST_COLLAGES = (
    ("cat", "astronaut"),
    ("moto_r", "cat"),
    ("hopper", "moto_l"),
    ("rocket", "cat"),
    ("camera", "coffee"),
    ("coffee", "moto_r"),
)


def _raster(size: tuple[int, int], polygons=(), ellipses=()) -> np.ndarray:
    """(H, W) bool: the union of the polygons and (centre, radii) ellipses."""
    h, w = size
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon(poly, fill=1)
    for (cx, cy), (rx, ry) in ellipses:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    return np.asarray(img, dtype=bool)


def _voc_mask(fg: np.ndarray, value: int, ignore: np.ndarray | None = None) -> np.ndarray:
    mask = np.where(fg, value, 0).astype(np.uint8)
    img = Image.fromarray(fg.astype(np.uint8) * 255)
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(2 * BAND + 1))) > 0  # square dilation
    shrunk = np.asarray(img.filter(ImageFilter.MinFilter(2 * BAND + 1))) > 0  # and erosion
    mask[grown & ~shrunk] = 255  # the traced outline +- BAND pixels is not scored
    if ignore is not None:
        mask[ignore] = 255
    return mask


def photos() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (RGB uint8 (H, W, 3), VOC mask uint8 (H, W)) for every photo, at full size."""
    import matplotlib.cbook  # lazy: only the photo set needs matplotlib's sample data
    from skimage import data  # lazy: the photos extra

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = np.asarray(im.convert("RGB"))
    left, right, _disparity = data.stereo_motorcycle()
    out = {}
    for name, rgb, value in (
        ("cat", data.chelsea(), CAT),
        ("astronaut", data.astronaut(), PERSON),
        ("hopper", hopper, PERSON),
        ("camera", np.stack([data.camera()] * 3, axis=-1), PERSON),
    ):
        size = rgb.shape[:2]
        ignore = _raster(size, [IGNORE[name]]) if name in IGNORE else None
        out[name] = (rgb, _voc_mask(_raster(size, [OUTLINES[name]]), value, ignore))
    size = left.shape[:2]
    fg = _raster(size, [OUTLINES["moto"], OUTLINES["moto_handlebar"]], MOTO_WHEELS)
    ignore = _raster(size, [IGNORE["moto"]])
    out["moto_l"] = (left, _voc_mask(fg, MOTORBIKE, ignore))
    fg_r, ignore_r = np.zeros_like(fg), np.zeros_like(ignore)  # the right view: shifted left
    fg_r[:, :-MOTO_DISPARITY], ignore_r[:, :-MOTO_DISPARITY] = (
        fg[:, MOTO_DISPARITY:],
        ignore[:, MOTO_DISPARITY:],
    )
    out["moto_r"] = (right, _voc_mask(fg_r, MOTORBIKE, ignore_r))
    for name in ("coffee", "rocket"):  # background only
        rgb = getattr(data, name)()
        out[name] = (rgb, np.zeros(rgb.shape[:2], dtype=np.uint8))
    return out


def _resize(rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]):
    """To (w, h): bilinear for the photo, nearest for the mask."""
    return (
        np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)),
        np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)),
    )


def _width(rgb: np.ndarray, height: int) -> int:
    """The width that keeps the photo's aspect at ``height``."""
    return round(height * rgb.shape[1] / rgb.shape[0])


def _collage(a, b, tile: int):
    """Two photos side by side (same height) or stacked (same width), whichever is squarer."""
    (ha, wa), (hb, wb) = a[0].shape[:2], b[0].shape[:2]
    side = wa / ha + wb / hb  # aspect (w / h) side by side, at a common height
    stacked = 1 / (ha / wa + hb / wb)  # aspect stacked, at a common width
    if abs(math.log(side)) <= abs(math.log(stacked)):
        axis, sizes = 1, [(_width(r, tile), tile) for r, _ in (a, b)]
    else:
        axis, sizes = 0, [(tile, round(tile * r.shape[0] / r.shape[1])) for r, _ in (a, b)]
    parts = [_resize(r, m, size) for (r, m), size in zip((a, b), sizes, strict=True)]
    return (
        np.concatenate([p[0] for p in parts], axis=axis),
        np.concatenate([p[1] for p in parts], axis=axis),
    )


def make_photo_voc(root: Path, *, tile: int = 224, collages=COLLAGES) -> dict[str, list[int]]:
    """A VOC2012-style tree (JPEGImages, SegmentationClass, ImageSets/Segmentation/train.txt) of
    the single photos (height ``tile``) and two-photo collages (each photo ``tile`` high or
    wide). Returns {image id: sorted 0-based VOC labels}."""
    shots = photos()
    images = {}
    for name in SINGLES:
        rgb, mask = shots[name]
        images[f"photo_{name}"] = _resize(rgb, mask, (_width(rgb, tile), tile))
    for a, b in collages:
        images[f"collage_{a}_{b}"] = _collage(shots[a], shots[b], tile)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    for vid, (rgb, mask) in images.items():
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{vid}.jpg", quality=92)
        Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{vid}.png")
        labels[vid] = sorted(int(v) - 1 for v in np.unique(mask) if v not in (0, 255))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(images) + "\n")
    return labels
