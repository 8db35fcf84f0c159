"""Segmentation metrics shared by CAM, pseudo-mask and segmentation evaluation (numpy only).

Conventions (the standard mIoU of paper §4): one confusion matrix accumulated over every pixel whose
ground truth is not ``ignore_index``; rows are ground truth, columns prediction;
IoU_c = TP_c / (TP_c + FP_c + FN_c) per class, background included; mIoU is their mean over the
classes present in ground truth or prediction. Distributed evaluation sums the raw counts of
every rank (``merge`` / ``+=``, or an all-reduce of ``matrix``) and never averages per-rank mIoU.

CAM quality uses a background threshold sweep (``ThresholdSweep``): at threshold t a pixel is
background when t >= the highest class score, else the label of its best class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two thresholds closer than this are the same threshold (parse_thresholds, matrix_at).
THRESHOLD_TOL = 1e-9


def _as_labels(a: np.ndarray, what: str) -> np.ndarray:
    """``a`` as an integer ndarray; TypeError naming the dtype otherwise."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {a.dtype}")
    return a


def _check_range(
    values: np.ndarray, num_classes: int, what: str, ignore_index: int | None = None
) -> None:
    """ValueError naming the first values outside [0, num_classes) (other than ignore_index)."""
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bad.any():
        shown = np.unique(values[bad])[:5].tolist()
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(f"{what} has values {shown} outside {allowed}")


class ConfusionMatrix:
    """Pixel counts ``matrix[gt, pred]`` of shape (C, C), int64.

    Args:
        num_classes: C, background included (21 for PASCAL VOC).
        ignore_index: ground-truth value of pixels left out of every count.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # (C, C)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ignore_index: int = 255) -> ConfusionMatrix:
        """Wrap raw counts, e.g. the result of an all-reduce of ``matrix`` over ranks."""
        m = np.asarray(matrix)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrix must be square (C, C), got shape {m.shape}")
        cm = cls(m.shape[0], ignore_index)
        cm.matrix = m.astype(np.int64, copy=True)
        return cm

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Count one label map pair; ``gt`` and ``pred`` are integer arrays of the same shape."""
        gt = _as_labels(gt, "gt")
        pred = _as_labels(pred, "pred")
        if gt.shape != pred.shape:
            raise ValueError(f"gt shape {gt.shape} != pred shape {pred.shape}")
        n = self.num_classes
        _check_range(gt, n, "gt", self.ignore_index)
        _check_range(pred, n, "pred")
        valid = gt != self.ignore_index
        # int64 before multiplying: uint8 gt * 21 would wrap around.
        codes = n * gt[valid].astype(np.int64) + pred[valid].astype(np.int64)
        self.matrix += np.bincount(codes, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s raw counts to this one (in place); returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge num_classes={other.num_classes} ignore_index={other.ignore_index} "
                f"into num_classes={self.num_classes} ignore_index={self.ignore_index}"
            )
        self.matrix += other.matrix
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def reset(self) -> None:
        """Zero every count."""
        self.matrix[...] = 0

    @property
    def total(self) -> int:
        """Number of counted (non-ignored) pixels."""
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU (C,), float64; NaN for classes absent from both gt and prediction."""
        m = self.matrix
        tp = np.diag(m).astype(np.float64)
        fp = m.sum(axis=0) - tp  # predicted c, gt another class
        fn = m.sum(axis=1) - tp  # gt c, predicted another class
        denom = tp + fp + fn
        out = np.full(self.num_classes, np.nan)
        np.divide(tp, denom, out=out, where=denom > 0)
        return out

    def miou(self) -> float:
        """Mean IoU over the classes present (NaN when nothing was counted)."""
        iou = self.iou()
        present = ~np.isnan(iou)
        return float(iou[present].mean()) if present.any() else math.nan

    def pixel_accuracy(self) -> float:
        """Share of counted pixels predicted right (NaN when nothing was counted)."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else math.nan

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-able summary: miou, pixel_accuracy, per_class {name: IoU or None}, matrix."""
        names = [str(i) for i in range(self.num_classes)] if class_names is None else class_names
        if len(names) != self.num_classes:
            raise ValueError(
                f"got {len(names)} class names for num_classes={self.num_classes}: {list(names)}"
            )
        return {
            "miou": _none_if_nan(self.miou()),
            "pixel_accuracy": _none_if_nan(self.pixel_accuracy()),
            "per_class": {str(k): _none_if_nan(v) for k, v in zip(names, self.iou(), strict=True)},
            "matrix": self.matrix.tolist(),
        }

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, "
            f"miou={self.miou():.4f})"
        )


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


class ThresholdSweep:
    """Confusion matrices of CAM predictions at several background thresholds.

    At threshold t a pixel's label is argmax over [t, s_1, ..., s_L] of the background
    threshold and its image's L class scores, ties going to the background (background wins
    when t >= max score; ties between classes go to the first), mapped to label ids
    (foreground class k -> label k + 1, background -> 0).

    Each pixel is counted once whatever the number of thresholds: it is binned by how many
    (sorted) thresholds lie below its max score; the matrix at threshold j is then the
    foreground counts of the bins above j plus the background counts of the bins up to j.

    Args:
        num_classes: C, background included.
        thresholds: background thresholds, reported in this order.
        ignore_index: ground-truth value of pixels left out.
    """

    def __init__(
        self, num_classes: int, thresholds: Sequence[float], ignore_index: int = 255
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ts = np.asarray(list(thresholds), dtype=np.float64)
        if ts.ndim != 1 or ts.size == 0 or not np.isfinite(ts).all():
            raise ValueError(f"thresholds must be a non-empty list of finite floats, got {ts}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.thresholds: list[float] = ts.tolist()
        self._order = np.argsort(ts, kind="stable")  # sorted position -> given position
        self._sorted = ts[self._order]
        t, n = ts.size, self.num_classes
        # counts[0, k] / counts[1, k]: (gt, fg label) / (gt, background) pairs of the pixels whose
        # max score exceeds exactly k of the sorted thresholds. Sum it over ranks to merge.
        self.counts = np.zeros((2, t + 1, n, n), dtype=np.int64)  # (2, T+1, C, C)

    def update(self, scores: np.ndarray, class_ids: Sequence[int], gt: np.ndarray) -> None:
        """Count one image: ``scores`` (L, H, W) in [0, 1], ``class_ids`` (L,) foreground
        class indices (0-based), ``gt`` (H, W) label map."""
        gt = _as_labels(gt, "gt")
        scores = np.asarray(scores)
        ids = np.asarray(list(class_ids), dtype=np.int64).reshape(-1)  # (L,)
        if scores.ndim != 3 or scores.shape[1:] != gt.shape:
            raise ValueError(
                f"scores must be (L, H, W) with (H, W) = gt shape {gt.shape}, got {scores.shape}"
            )
        if scores.shape[0] != ids.size:
            raise ValueError(f"{scores.shape[0]} score maps but class_ids {ids.tolist()}")
        n = self.num_classes
        _check_range(ids, n - 1, "class_ids (foreground classes)")
        _check_range(gt, n, "gt", self.ignore_index)
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or inf")

        valid = gt != self.ignore_index  # (H, W)
        gt_v = gt[valid].astype(np.int64)  # (P,)
        if ids.size == 0:  # no labelled class: every pixel is background at every threshold
            best = np.full(gt_v.shape, -np.inf)
            label = np.zeros_like(gt_v)
        else:
            s = scores[:, valid].astype(np.float64)  # (L, P)
            arg = s.argmax(axis=0)  # (P,) first class wins ties
            best = s[arg, np.arange(arg.size)]  # (P,)
            label = ids[arg] + 1  # (P,)
        # k = number of thresholds strictly below the max score: foreground at sorted j < k.
        k = np.searchsorted(self._sorted, best, side="left")  # (P,)
        nb = (self._sorted.size + 1) * n * n
        self.counts[0] += np.bincount((k * n + gt_v) * n + label, minlength=nb).reshape(
            self.counts.shape[1:]
        )
        self.counts[1] += np.bincount((k * n + gt_v) * n, minlength=nb).reshape(
            self.counts.shape[1:]
        )

    def merge(self, other: ThresholdSweep) -> ThresholdSweep:
        """Add ``other``'s raw counts (same classes and thresholds) in place; returns self."""
        if (
            other.num_classes != self.num_classes
            or other.ignore_index != self.ignore_index
            or other.thresholds != self.thresholds
        ):
            raise ValueError(
                f"cannot merge a sweep over {other.num_classes} classes, thresholds "
                f"{other.thresholds} into one over {self.num_classes}, {self.thresholds}"
            )
        self.counts += other.counts
        return self

    def __iadd__(self, other: ThresholdSweep) -> ThresholdSweep:
        return self.merge(other)

    def matrices(self) -> list[ConfusionMatrix]:
        """One ConfusionMatrix per threshold, in the given threshold order."""
        fg, bg = self.counts[0], self.counts[1]  # (T+1, C, C)
        fg_above = fg[::-1].cumsum(axis=0)[::-1][1:]  # (T, C, C) bins k > j
        bg_upto = bg.cumsum(axis=0)[:-1]  # (T, C, C) bins k <= j
        by_sorted = fg_above + bg_upto  # (T, C, C) in sorted threshold order
        where = np.empty_like(self._order)
        where[self._order] = np.arange(self._order.size)  # given position -> sorted position
        return [ConfusionMatrix.from_matrix(by_sorted[j], self.ignore_index) for j in where]

    def matrix_at(self, threshold: float) -> ConfusionMatrix:
        """The ConfusionMatrix at one of the swept thresholds."""
        for t, cm in zip(self.thresholds, self.matrices(), strict=True):
            if abs(t - threshold) <= THRESHOLD_TOL:
                return cm
        raise ValueError(f"threshold {threshold} was not swept; swept: {self.thresholds}")

    def results(self) -> list[tuple[float, float]]:
        """(threshold, mIoU) for every threshold, in the given order."""
        return [(t, cm.miou()) for t, cm in zip(self.thresholds, self.matrices(), strict=True)]

    def best(self) -> tuple[float, ConfusionMatrix]:
        """The threshold with the highest mIoU (the first one on ties) and its matrix."""
        mats = self.matrices()
        mious = np.array([cm.miou() for cm in mats])
        if np.isnan(mious).all():
            raise ValueError("ThresholdSweep.best(): no pixels counted yet")
        j = int(np.nanargmax(mious))
        return self.thresholds[j], mats[j]


def format_table(
    names: Sequence[str], ious: Sequence[float] | np.ndarray, title: str = "IoU per class"
) -> str:
    """Plain text table: one row per class (IoU in %, '-' for NaN/None) and a mean row."""
    if len(names) != len(ious):
        raise ValueError(f"{len(names)} class names but {len(ious)} IoUs")
    vals = np.array([math.nan if v is None else float(v) for v in ious], dtype=np.float64)
    width = max([len("class"), len("mean"), *(len(str(n)) for n in names)])

    def cell(v: float) -> str:
        return f"{100 * v:7.2f}" if not math.isnan(v) else f"{'-':>7}"

    rule = "-" * (width + 9)
    lines = [title, rule, f"{'class':<{width}}  {'IoU %':>7}", rule]
    lines += [f"{str(n):<{width}}  {cell(v)}" for n, v in zip(names, vals, strict=True)]
    present = vals[~np.isnan(vals)]
    mean = float(present.mean()) if present.size else math.nan
    lines += [rule, f"{'mean':<{width}}  {cell(mean)}"]
    return "\n".join(lines)


def parse_thresholds(text: str) -> list[float]:
    """ "start:stop:step" (stop included within 1e-9) or "a,b,c" -> list of floats."""
    s = text.strip()
    try:
        if ":" in s:
            parts = [float(p) for p in s.split(":")]
            if len(parts) != 3:
                raise ValueError("expected start:stop:step")
            start, stop, step = parts
            if not all(math.isfinite(p) for p in parts):
                raise ValueError("values must be finite")
            if step <= 0:
                raise ValueError("step must be > 0")
            if stop < start - THRESHOLD_TOL:
                raise ValueError("stop must be >= start")
            count = int(math.floor((stop - start) / step + THRESHOLD_TOL / step)) + 1
            # round away the float noise of start + i * step (0.15000000000000002 -> 0.15)
            return [round(start + i * step, 12) for i in range(count)]
        out = [float(p) for p in s.split(",")]
        if not all(math.isfinite(p) for p in out):
            raise ValueError("values must be finite")
        return out
    except ValueError as e:
        raise ValueError(
            f"bad thresholds {text!r} ({e}): use start:stop:step such as '0:0.6:0.05' "
            f"or a list such as '0.1,0.2'"
        ) from None
