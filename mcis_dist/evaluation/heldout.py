"""Thresholds chosen on other images, and paired differences with bootstrap intervals.

A CAM's background threshold changes its mIoU by several points, and a threshold picked by
looking at the masks of the very images it is scored on flatters every map set, the more so
the fewer images there are. ``PerImageSweeps`` keeps every image's threshold-sweep counts
(``ThresholdSweep``) apart, so that three figures can be told apart:

* **held-out** (the headline): the images are split into two fixed halves by a hash of their
  key (``fold_of``); the threshold is picked on one half (the best mIoU of its sweep), the
  other half is scored at it, then the halves swap, and the two halves' confusion matrices are
  pooled into one mIoU. No image is scored at a threshold its own mask helped to choose.
* **fixed**: a threshold set in advance (the config's), chosen on no image;
* **oracle**: the best threshold of the whole set's sweep, chosen on the scored masks
  themselves; it is an upper bound, labelled as such wherever it is shown.

``paired_difference`` compares two map sets of the same images (and of several seeds, each a
block): the statistic is the mean over seeds of mIoU(A) − mIoU(B), each at its own thresholds
of the chosen kind; its 95% interval comes from a bootstrap that resamples the seeds and,
jointly for A and B, the images (a paired bootstrap: an image drawn twice counts twice in both).
The thresholds are kept as chosen on the full sets while resampling.

Plain numpy: no torch, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mcis_dist.evaluation.metrics import THRESHOLD_TOL, ConfusionMatrix, ThresholdSweep

__all__ = [
    "KINDS",
    "PerImageSweeps",
    "fold_of",
    "miou_rows",
    "paired_difference",
]

KINDS = ("heldout", "fixed", "oracle")  # how a threshold is chosen (module docstring)


def fold_of(key: str) -> int:
    """The fixed half (0 or 1) an image belongs to: the low bit of the SHA-1 of its key, so
    every map set, seed and machine splits the same images the same way."""
    return hashlib.sha1(key.encode("utf-8")).digest()[-1] & 1


def _best_index(mious: Sequence[float]) -> int:
    """The index of the highest mIoU, the first one on ties; NaN (nothing counted) never wins."""
    vals = np.array([-math.inf if math.isnan(m) else m for m in mious])
    return int(np.argmax(vals))


class PerImageSweeps:
    """Threshold-sweep counts of every image, kept apart (sparse), for held-out thresholds and
    paired bootstraps.

    Args:
        num_classes: C, background included.
        thresholds: the background thresholds swept (sorted ascending here).
        ignore_index: ground-truth value of pixels left out.
    """

    def __init__(
        self, num_classes: int, thresholds: Sequence[float], ignore_index: int = 255
    ) -> None:
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.thresholds = sorted({float(t) for t in thresholds})
        if not self.thresholds:
            raise ValueError("thresholds must not be empty")
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self._flat: list[tuple[np.ndarray, np.ndarray]] = []  # per image: (positions, counts)
        self._shape = (2, len(self.thresholds) + 1, self.num_classes, self.num_classes)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, scores: np.ndarray, class_ids: Sequence[int], gt: np.ndarray) -> None:
        """Count one image (``ThresholdSweep.update``'s arguments); a key counts once."""
        if key in self._index:
            raise ValueError(f"image {key!r} was counted twice")
        # Count over the labels this image can hold (background, its classes, its mask's):
        # (2, T+1, n, n) with n of a few, not C of hundreds, then place the counts in the
        # (2, T+1, C, C) layout as flat positions.
        c = self.num_classes
        gt = np.asarray(gt)
        ids = np.asarray(list(class_ids), dtype=np.int64).reshape(-1)
        seen = np.unique(gt[gt != self.ignore_index]).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= c - 1):
            raise ValueError(f"class_ids {ids.tolist()} outside [0, {c - 1})")
        if seen.size and (seen.min() < 0 or seen.max() >= c):
            raise ValueError(f"gt has values {seen.tolist()[:5]} outside [0, {c})")
        present = np.unique(np.concatenate([[0], ids + 1, seen]))  # (n,) global labels
        n = present.size
        local_gt = np.where(gt == self.ignore_index, n, np.searchsorted(present, gt))
        one = ThresholdSweep(n, self.thresholds, ignore_index=n)
        one.update(scores, np.searchsorted(present, ids + 1) - 1, local_gt)
        nz = np.flatnonzero(one.counts)
        a, t, i, j = np.unravel_index(nz, one.counts.shape)
        pos = ((a * (len(self.thresholds) + 1) + t) * c + present[i]) * c + present[j]
        self._index[key] = len(self.keys)
        self.keys.append(key)
        self._flat.append((pos.astype(np.int64), one.counts.reshape(-1)[nz]))

    def folds(self) -> np.ndarray:
        """(N,) the half of every image (``fold_of``)."""
        return np.array([fold_of(k) for k in self.keys], dtype=np.int64)

    def sweep(self, images: Sequence[int] | np.ndarray | None = None) -> ThresholdSweep:
        """The summed ``ThresholdSweep`` of some images (indices; default all)."""
        out = ThresholdSweep(self.num_classes, self.thresholds, self.ignore_index)
        flat = out.counts.reshape(-1)
        for i in range(len(self)) if images is None else images:
            pos, val = self._flat[int(i)]
            np.add.at(flat, pos, val)
        return out

    def best_threshold(self, images=None) -> float:
        """The threshold of the best mIoU over some images (ties: the lowest threshold)."""
        mious = [m for _, m in self.sweep(images).results()]
        return self.thresholds[_best_index(mious)]

    def thresholds_for(self, kind: str, fixed: float | None = None) -> np.ndarray:
        """(N,) the threshold each image is scored at, for ``kind`` in ``KINDS``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        n = len(self)
        if kind == "fixed":
            if fixed is None:
                raise ValueError("kind='fixed' needs the fixed threshold")
            return np.full(n, self._swept(fixed))
        if kind == "oracle":
            return np.full(n, self.best_threshold())
        folds = self.folds()
        out = np.empty(n)
        for f in (0, 1):
            mine, other = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
            # a half with no other half to learn from (a one-image set) takes the oracle's
            out[mine] = self.best_threshold(other if other.size else mine)
        return out

    def heldout_thresholds(self) -> dict[str, float]:
        """The threshold each half is scored at (chosen on the other half)."""
        folds, ts = self.folds(), self.thresholds_for("heldout")
        return {str(f): float(ts[folds == f][0]) for f in (0, 1) if (folds == f).any()}

    def _swept(self, t: float) -> float:
        for s in self.thresholds:
            if abs(s - t) <= THRESHOLD_TOL:
                return s
        raise ValueError(f"threshold {t} was not swept; swept: {self.thresholds}")

    def _entries(self, i: int, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image i's confusion counts at threshold t, sparse: (gt labels, predictions, counts).
        Foreground counts of the bins above t plus background counts of the bins up to t."""
        pos, val = self._flat[i]
        a, b, g, p = np.unravel_index(pos, self._shape)
        j = self.thresholds.index(float(t))
        keep = np.where(a == 0, b > j, b <= j)
        return g[keep], p[keep], val[keep]

    def image_matrices(self, thresholds: np.ndarray) -> np.ndarray:
        """(N, C, C) every image's confusion matrix at its own threshold."""
        c = self.num_classes
        out = np.zeros((len(self), c, c), dtype=np.int64)
        for i in range(len(self)):
            g, p, v = self._entries(i, thresholds[i])
            np.add.at(out[i], (g, p), v)
        return out

    def matrix(self, kind: str, fixed: float | None = None) -> ConfusionMatrix:
        """The pooled confusion matrix of every image at its ``kind`` threshold."""
        ts = self.thresholds_for(kind, fixed)
        total = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        for i in range(len(self)):
            g, p, v = self._entries(i, ts[i])
            np.add.at(total, (g, p), v)
        return ConfusionMatrix.from_matrix(total, self.ignore_index)


def miou_rows(matrices: np.ndarray) -> np.ndarray:
    """mIoU of every confusion matrix in a stack (..., C, C), as ``ConfusionMatrix.miou``
    (classes absent from both ground truth and prediction left out; NaN if none counted)."""
    m = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    denom = m.sum(axis=-1) + m.sum(axis=-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
    present = ~np.isnan(iou)
    count = present.sum(axis=-1)
    total = np.where(present, iou, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_images_and_seeds(
    n_images: int, n_seeds: int, n_boot: int, seed: int, chunk: int, stat
) -> np.ndarray:
    """(n_boot,) bootstrap draws of a statistic averaged over seeds: each draw resamples the
    images with replacement (one weight vector, shared by every seed and map set, so pairs stay
    paired) and the seeds with replacement as blocks. ``stat(weights)`` maps image weights
    (m, n_images) to the per-seed statistic (m, n_seeds); ``chunk`` draws are made at a time
    (bounds the memory of ``stat``)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=m)
        seeds_drawn = rng.integers(0, n_seeds, size=(m, n_seeds))  # (m, S)
        d = stat(weights.astype(np.float64))  # (m, S)
        out[start : start + m] = np.take_along_axis(d, seeds_drawn, axis=1).mean(axis=1)
    return out


@dataclass
class PairedResult:
    """mean over seeds of mIoU(A) − mIoU(B), with its bootstrap interval (fractions, not %)."""

    kind: str
    images: int
    seeds: int
    miou_a: float  # mean over seeds
    miou_b: float
    diff: float
    low: float  # 2.5th percentile of the bootstrap differences
    high: float  # 97.5th
    share_below_zero: float  # of the bootstrap differences <= 0 (a one-sided p-value's analogue)
    per_seed_diff: list[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self, a: str = "A", b: str = "B") -> str:
        return (
            f"{a} - {b} ({self.kind} thresholds, {self.images} images x {self.seeds} seeds): "
            f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}] mIoU "
            f"points (95% bootstrap interval); {100 * self.miou_a:.1f} vs {100 * self.miou_b:.1f}"
        )


def paired_difference(
    a: Sequence[PerImageSweeps],
    b: Sequence[PerImageSweeps],
    kind: str = "heldout",
    fixed: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedResult:
    """Paired difference of two map sets over the images both score, one entry per seed.

    Args:
        a, b: per seed, the sweeps of map set A and of map set B (same thresholds).
        kind: how each set's threshold is chosen (``KINDS``), separately for A and B.
        fixed: the fixed threshold (``kind='fixed'``).
        n_boot: bootstrap resamples; seeds and images are resampled with replacement.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need one (A, B) pair per seed, got {len(a)} and {len(b)}")
    keys = set(a[0].keys)
    for s in (*a, *b):
        keys &= set(s.keys)
    keys = sorted(keys)
    if len(keys) < 2:
        raise ValueError(f"the two map sets share {len(keys)} scored images: need at least 2")

    def stack(sets):  # (S, N, C*C) per seed, per image, at its own thresholds
        out = []
        for s in sets:
            mats = s.image_matrices(s.thresholds_for(kind, fixed))
            idx = [s._index[k] for k in keys]
            out.append(mats[idx].reshape(len(keys), -1))
        return np.stack(out).astype(np.float64)

    ma, mb = stack(a), stack(b)  # (S, N, C*C)
    c = a[0].num_classes
    n_seeds, n = ma.shape[:2]
    per_seed = miou_rows(ma.sum(axis=1).reshape(n_seeds, c, c)) - miou_rows(
        mb.sum(axis=1).reshape(n_seeds, c, c)
    )

    def stat(weights):  # (m, N) -> (m, S): mIoU(A) - mIoU(B) of the weighted images
        m = weights.shape[0]
        sa = np.einsum("bn,snk->bsk", weights, ma).reshape(m, n_seeds, c, c)
        sb = np.einsum("bn,snk->bsk", weights, mb).reshape(m, n_seeds, c, c)
        return miou_rows(sa) - miou_rows(sb)

    chunk = max(1, 200_000_000 // max(1, n * c * c * 8 * n_seeds))
    diffs = bootstrap_images_and_seeds(n, n_seeds, n_boot, seed, chunk, stat)
    return PairedResult(
        kind=kind,
        images=n,
        seeds=n_seeds,
        miou_a=float(np.mean(miou_rows(ma.sum(axis=1).reshape(n_seeds, c, c)))),
        miou_b=float(np.mean(miou_rows(mb.sum(axis=1).reshape(n_seeds, c, c)))),
        diff=float(per_seed.mean()),
        low=float(np.percentile(diffs, 2.5)),
        high=float(np.percentile(diffs, 97.5)),
        share_below_zero=float((diffs <= 0).mean()),
        per_seed_diff=[float(x) for x in per_seed],
    )
