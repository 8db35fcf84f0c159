"""Generators of small on-disk datasets in each source layout, bad inputs included."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mcis_dist.shards.sources import VOC_CLASSES

from conftest import encode, jpeg_bytes, noise_image, png_bytes, write

# Per-sample problems every source fixture contains, with words the rejection reason must hold.
BAD_IMAGE_REASONS = {
    "zero": "empty file",
    "text": "not a readable image",
    "trunc": "truncated JPEG",
}


def _mask(w, h, cls: list[int], seed: int) -> np.ndarray:
    """0 background, k+1 for class k in horizontal bands, a 255 border line."""
    m = np.zeros((h, w), dtype=np.uint8)
    band = max(1, h // (len(cls) + 1))
    for i, k in enumerate(cls):
        m[i * band + 2 : (i + 1) * band, 3 : w - 3] = k + 1
    m[-1, :] = 255
    return m


def make_voc(root, n_good: int = 12, with_saliency: bool = True):
    """A VOC2012-style devkit tree. Returns {id: expected 0-based labels} of the good images."""
    voc = root / "VOCdevkit" / "VOC2012"
    expected, train, val = {}, [], []
    for i in range(n_good):
        vid = f"2007_{i:06d}"
        w, h = 48 + i, 40
        write(voc / "JPEGImages" / f"{vid}.jpg", jpeg_bytes(w, h, seed=i))
        cls = sorted({i % 20, (i * 7) % 20})
        if i % 3 != 2:  # two thirds have masks (labels from the mask) ...
            m = _mask(w, h, cls, i)
            pal = Image.fromarray(m, mode="P")
            pal.putpalette([(j * 37) % 256 for j in range(768)])
            write(voc / "SegmentationClass" / f"{vid}.png", encode(pal, "PNG"))
        objs = "".join(f"<object><name>{VOC_CLASSES[k]}</name></object>" for k in cls)
        write(voc / "Annotations" / f"{vid}.xml", f"<annotation>{objs}</annotation>".encode())
        if with_saliency:
            write(voc / "saliency" / f"{vid}.png", png_bytes(noise_image(w, h, channels=1)))
        expected[vid] = cls
        (train if i % 4 else val).append(vid)
    # bad inputs
    bad = {
        "2008_zero": b"",
        "2008_text": b"not a jpeg at all" * 20,
        "2008_trunc": jpeg_bytes(40, 40)[:-200],
    }
    for vid, data in bad.items():
        write(voc / "JPEGImages" / f"{vid}.jpg", data)
        write(
            voc / "Annotations" / f"{vid}.xml",
            b"<annotation><object><name>cat</name></object></annotation>",
        )
        if with_saliency:
            write(voc / "saliency" / f"{vid}.png", png_bytes(noise_image(40, 40, channels=1)))
    write(voc / "JPEGImages" / "2008_unknown.jpg", jpeg_bytes(40, 40))
    write(
        voc / "Annotations" / "2008_unknown.xml",
        b"<annotation><object><name>unicorn</name></object></annotation>",
    )
    write(voc / "JPEGImages" / "2008_badmask.jpg", jpeg_bytes(40, 40))
    write(
        voc / "SegmentationClass" / "2008_badmask.png", png_bytes(np.full((40, 40), 77, np.uint8))
    )
    if with_saliency:
        for vid in ("2008_unknown", "2008_badmask"):
            write(voc / "saliency" / f"{vid}.png", png_bytes(noise_image(40, 40, channels=1)))
    train += list(bad) + ["2008_unknown", "2008_badmask", "2008_missing"]
    sets = voc / "ImageSets" / "Segmentation"
    write(sets / "train.txt", ("\n".join(train) + "\n").encode())
    write(sets / "val.txt", ("\n".join(val) + "\n").encode())
    return root / "VOCdevkit", expected, train, val


def make_list_dataset(root, n_good: int = 10):
    """LID-style list + image root + class list (+ masks for some). Returns paths and truth."""
    classes = [f"n{1000 + k:08d}" for k in range(6)]
    write(root / "classes.txt", ("# LID-style class list\n" + "\n".join(classes) + "\n").encode())
    lines, expected = [], {}
    for i in range(n_good):
        rel = f"{classes[i % 6]}/{classes[i % 6]}_{i}.JPEG"
        cls = sorted({i % 6, (i + 2) % 6}) if i % 2 else [i % 6]
        write(root / "images" / rel, jpeg_bytes(40 + i, 36, seed=100 + i))
        tokens = [classes[k] if k % 2 else str(k) for k in cls]  # names and indices mixed
        lines.append(f"{rel} {' '.join(tokens)}")
        if i < 4:
            write(
                root / "masks" / rel.replace(".JPEG", ".png"), png_bytes(_mask(40 + i, 36, cls, i))
            )
        expected[rel] = cls
    write(root / "images" / "bad" / "zero.JPEG", b"")
    lines += [
        "bad/zero.JPEG 1",
        f"{classes[0]}/{classes[0]}_0.JPEG 0",  # duplicate of the first line
        "bad/unknown.JPEG n99999999",
        "bad/nolabels.JPEG",
        "bad/missing.JPEG 2",
    ]
    write(root / "train.txt", ("\n".join(lines) + "\n").encode())
    return root / "train.txt", root / "images", root / "classes.txt", root / "masks", expected


def make_folder_dataset(root):
    """Web-style class folders with odd names, odd files and an unknown class."""
    write(root / "classes.txt", b"dining_table\nmotorbike\ncat\n")
    expected = {}
    for i in range(4):
        expected[
            write(root / "web" / "Dining Table" / f"{i}.jpg", jpeg_bytes(32, 32, seed=i)).name
        ] = 0
    arr = np.zeros((30, 30, 4), np.uint8)
    arr[..., 3] = 128
    write(root / "web" / "MotorBike" / "alpha.png", png_bytes(arr, mode="RGBA"))
    write(root / "web" / "cat" / "grey.jpg", jpeg_bytes(30, 30, mode="L"))
    write(root / "web" / "cat" / "cmyk.jpg", jpeg_bytes(30, 30, mode="CMYK"))
    deep = (np.arange(900, dtype=np.uint32).reshape(30, 30) * 70).astype(np.uint16)
    write(root / "web" / "cat" / "deep.png", png_bytes(deep))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = encode(Image.fromarray(noise_image(40, 20)), "JPEG", exif=exif.tobytes())
    write(root / "web" / "cat" / "rotated.jpg", rotated)
    write(root / "web" / "cat" / "notes.txt", b"crawler log\n")
    write(root / "web" / "giraffe" / "g.jpg", jpeg_bytes(30, 30))
    return root / "web", root / "classes.txt"
