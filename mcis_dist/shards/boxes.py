"""Bounding boxes as data: reading box files while planning, checking boxes while encoding.

A sample may carry boxes, each ``(class, x0, y0, x1, y1)`` in pixels of its image, **half-open**:
the box covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``, so ``x1 - x0`` is its width
and ``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <= height``. They are stored in the sample's tar as
``<key>.boxes.json`` (``[[class, x0, y0, x1, y1], ...]``, in file order), only for samples with
at least one box; :func:`mcis_dist.formats.shards.decode_boxes` reads them back.

Box files are text, one box per line, fields separated by tabs (or, in a line without a tab, by
any whitespace); blank lines and ``#`` comments are skipped:

* a **box file** (``--boxes FILE``, list and folder sources): ``file class x0 y0 x1 y1``, the
  file relative to the image root (list) or folder root (folder), the class a name from the class
  list or a 0-based index. Tiny-ImageNet's ``val/val_annotations.txt`` is one.
* **per-class files** (``--boxes per-class``, folder source): ``<class>/<class>_boxes.txt`` in
  each class folder, lines ``file x0 y0 x1 y1``, the class being the folder's and the file a
  name in ``<class>/images/`` or ``<class>/``. Tiny-ImageNet's ``train/`` has them.

Coordinates (``--box-coords``): ``inclusive`` (the default) reads ``x1, y1`` as the last column
and row inside the box, as Tiny-ImageNet writes them (``0 .. 63`` on its 64x64 images), and
stores ``x1 + 1, y1 + 1``; ``half-open`` takes them as written. Either way a box must have
``x1 >= x0`` (inclusive) or ``x1 > x0`` (half-open), the same for ``y``.

A bad box line is a rejection listed in the manifest (``<file>:<line>: ...``, saying what was
expected), never a crash, and it costs only that box: the image is kept with its other boxes.
Lines with the wrong number of fields, non-integer coordinates, an unknown class, ``x1 < x0`` or
``y1 < y0``, or negative coordinates are caught while planning; a line naming a file that is not
in the split (missing, not listed, or itself rejected), or a class the image's labels do not
hold, when boxes meet samples; a box reaching past the right or bottom edge while encoding,
when the image's size is known. Boxes are in the stored file's pixel grid, like masks: an image
stored EXIF-rotated has its boxes transposed the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from mcis_dist.formats.shards import BOXES_MEMBER

__all__ = [
    "BOX_COORDS",
    "PER_CLASS",
    "BOXES_MEMBER",
    "BoxLine",
    "read_box_file",
    "per_class_box_file",
    "transpose_box",
    "check_boxes",
    "encode_boxes",
]

BOX_COORDS = ("inclusive", "half-open")
PER_CLASS = "per-class"  # --boxes per-class: <class>/<class>_boxes.txt in each class folder


class BoxLine(NamedTuple):
    """One box as read from a box file: half-open coordinates in the raw file's pixel grid,
    and where it came from (for rejection reasons)."""

    cls: int
    x0: int
    y0: int
    x1: int  # one past the last column
    y1: int  # one past the last row
    origin: str  # "<file>:<line>"
    inclusive: bool  # how the file wrote x1, y1 (to quote them back in reasons)


def per_class_box_file(class_folder: Path) -> Path:
    """Tiny-ImageNet's per-class box file: ``<class>/<class>_boxes.txt``."""
    return class_folder / f"{class_folder.name}_boxes.txt"


def _fields(line: str) -> list[str]:
    return [f.strip() for f in line.split("\t")] if "\t" in line else line.split()


def _coords(tokens: list[str]) -> tuple[int, int, int, int]:
    values = []
    for name, tok in zip(("x0", "y0", "x1", "y1"), tokens, strict=True):
        try:
            values.append(int(tok))
        except ValueError:
            raise ValueError(f"{name} = {tok!r} is not a whole number of pixels") from None
    return values[0], values[1], values[2], values[3]


def read_box_file(
    path: str | os.PathLike,
    coords: str,
    where: str,
    parse_class: Callable[[str], int] | None,
    fixed_class: int | None = None,
    classes_hint: str = "a class of the class list",
) -> tuple[list[tuple[str, BoxLine]], list[tuple[str, str]]]:
    """The boxes of one box file, as ``(file as written, box)`` in file order, and the
    ``(source id, reason)`` of every bad line.

    ``parse_class`` turns a class token into an index (KeyError if unknown): the file has a class
    column (``file class x0 y0 x1 y1``). With ``fixed_class`` instead, lines are
    ``file x0 y0 x1 y1`` and every box is of that class (per-class files). ``where`` names the
    file in reasons (``n01443537/n01443537_boxes.txt``); ``classes_hint`` says what a class
    token may be, for the reason of an unknown one.
    """
    if coords not in BOX_COORDS:
        raise ValueError(f"box coords {coords!r}: expected one of {', '.join(BOX_COORDS)}")
    inclusive = coords == "inclusive"
    layout = "file x0 y0 x1 y1" if parse_class is None else "file class x0 y0 x1 y1"
    want = len(layout.split())
    boxes: list[tuple[str, BoxLine]] = []
    bad: list[tuple[str, str]] = []
    text = Path(path).read_text(encoding="utf-8")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        origin = f"{where}:{lineno}"
        fields = _fields(line)
        sid = fields[0]
        if len(fields) != want:
            bad.append((sid, f"{origin}: {len(fields)} fields, expected {want}: '{layout}'"))
            continue
        if parse_class is None:
            cls = fixed_class
            tokens = fields[1:]
        else:
            try:
                cls = parse_class(fields[1])
            except KeyError:
                bad.append(
                    (sid, f"{origin}: box of unknown class {fields[1]!r} (expected {classes_hint})")
                )
                continue
            tokens = fields[2:]
        try:
            x0, y0, x1, y1 = _coords(tokens)
        except ValueError as e:
            bad.append((sid, f"{origin}: {e} (expected '{layout}', integers)"))
            continue
        if x1 < x0 or y1 < y0 or (not inclusive and (x1 == x0 or y1 == y0)):
            op = "<=" if inclusive else "<"
            bad.append(
                (
                    sid,
                    f"{origin}: box ({x0}, {y0}, {x1}, {y1}) is empty or reversed "
                    f"(expected x0 {op} x1 and y0 {op} y1, {coords} coordinates)",
                )
            )
            continue
        if x0 < 0 or y0 < 0:
            bad.append(
                (
                    sid,
                    f"{origin}: box ({x0}, {y0}, {x1}, {y1}) is outside the image "
                    "(expected x0 >= 0 and y0 >= 0)",
                )
            )
            continue
        extra = 1 if inclusive else 0
        boxes.append((sid, BoxLine(cls, x0, y0, x1 + extra, y1 + extra, origin, inclusive)))
    return boxes, bad


def transpose_box(
    box: tuple[int, int, int, int], op: Image.Transpose, width: int, height: int
) -> tuple[int, int, int, int]:
    """A half-open box ``(x0, y0, x1, y1)`` of a ``width`` x ``height`` image, in the pixel grid
    of ``image.transpose(op)`` (Pillow's ops; ROTATE_90 turns counter-clockwise)."""
    x0, y0, x1, y1 = box
    T = Image.Transpose
    if op == T.FLIP_LEFT_RIGHT:
        return width - x1, y0, width - x0, y1
    if op == T.FLIP_TOP_BOTTOM:
        return x0, height - y1, x1, height - y0
    if op == T.ROTATE_180:
        return width - x1, height - y1, width - x0, height - y0
    if op == T.TRANSPOSE:
        return y0, x0, y1, x1
    if op == T.ROTATE_90:
        return y0, width - x1, y1, width - x0
    if op == T.ROTATE_270:
        return height - y1, x0, height - y0, x1
    if op == T.TRANSVERSE:
        return height - y1, width - x1, height - y0, width - x0
    raise ValueError(f"unsupported transpose {op!r}")


_SWAPS_AXES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE}
_SWAPS_AXES |= {Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}


def check_boxes(
    boxes: Iterable[BoxLine], width: int, height: int, transpose: Image.Transpose | None = None
) -> tuple[list[list[int]], list[str]]:
    """The boxes to store (``[class, x0, y0, x1, y1]``, half-open, in the stored image's grid)
    and a reason for each box that reaches past the image.

    ``width`` x ``height`` is the stored image's size; with ``transpose`` (an EXIF rotation
    applied to the image) boxes are checked in the raw file's grid and then transposed.
    """
    raw_w, raw_h = (height, width) if transpose in _SWAPS_AXES else (width, height)
    kept, bad = [], []
    for b in boxes:
        if b.x1 > raw_w or b.y1 > raw_h:
            extra = 1 if b.inclusive else 0
            written = (b.x0, b.y0, b.x1 - extra, b.y1 - extra)
            limit = (
                f"x1 <= {raw_w - 1} and y1 <= {raw_h - 1}, inclusive"
                if b.inclusive
                else f"x1 <= {raw_w} and y1 <= {raw_h}, half-open"
            )
            bad.append(
                f"{b.origin}: box {written} is outside the {raw_w}x{raw_h} image "
                f"(expected {limit} coordinates)"
            )
            continue
        xyxy = (b.x0, b.y0, b.x1, b.y1)
        if transpose is not None:
            xyxy = transpose_box(xyxy, transpose, raw_w, raw_h)
        kept.append([b.cls, *xyxy])
    return kept, bad


def encode_boxes(boxes: list[list[int]]) -> bytes:
    """The ``boxes.json`` member: ``[[class, x0, y0, x1, y1], ...]``, compact UTF-8 JSON."""
    return json.dumps(boxes, separators=(",", ":")).encode()
