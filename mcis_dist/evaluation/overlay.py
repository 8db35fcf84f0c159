"""Pictures for evaluation: VOC colours, CAM heat maps, overlays, boxes and a captioned grid.

PIL and numpy only. Images are RGB uint8 arrays (H, W, 3) or PIL images; label maps are
integer arrays (H, W) with 255 for ignored pixels; boxes are half-open pixel boxes
(x0, y0, x1, y1).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Cell = Image.Image | np.ndarray

IGNORE_COLOUR = (255, 255, 255)
TRUE_BOX_COLOUR = (0, 255, 0)  # ground-truth boxes: green
PREDICTED_BOX_COLOUR = (255, 0, 255)  # a map's predicted box: magenta (not in the heat map)
CAPTION_HEIGHT = 14  # pixels of the caption band under each cell row (when captions are given)
PAD = 4  # pixels between cells and around the grid


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n, 3) uint8: bits of the label interleaved into R, G, B."""
    idx = np.arange(n)
    cmap = np.zeros((n, 3), dtype=np.uint8)
    c = idx.copy()
    for j in range(8):
        for ch in range(3):
            cmap[:, ch] |= (((c >> ch) & 1) << (7 - j)).astype(np.uint8)
        c >>= 3
    return cmap


_PALETTE = palette(256)


def colorize(label_map: np.ndarray) -> Image.Image:
    """Label map (H, W) -> RGB image in VOC colours, 255 (ignore) in white."""
    lm = np.asarray(label_map)
    if lm.ndim != 2 or lm.dtype.kind not in "iu":
        raise ValueError(f"label_map must be an integer (H, W) array, got {lm.dtype} {lm.shape}")
    if lm.size and (lm.min() < 0 or lm.max() > 255):
        raise ValueError(f"label_map values must be in [0, 255], got [{lm.min()}, {lm.max()}]")
    rgb = _PALETTE[lm.astype(np.int64)]  # (H, W, 3)
    rgb[lm == 255] = IGNORE_COLOUR
    return Image.fromarray(rgb, mode="RGB")


def heatmap(score: np.ndarray) -> np.ndarray:
    """Score map (H, W) in [0, 1] -> jet-like RGB (H, W, 3) uint8: blue, cyan, yellow, red.

    Each channel is a tent 1.5 - |4x - c| clipped to [0, 1] (c = 3, 2, 1 for R, G, B).
    Values are clipped to [0, 1]; NaN counts as 0.
    """
    x = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0)
    if x.ndim != 2:
        raise ValueError(f"score must be (H, W), got shape {x.shape}")
    x = np.clip(x, 0.0, 1.0)[..., None]  # (H, W, 1)
    centres = np.array([3.0, 2.0, 1.0])  # R, G, B
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)  # (H, W, 3)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _rgb(a: Cell, what: str) -> np.ndarray:
    """PIL image or uint8 array (H, W) / (H, W, 3) -> uint8 (H, W, 3)."""
    if isinstance(a, Image.Image):
        return np.asarray(a.convert("RGB"))
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise TypeError(f"{what} must be a PIL image or a uint8 array, got dtype {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    raise ValueError(f"{what} must be (H, W) or (H, W, 3), got shape {a.shape}")


def blend(image_rgb: Cell, overlay_rgb: Cell, alpha: float = 0.5) -> np.ndarray:
    """(1 - alpha) * image + alpha * overlay, both (H, W, 3) of the same size -> uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _rgb(image_rgb, "image_rgb").astype(np.float32)
    ov = _rgb(overlay_rgb, "overlay_rgb").astype(np.float32)
    if img.shape != ov.shape:
        raise ValueError(f"image shape {img.shape} != overlay shape {ov.shape}")
    out = (1.0 - alpha) * img + alpha * ov
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """Scale to fit cell x cell, keeping the aspect ratio (nearest when enlarging)."""
    w, h = img.size
    scale = min(cell / w, cell / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return img
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    return img.resize(size, resample)


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, cut and ended with '..' if needed, to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def grid_size(rows: Sequence[Sequence[object]], cell: int, captions: bool) -> tuple[int, int]:
    """(width, height) in pixels of the grid ``save_grid`` writes for these rows."""
    ncols = max(len(r) for r in rows)
    band = CAPTION_HEIGHT if captions else 0
    return ncols * cell + (ncols + 1) * PAD, len(rows) * (cell + band) + (len(rows) + 1) * PAD


def save_grid(
    rows: Sequence[Sequence[Cell | None]],
    path: str | os.PathLike,
    captions: Sequence[Sequence[str]] | None = None,
    cell: int = 160,
) -> Path:
    """Lay the cells out in a grid (each scaled to fit cell x cell, captions underneath) and
    write a PNG atomically (a temporary file in the same folder, then os.replace).

    A None cell stays blank; rows may have different lengths. Returns the path written.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("save_grid needs at least one non-empty row")
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    if captions is not None and [len(c) for c in captions] != [len(r) for r in rows]:
        raise ValueError(
            f"captions {[len(c) for c in captions]} must match the row lengths "
            f"{[len(r) for r in rows]}"
        )
    width, height = grid_size(rows, cell, captions is not None)
    band = CAPTION_HEIGHT if captions is not None else 0
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, row in enumerate(rows):
        y = PAD + i * (cell + band + PAD)
        for j, item in enumerate(row):
            x = PAD + j * (cell + PAD)
            if item is not None:
                img = _fit(Image.fromarray(_rgb(item, f"cell [{i}][{j}]")), cell)
                canvas.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
            if captions is not None and captions[i][j]:
                text = _clip_text(draw, str(captions[i][j]), font, cell)
                draw.text((x, y + cell + 1), text, fill=(0, 0, 0), font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            canvas.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _resize_to(a: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """uint8 (h, w[, 3]) -> (H, W[, 3]) with size = (W, H)."""
    if (a.shape[1], a.shape[0]) == size:
        return a
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(a).resize(size, resample))


def cam_panel(
    image_rgb: Cell,
    scores: np.ndarray,
    class_names: Sequence[str],
    label_map: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    alpha: float = 0.5,
) -> tuple[list[np.ndarray], list[str]]:
    """One grid row for an image and its CAMs: (cells, captions).

    Cells: the image, one heat-map overlay per class of ``scores`` (L, H, W) (caption: class
    name and max score), then the overlays of ``label_map`` ("pred") and ``gt`` ("gt") when
    given. Maps of another size than the image are resized to it (bilinear for scores,
    nearest for label maps).
    """
    img = _rgb(image_rgb, "image_rgb")  # (H, W, 3)
    size = (img.shape[1], img.shape[0])
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3:
        raise ValueError(f"scores must be (L, H, W), got shape {s.shape}")
    if len(class_names) != s.shape[0]:
        raise ValueError(f"{s.shape[0]} score maps but class names {list(class_names)}")
    cells, caps = [img], ["image"]
    for name, sc in zip(class_names, s, strict=True):
        hm = _resize_to(heatmap(sc), size, nearest=False)
        cells.append(blend(img, hm, alpha))
        caps.append(f"{name} {float(np.max(sc)) if sc.size else 0.0:.2f}")
    for lm, cap in ((label_map, "pred"), (gt, "gt")):
        if lm is not None:
            col = _resize_to(np.asarray(colorize(lm)), size, nearest=True)
            cells.append(blend(img, col, alpha))
            caps.append(cap)
    return cells, caps


def draw_boxes(
    cell: Cell, boxes, colour: tuple[int, int, int], width: int | None = None
) -> np.ndarray:
    """A copy of ``cell`` (H, W, 3) with the outline of every half-open box (x0, y0, x1, y1)
    of ``boxes`` (n, 4) drawn on its outermost pixels in ``colour``; empty boxes are skipped.
    ``width``: line width in pixels (default: about 1% of the shorter side, at least 1)."""
    img = Image.fromarray(_rgb(cell, "cell").copy())
    if width is None:
        width = max(1, round(min(img.size) / 100))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4).tolist():
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
    return np.asarray(img)


def box_panel(
    image_rgb: Cell,
    scores: np.ndarray,
    class_names: Sequence[str],
    class_ids: Sequence[int],
    true_boxes,
    predicted: dict[int, Sequence[int]],
    label_map: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    notes: dict[int, str] | None = None,
    alpha: float = 0.5,
) -> tuple[list[np.ndarray], list[str]]:
    """:func:`cam_panel` with boxes on each class's heat-map overlay: the class's true boxes
    (rows of ``true_boxes`` (n, 5) = class, x0, y0, x1, y1) in green and its predicted box
    (``predicted``: class id -> (x0, y0, x1, y1)) in magenta; ``notes`` (class id -> text) is
    added to that cell's caption. ``scores`` must be on the image's pixel grid."""
    cells, caps = cam_panel(image_rgb, scores, class_names, label_map, gt, alpha)
    true = np.asarray(true_boxes, dtype=np.int64).reshape(-1, 5)
    for j, c in enumerate(class_ids):
        cell = draw_boxes(cells[1 + j], true[true[:, 0] == c, 1:], TRUE_BOX_COLOUR)
        if c in predicted:
            cell = draw_boxes(cell, [predicted[c]], PREDICTED_BOX_COLOUR)
        cells[1 + j] = cell
        if notes and c in notes:
            caps[1 + j] += f" {notes[c]}"
    return cells, caps


def upload_grid(
    storage, name: str, rows: Sequence[Sequence[Cell | None]], captions: Sequence[Sequence[str]]
) -> None:
    """:func:`save_grid` into ``storage`` (a local folder or S3 prefix) as ``name``: written
    to a temporary folder first, then uploaded whole."""
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload_file(save_grid(rows, Path(tmp) / name, captions=captions), name)
