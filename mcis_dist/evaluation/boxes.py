"""Box-scored weakly supervised object localization (WSOL), as Choe et al. score it.

Choe, Oh, Lee, Chun, Akata, Shim, "Evaluating Weakly Supervised Object Localization Methods
Right", CVPR 2020 (reference code: github.com/clovaai/wsolevaluation). A class-score map
(values in [0, 1] after max-normalisation) is turned into a box at a CAM threshold τ: the tight
box around the largest connected region of ``map > τ``; that box is scored by its IoU with the
ground-truth boxes of the map's class. ``BoxSweeps`` keeps, per image, an (n_thresholds ×
n_labelled_classes) array of the best IoU at every τ, so that thresholds can be chosen and
metrics and bootstrap intervals computed over 10,000 images without touching a map again.

Choices (each where the paper's reference code differs, said so):

* **Foreground** is ``map > τ`` (strict), as the reference code (``cv2.THRESH_BINARY`` keeps
  ``src > thresh``) and this project's ``ThresholdSweep`` / ``cam_labels`` (a pixel is
  background when τ >= its score). The reference thresholds a uint8 copy of the map at
  ``τ · max(map)``; here the float map at τ itself (maps are max-normalised, so max = 1).
* **Connectivity: 8** (``scipy.ndimage.label`` with a 3 × 3 structure), the connectivity of
  the foreground regions that ``cv2.findContours`` traces in the reference code.
* **Largest region** by pixel count; ties go to the region met first in row-major order. The
  reference ranks outer contours by ``cv2.contourArea`` (polygon area, which counts holes and
  gives a one-pixel-wide line no area); the two agree but for thin or holed regions.
* **No region** (nothing above τ): the empty box ``(0, 0, 0, 0)``, IoU 0 with every box. The
  reference returns ``[0, 0, 0, 0]`` too, which under its inclusive ``+1`` IoU is the top-left
  pixel; the two differ only for a ground-truth box so small that one pixel overlaps it at
  IoU >= 0.3.
* **Boxes are half-open** pixel boxes ``(x0, y0, x1, y1)`` = [x0, x1) × [y0, y1) on the map's
  H × W grid; area ``(x1 - x0) · (y1 - y0)``.
* **Regions scored**: ``regions="largest"`` (default; the CVPR 2020 MaxBoxAcc) scores the
  largest region's box; ``regions="all"`` scores the best of every region's box against every
  ground-truth box of the class, as the reference code's ``multi_contour_eval`` for
  MaxBoxAccV2 (it also boxes hole contours, which here are not separate regions).
* **Threshold grid**: ``DEFAULT_THRESHOLDS`` = 0, 0.05, ..., 0.95 (20 thresholds): labelling a
  224 × 224 map takes about 0.5 ms a threshold, so 10,000 images at 20 thresholds take a few
  minutes. ``CHOE_THRESHOLDS`` = 0, 0.01, ..., 0.99 is the reference's grid (five times the
  cost).
* **Unit counted**: one (image, labelled class) pair per labelled class that has at least one
  ground-truth box; a labelled class with no box is not counted (nothing to score it on). On
  single-class images (CUB, ImageNet) this is Choe et al.'s per-image count. A box of a class
  the image is not labelled with is refused (ValueError): it has no map.

Metrics, each with its threshold chosen in one of ``KINDS`` (as ``heldout.py``): "heldout"
(the headline: the images are split into two fixed halves by ``fold_of``; each half is scored
at the threshold best on the other half, and the two halves' counts are pooled), "fixed" (a
threshold given in advance; it must be on the grid) and "oracle" (the best threshold on the
scored images themselves: an upper bound, labelled so in every printed line):

* ``gt_known_loc``: GT-known localization accuracy, the share of pairs whose box has IoU >= 0.5
  with a ground-truth box of its class (Choe et al. 2020's BoxAcc(τ, 0.5); its oracle is the
  CVPR paper's MaxBoxAcc);
* ``max_box_acc_v2``: the mean over IoU thresholds δ ∈ {0.3, 0.5, 0.7} of BoxAcc(τ_δ, δ), each δ
  at its own threshold τ_δ (Choe et al.'s MaxBoxAccV2; the oracle kind is theirs exactly);
* ``top1_loc``: top-1 localization, per image: the classifier's top-1 class is one of the
  image's labelled classes AND that class's box has IoU >= 0.5 with one of its ground-truth
  boxes, at the threshold chosen for ``gt_known_loc``; counted over images with a prediction
  and at least one boxed labelled class (a top-1 class that is labelled but has no box is a
  miss);
* ``top1_cls``: classification top-1 accuracy, per image with a prediction: the top-1 class is
  one of the image's labelled classes. It uses no threshold: all three kinds give the same.

Intervals: ``box_interval`` (one map set) and ``box_paired_difference`` (two map sets of the same
images, optionally one pair per seed) bootstrap over images (and seeds, as blocks) as
``heldout.paired_difference`` does; that function takes per-image confusion matrices of a
segmentation sweep, not per-image box counts, so ``box_paired_difference`` is the thin adapter
that repeats its resampling on per-image (hits, counted) pairs.

Plain numpy and scipy.ndimage: no torch, no I/O.

Over 400 lines because the four metrics, their three threshold kinds and the two intervals all
read one sweep record (``BoxSweeps``); split apart, each piece would re-derive its layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mcis_dist.evaluation.heldout import KINDS, _best_index, bootstrap_images_and_seeds, fold_of
from mcis_dist.evaluation.metrics import THRESHOLD_TOL

__all__ = [
    "CHOE_THRESHOLDS",
    "DEFAULT_THRESHOLDS",
    "EMPTY_BOX",
    "IOU_THRESHOLDS",
    "KIND_LABELS",
    "METRICS",
    "REGIONS",
    "BoxInterval",
    "BoxPairedResult",
    "BoxSweeps",
    "box_from_map",
    "box_interval",
    "box_iou",
    "box_iou_matrix",
    "box_metric",
    "box_metrics",
    "box_paired_difference",
    "boxes_from_map",
    "gt_known_loc",
    "iou_sweep",
    "max_box_acc_v2",
    "top1_cls",
    "top1_loc",
]

Box = tuple[int, int, int, int]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 10) for i in range(20))
CHOE_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * i, 10) for i in range(100))
IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)  # MaxBoxAccV2's δ (Choe et al.)
METRICS = ("gt_known_loc", "max_box_acc_v2", "top1_loc", "top1_cls")
REGIONS = ("largest", "all")
KIND_LABELS = {
    "heldout": "held-out thresholds",
    "fixed": "fixed threshold",
    "oracle": "oracle threshold, an upper bound",
}
EMPTY_BOX: Box = (0, 0, 0, 0)
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def _as_map(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"a score map must be 2-D (H, W), got shape {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("a score map has NaN or infinite values")
    return cam


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=_EIGHT)
    return labels, int(n)


def _slices_to_boxes(slices) -> np.ndarray:
    """``ndimage.find_objects`` slices -> (k, 4) half-open boxes (x0, y0, x1, y1)."""
    return np.array(
        [(sx.start, sy.start, sx.stop, sy.stop) for sy, sx in slices if sy is not None],
        dtype=np.int64,
    ).reshape(-1, 4)


def _largest_box(labels: np.ndarray, n: int) -> Box:
    if n == 0:
        return EMPTY_BOX
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    k = int(np.argmax(sizes))  # first (row-major) on ties: labels are numbered in that order
    sy, sx = ndimage.find_objects(labels, max_label=k + 1)[k]
    return (int(sx.start), int(sy.start), int(sx.stop), int(sy.stop))


def box_from_map(cam: np.ndarray, threshold: float) -> Box:
    """The tight half-open box (x0, y0, x1, y1) around the largest 8-connected region of
    ``cam > threshold`` (Choe et al. 2020's box from a CAM; module docstring for the choices);
    ``EMPTY_BOX`` = (0, 0, 0, 0) when no pixel is above the threshold."""
    cam = _as_map(cam)
    return _largest_box(*_label(cam > threshold))


def boxes_from_map(cam: np.ndarray, threshold: float) -> np.ndarray:
    """(k, 4) the tight box of every 8-connected region of ``cam > threshold``, in row-major
    order of their first pixel; (0, 4) when none (``regions="all"``, the reference code's
    ``multi_contour_eval``)."""
    cam = _as_map(cam)
    labels, n = _label(cam > threshold)
    return _slices_to_boxes(ndimage.find_objects(labels)) if n else np.zeros((0, 4), np.int64)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two half-open boxes (x0, y0, x1, y1); 0 when both are empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) IoU of every half-open box of ``a`` (n, 4) with every one of ``b`` (m, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih

    def area(x: np.ndarray) -> np.ndarray:
        return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)

    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def iou_sweep(
    cam: np.ndarray,
    gt_boxes: np.ndarray,
    thresholds: Sequence[float],
    regions: str = "largest",
) -> np.ndarray:
    """(T,) at every threshold, the best IoU of the map's box (``regions="all"``: of any of
    its regions' boxes) with any of ``gt_boxes`` (m, 4); NaN everywhere when m == 0.

    Thresholds keeping the same number of pixels keep the same (nested) mask, so each distinct
    mask is labelled once; no pixel above: IoU 0 (``EMPTY_BOX``)."""
    if regions not in REGIONS:
        raise ValueError(f"regions must be one of {REGIONS}, got {regions!r}")
    cam = _as_map(cam)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    ts = np.asarray(thresholds, dtype=np.float64)
    out = np.full(ts.shape, np.nan if len(gt) == 0 else 0.0)
    if len(gt) == 0:
        return out
    flat = np.sort(cam.ravel())
    above = flat.size - np.searchsorted(flat, ts, side="right")  # pixels > t, per threshold
    h, w = cam.shape
    for count in np.unique(above):
        if count == 0:
            continue  # empty box: IoU 0
        where = above == count
        t = float(ts[np.flatnonzero(where)[0]])
        if count == flat.size:
            boxes = np.array([[0, 0, w, h]])
        else:
            labels, n = _label(cam > t)
            if regions == "largest":
                boxes = np.array([_largest_box(labels, n)])
            else:
                boxes = _slices_to_boxes(ndimage.find_objects(labels))
        out[where] = box_iou_matrix(boxes, gt).max()
    return out


@dataclass
class _Image:
    class_ids: tuple[int, ...]
    ious: np.ndarray  # (T, L) best IoU per threshold and labelled class; NaN: class has no box
    predicted: int | None


@dataclass
class _Stacked:
    ious: np.ndarray  # (P, T) every (image, labelled class) pair
    pair_image: np.ndarray  # (P,) its image
    valid: np.ndarray  # (P,) its class has a ground-truth box: it is counted
    pred_pair: np.ndarray  # (N,) the pair of the image's top-1 class; -1: none or not labelled
    has_pred: np.ndarray  # (N,) a top-1 class was given
    pred_right: np.ndarray  # (N,) it is one of the image's labelled classes
    has_box: np.ndarray  # (N,) at least one labelled class has a box


class BoxSweeps:
    """Per image, the best IoU with a ground-truth box of each labelled class at every CAM
    threshold (Choe et al. 2020's box accuracy, before a threshold is chosen).

    Args:
        thresholds: CAM thresholds swept (sorted ascending, duplicates dropped).
        regions: "largest" (one box per map) or "all" (every region's box; module docstring).
    """

    def __init__(
        self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, regions: str = "largest"
    ) -> None:
        if regions not in REGIONS:
            raise ValueError(f"regions must be one of {REGIONS}, got {regions!r}")
        self.thresholds = sorted({float(t) for t in thresholds})
        if not self.thresholds:
            raise ValueError("thresholds must not be empty")
        self.regions = regions
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self._images: list[_Image] = []
        self._stack: _Stacked | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(
        self,
        key: str,
        scores: np.ndarray,
        class_ids: Sequence[int],
        boxes: Sequence[Sequence[float]],
        predicted: int | None = None,
    ) -> None:
        """Sweep one image; a key counts once.

        Args:
            key: the image's key (its half is ``fold_of(key)``).
            scores: (L, H, W) one score map per labelled class, in [0, 1].
            class_ids: the L labelled classes, in the order of ``scores``.
            boxes: ground-truth boxes (class, x0, y0, x1, y1), half-open on the H × W grid.
            predicted: the classifier's top-1 class, if known (``top1_loc``, ``top1_cls``).
        """
        if key in self._index:
            raise ValueError(f"image {key!r} was counted twice")
        ids = tuple(int(c) for c in class_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"class_ids {list(ids)} has duplicates")
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim == 2 and len(ids) == 1:
            scores = scores[None]
        if scores.ndim != 3 or scores.shape[0] != len(ids):
            raise ValueError(f"scores {scores.shape} must be (L={len(ids)}, H, W)")
        h, w = scores.shape[1:]
        gt = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        bad = (
            (gt[:, 1] < 0)
            | (gt[:, 2] < 0)
            | (gt[:, 3] > w)
            | (gt[:, 4] > h)
            | (gt[:, 3] <= gt[:, 1])
            | (gt[:, 4] <= gt[:, 2])
        )
        if bad.any():
            raise ValueError(f"image {key!r}: boxes {gt[bad].tolist()} empty or outside {w}x{h}")
        strays = sorted({int(c) for c in gt[:, 0]} - set(ids))
        if strays:
            raise ValueError(f"image {key!r} has boxes of classes {strays} it is not labelled with")
        ious = np.full((len(self.thresholds), len(ids)), np.nan)
        for j, c in enumerate(ids):
            mine = gt[gt[:, 0] == c, 1:]
            if len(mine):
                ious[:, j] = iou_sweep(scores[j], mine, self.thresholds, self.regions)
        self._index[key] = len(self.keys)
        self.keys.append(key)
        self._images.append(_Image(ids, ious, None if predicted is None else int(predicted)))
        self._stack = None

    def ious(self, key: str) -> tuple[tuple[int, ...], np.ndarray]:
        """One image's (class ids, (T, L) best IoUs; NaN for a class with no box)."""
        im = self._images[self._index[key]]
        return im.class_ids, im.ious.copy()

    def folds(self) -> np.ndarray:
        """(N,) the half of every image (``fold_of``)."""
        return np.array([fold_of(k) for k in self.keys], dtype=np.int64)

    def _stacked(self) -> _Stacked:
        if self._stack is None:
            n, t = len(self), len(self.thresholds)
            cols = [im.ious.T for im in self._images]
            ious = np.concatenate(cols) if cols else np.zeros((0, t))
            sizes = np.array([len(im.class_ids) for im in self._images], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            valid = ~np.isnan(ious[:, 0])
            pred_pair = np.full(n, -1, dtype=np.int64)
            has_pred = np.zeros(n, dtype=bool)
            for i, im in enumerate(self._images):
                has_pred[i] = im.predicted is not None
                if im.predicted in im.class_ids:
                    pred_pair[i] = starts[i] + im.class_ids.index(im.predicted)
            pair_image = np.repeat(np.arange(n), sizes)
            self._stack = _Stacked(
                ious=ious,
                pair_image=pair_image,
                valid=valid,
                pred_pair=pred_pair,
                has_pred=has_pred,
                pred_right=pred_pair >= 0,
                has_box=np.bincount(pair_image, weights=valid.astype(float), minlength=n) > 0,
            )
        return self._stack

    def accuracy_curve(
        self, iou: float = 0.5, images: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """(T,) box accuracy at every threshold: the share of counted pairs of ``images``
        (indices; default all) whose box has IoU >= ``iou`` (Choe et al. 2020's BoxAcc(τ, δ)
        curve); NaN where no pair is counted."""
        st = self._stacked()
        keep = st.valid.copy()
        if images is not None:
            chosen = np.zeros(len(self), dtype=bool)
            chosen[np.asarray(images, dtype=np.int64)] = True
            keep &= chosen[st.pair_image]
        count = int(keep.sum())
        if count == 0:
            return np.full(len(self.thresholds), np.nan)
        return (st.ious[keep] >= iou).sum(axis=0) / count

    def best_threshold(
        self, iou: float = 0.5, images: Sequence[int] | np.ndarray | None = None
    ) -> float:
        """The threshold of the best box accuracy at ``iou`` over some images (ties: lowest)."""
        return self.thresholds[_best_index(self.accuracy_curve(iou, images).tolist())]

    def _swept(self, t: float) -> int:
        for j, s in enumerate(self.thresholds):
            if abs(s - t) <= THRESHOLD_TOL:
                return j
        raise ValueError(f"threshold {t} was not swept; swept: {self.thresholds}")

    def threshold_indices(
        self, kind: str, fixed: float | None = None, iou: float = 0.5
    ) -> np.ndarray:
        """(N,) the index into ``thresholds`` each image is scored at, for ``kind`` in
        ``KINDS``, chosen by box accuracy at ``iou``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        n = len(self)
        if kind == "fixed":
            if fixed is None:
                raise ValueError("kind='fixed' needs the fixed threshold")
            return np.full(n, self._swept(fixed), dtype=np.int64)
        if kind == "oracle":
            return np.full(n, self._swept(self.best_threshold(iou)), dtype=np.int64)
        folds = self.folds()
        out = np.zeros(n, dtype=np.int64)
        for f in (0, 1):
            mine, other = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
            if mine.size:
                # a half with no other half to learn from (all images in one half): the oracle's
                out[mine] = self._swept(self.best_threshold(iou, other if other.size else mine))
        return out

    def thresholds_for(self, kind: str, fixed: float | None = None, iou: float = 0.5) -> np.ndarray:
        """(N,) the threshold each image is scored at (``threshold_indices``)."""
        return np.asarray(self.thresholds)[self.threshold_indices(kind, fixed, iou)]

    def heldout_thresholds(self, iou: float = 0.5) -> dict[str, float]:
        """The threshold each half is scored at (chosen on the other half), at ``iou``."""
        folds, ts = self.folds(), self.thresholds_for("heldout", iou=iou)
        return {str(f): float(ts[folds == f][0]) for f in (0, 1) if (folds == f).any()}

    def _pair_hits(self, tidx: np.ndarray, iou: float) -> np.ndarray:
        st = self._stacked()
        at = st.ious[np.arange(len(st.valid)), tidx[st.pair_image]]
        return st.valid & (at >= iou)

    def image_scores(
        self, metric: str, kind: str = "heldout", fixed: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per image (hits, counted), each (N, K), of ``metric`` in ``METRICS`` at the ``kind``
        thresholds; the metric is the mean over its K columns of sum(hits) / sum(counted)
        (K = 3 for ``max_box_acc_v2``, one per δ; else 1)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        st, n = self._stacked(), len(self)

        def per_image(pair_values: np.ndarray) -> np.ndarray:
            return np.bincount(st.pair_image, weights=pair_values, minlength=n)

        if metric == "top1_cls":
            return st.pred_right[:, None].astype(float), st.has_pred[:, None].astype(float)
        if metric == "top1_loc":
            hit = self._pair_hits(self.threshold_indices(kind, fixed, 0.5), 0.5)
            counted = st.has_pred & st.has_box
            ok = counted & (st.pred_pair >= 0)
            ok[ok] = hit[st.pred_pair[ok]]
            return ok[:, None].astype(float), counted[:, None].astype(float)
        deltas = (0.5,) if metric == "gt_known_loc" else IOU_THRESHOLDS
        hits = np.stack(
            [per_image(self._pair_hits(self.threshold_indices(kind, fixed, d), d)) for d in deltas],
            axis=1,
        )
        counted = np.repeat(per_image(st.valid)[:, None], len(deltas), axis=1)
        return hits, counted


def _ratio_mean(hits: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """mean over the last axis of hits / counted (pooled sums); NaN where nothing counted."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(counted > 0, hits / np.where(counted > 0, counted, 1), np.nan)
    return r.mean(axis=-1)


def box_metric(
    sweeps: BoxSweeps, metric: str, kind: str = "heldout", fixed: float | None = None
) -> float:
    """``metric`` (one of ``METRICS``) of a map set at its ``kind`` thresholds, a fraction."""
    hits, counted = sweeps.image_scores(metric, kind, fixed)
    return float(_ratio_mean(hits.sum(axis=0), counted.sum(axis=0)))


def gt_known_loc(sweeps: BoxSweeps, kind: str = "heldout", fixed: float | None = None) -> float:
    """GT-known localization accuracy (Choe et al. 2020): the share of (image, labelled class)
    pairs with a box whose map's box has IoU >= 0.5 with a ground-truth box of that class;
    its ``kind="oracle"`` value is the CVPR 2020 paper's MaxBoxAcc."""
    return box_metric(sweeps, "gt_known_loc", kind, fixed)


def max_box_acc_v2(sweeps: BoxSweeps, kind: str = "heldout", fixed: float | None = None) -> float:
    """MaxBoxAccV2 (Choe et al. 2020, reference code; TPAMI version): the mean over
    δ ∈ {0.3, 0.5, 0.7} of the box accuracy at IoU >= δ, each δ at its own threshold.
    ``kind="oracle"`` (each δ's best threshold on the scored images) on sweeps made with
    ``regions="all"`` is the reference code's default MaxBoxAccV2, up to the module's choices."""
    return box_metric(sweeps, "max_box_acc_v2", kind, fixed)


def top1_loc(sweeps: BoxSweeps, kind: str = "heldout", fixed: float | None = None) -> float:
    """Top-1 localization accuracy (Choe et al. 2020): the share of images (with a prediction
    and a box) whose top-1 class is right AND whose box for it has IoU >= 0.5 with one of its
    ground-truth boxes, at the threshold chosen for ``gt_known_loc``."""
    return box_metric(sweeps, "top1_loc", kind, fixed)


def top1_cls(sweeps: BoxSweeps, kind: str = "heldout", fixed: float | None = None) -> float:
    """Top-1 classification accuracy (reported beside localization by Choe et al. 2020): the
    share of images with a prediction whose top-1 class is one of their labelled classes. No
    threshold: ``kind`` is checked but changes nothing."""
    return box_metric(sweeps, "top1_cls", kind, fixed)


def box_metrics(
    sweeps: BoxSweeps, kind: str = "heldout", fixed: float | None = None
) -> dict[str, float]:
    """Every metric of ``METRICS`` at the ``kind`` thresholds."""
    return {m: box_metric(sweeps, m, kind, fixed) for m in METRICS}


@dataclass
class BoxInterval:
    """A metric of one map set with its 95% bootstrap interval over images (fractions)."""

    metric: str
    kind: str
    images: int
    value: float
    low: float  # 2.5th percentile of the bootstrap values
    high: float  # 97.5th

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        return (
            f"{self.metric} ({KIND_LABELS[self.kind]}, {self.images} images): "
            f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}] "
            f"(95% bootstrap interval)"
        )


@dataclass
class BoxPairedResult:
    """Mean over seeds of metric(A) − metric(B), with its bootstrap interval (fractions)."""

    metric: str
    kind: str
    images: int
    seeds: int
    value_a: float  # mean over seeds
    value_b: float
    diff: float
    low: float  # 2.5th percentile of the bootstrap differences
    high: float  # 97.5th
    share_below_zero: float  # of the bootstrap differences <= 0
    per_seed_diff: list[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self, a: str = "A", b: str = "B") -> str:
        return (
            f"{a} - {b} {self.metric} ({KIND_LABELS[self.kind]}, {self.images} images x "
            f"{self.seeds} seeds): {100 * self.diff:+.1f} [{100 * self.low:+.1f}, "
            f"{100 * self.high:+.1f}] points (95% bootstrap interval); "
            f"{100 * self.value_a:.1f} vs {100 * self.value_b:.1f}"
        )


def _bootstrap(
    stats: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int
) -> np.ndarray:
    """(n_boot,) bootstrap values of mean over seeds of Σ_sets sign · metric, where ``stats``
    holds, per set, (hits, counted) of shape (S, N, K) and the sign is + for the first set and
    − for the second. Images are drawn with replacement jointly for every set and seed (one
    weight vector per resample), seeds drawn with replacement as blocks."""
    n_seeds, n, k = stats[0][0].shape

    def stat(weights):  # (m, N) -> (m, S)
        d = np.zeros((weights.shape[0], n_seeds))
        for sign, (h, c) in zip((1.0, -1.0), stats, strict=False):
            sh = np.einsum("bn,snk->bsk", weights, h)
            sc = np.einsum("bn,snk->bsk", weights, c)
            d += sign * _ratio_mean(sh, sc)
        return d

    chunk = max(1, 50_000_000 // max(1, n * n_seeds * k * len(stats)))
    return bootstrap_images_and_seeds(n, n_seeds, n_boot, seed, chunk, stat)


def box_interval(
    sweeps: BoxSweeps,
    metric: str,
    kind: str = "heldout",
    fixed: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> BoxInterval:
    """A metric of one map set with a 95% bootstrap interval: the images are resampled with
    replacement (an image drawn twice counts all its pairs twice); the thresholds stay as chosen
    on the full set (as ``heldout.paired_difference``)."""
    if len(sweeps) < 2:
        raise ValueError(f"need at least 2 images for an interval, got {len(sweeps)}")
    hits, counted = sweeps.image_scores(metric, kind, fixed)
    boots = _bootstrap([(hits[None], counted[None])], n_boot, seed)
    return BoxInterval(
        metric=metric,
        kind=kind,
        images=len(sweeps),
        value=float(_ratio_mean(hits.sum(axis=0), counted.sum(axis=0))),
        low=float(np.nanpercentile(boots, 2.5)),
        high=float(np.nanpercentile(boots, 97.5)),
    )


def box_paired_difference(
    a: Sequence[BoxSweeps],
    b: Sequence[BoxSweeps],
    metric: str = "max_box_acc_v2",
    kind: str = "heldout",
    fixed: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> BoxPairedResult:
    """Paired difference of a box metric of two map sets over the images all of them score, one
    (A, B) pair per seed (the box-metric adapter of ``heldout.paired_difference``).

    The statistic is the mean over seeds of metric(A) − metric(B), each set at its own ``kind``
    thresholds (chosen on its full set and kept while resampling). Its 95% interval resamples,
    with replacement, the seeds (as blocks) and, jointly for A and B and for every seed, the
    images: an image drawn twice counts twice in both sets and every seed.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need one (A, B) pair per seed, got {len(a)} and {len(b)}")
    keys = set(a[0].keys)
    for s in (*a, *b):
        keys &= set(s.keys)
    keys = sorted(keys)
    if len(keys) < 2:
        raise ValueError(f"the two map sets share {len(keys)} scored images: need at least 2")

    def stack(sets: Sequence[BoxSweeps]) -> tuple[np.ndarray, np.ndarray]:  # (S, N, K) each
        hs, cs = [], []
        for s in sets:
            h, c = s.image_scores(metric, kind, fixed)
            idx = [s._index[k] for k in keys]
            hs.append(h[idx])
            cs.append(c[idx])
        return np.stack(hs), np.stack(cs)

    (ha, ca), (hb, cb) = stack(a), stack(b)
    va, vb = _ratio_mean(ha.sum(axis=1), ca.sum(axis=1)), _ratio_mean(hb.sum(axis=1), cb.sum(1))
    per_seed = va - vb
    diffs = _bootstrap([(ha, ca), (hb, cb)], n_boot, seed)
    return BoxPairedResult(
        metric=metric,
        kind=kind,
        images=len(keys),
        seeds=len(a),
        value_a=float(va.mean()),
        value_b=float(vb.mean()),
        diff=float(per_seed.mean()),
        low=float(np.nanpercentile(diffs, 2.5)),
        high=float(np.nanpercentile(diffs, 97.5)),
        share_below_zero=float((diffs <= 0).mean()),
        per_seed_diff=[float(x) for x in per_seed],
    )
