"""Box-scored localization of a CAM folder: ``mcis eval cams`` / ``mcis eval compare`` on a
split whose images carry bounding boxes, scored as weakly supervised object localization is
(Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020;
the metrics, box rule and intervals are ``mcis_dist.evaluation.boxes``).

Per mapped image with boxes, each labelled class's map on the image grid (``upsample_cams``,
as for masks) is thresholded into a box and scored against the class's true boxes:

* **max-normalised once**: the CAM stage's ``single`` and ``coattentive`` maps are already
  divided by their own peak (``normalize_cam``; stored peak 1 up to float16), ``authors`` maps
  (a sum of five normalised maps / 5) are not. A map whose stored peak is neither 0 nor within
  ``PEAK_TOL`` of 1 is divided by that peak (counted: ``maps_normalised``); the others are left
  as they are, so no map is normalised twice. Dividing before or after the bilinear upsample is
  the same scaling.
* **thresholds**: ``BOX_THRESHOLDS`` (0, 0.05, ..., 0.95, the ``BoxSweeps`` default) plus
  ``cams.bg_threshold``, so the fixed threshold is always on the grid. The mask sweep's
  ``--thresholds`` / ``cams.eval_thresholds`` (0 .. 0.6 by default) do not apply: the boxes'
  best threshold is often above 0.6.
* **top-1**: the classifier's top-1 class over all classes is the map meta's ``top1``
  (``mcis cams`` stores it); a CAM folder written before it has none, and top-1 localization
  and classification are then reported as None, with a note.

Each metric is given at held-out thresholds (the headline: each half of the images at the
threshold best on the other half), at the fixed ``cams.bg_threshold``, and at the oracle
threshold (chosen on the scored boxes themselves: an upper bound), each with its 95% bootstrap
interval over images.
"""

from __future__ import annotations

import math

import numpy as np

from mcis_dist.cams.maps import cam_labels
from mcis_dist.evaluation.boxes import (
    DEFAULT_THRESHOLDS,
    IOU_THRESHOLDS,
    KINDS,
    METRICS,
    BoxSweeps,
    box_from_map,
    box_interval,
    box_iou_matrix,
    box_metric,
    box_paired_difference,
)
from mcis_dist.evaluation.overlay import box_panel, cam_panel

__all__ = [
    "BOX_THRESHOLDS",
    "PEAK_TOL",
    "BoxEvaluation",
    "box_lines",
    "box_results",
    "check_boxes",
    "compare_boxes",
    "overlay_row",
]

BOX_THRESHOLDS = DEFAULT_THRESHOLDS
PEAK_TOL = 2e-3  # a stored peak this close to 1 is a max-normalised map (float16 rounding)
COMPARED = ("max_box_acc_v2", "gt_known_loc")  # the paired differences of `mcis eval compare`
NAMES = {
    "gt_known_loc": "GT-known loc",
    "max_box_acc_v2": "MaxBoxAccV2",
    "top1_loc": "top-1 loc",
    "top1_cls": "top-1 cls",
}
NO_TOP1 = (
    "top1_loc / top1_cls: None, the maps' meta records no top-1 class (a CAM folder written "
    "before `mcis cams` stored the classifier's top-1; map the split again into a new folder)"
)


def check_boxes(boxes: np.ndarray, labels, size) -> None:
    """ValueError unless every box (class, x0, y0, x1, y1) is non-empty, inside the H x W image
    (``size``) and of one of the image's labelled classes (the classes that have a map)."""
    h, w = size
    b = np.asarray(boxes).reshape(-1, 5)
    bad = (b[:, 1] < 0) | (b[:, 2] < 0) | (b[:, 3] > w) | (b[:, 4] > h)
    bad |= (b[:, 3] <= b[:, 1]) | (b[:, 4] <= b[:, 2])
    if bad.any():
        raise ValueError(f"boxes {b[bad].tolist()} empty or outside the {w}x{h} image")
    strays = sorted({int(c) for c in b[:, 0]} - {int(k) for k in labels})
    if strays:
        raise ValueError(f"boxes of classes {strays}, which the image is not labelled with")


class BoxEvaluation:
    """The box sweeps of one map set, and what the report says about them."""

    def __init__(self, fixed: float, thresholds=BOX_THRESHOLDS) -> None:
        self.fixed = float(fixed)
        self.sweeps = BoxSweeps([*thresholds, self.fixed])
        self.counts = {"boxes": 0, "pairs": 0, "maps_normalised": 0, "top1_images": 0}

    def __len__(self) -> int:
        return len(self.sweeps)

    def add(
        self, key: str, meta: dict, stored: np.ndarray, scores: np.ndarray, boxes
    ) -> np.ndarray:
        """Sweep one image: ``stored`` its maps as stored (L, h, w), ``scores`` the same on the
        image grid (L, H, W), ``boxes`` (n, 5). Returns the scores as scored (max-normalised)."""
        stored = np.asarray(stored, dtype=np.float32)
        peaks = stored.reshape(len(stored), -1).max(axis=1) if stored.size else np.zeros(0)
        rescale = (peaks > 0) & (np.abs(peaks - 1) > PEAK_TOL)
        if rescale.any():
            factor = np.where(rescale, 1 / np.where(rescale, peaks, 1), 1).astype(np.float32)
            scores = scores * factor[:, None, None]
        top1 = meta.get("top1")
        self.sweeps.add(key, scores, meta["labels"], boxes, predicted=top1)
        b = np.asarray(boxes).reshape(-1, 5)
        self.counts["boxes"] += len(b)
        self.counts["pairs"] += len({int(c) for c in b[:, 0]})
        self.counts["maps_normalised"] += int(rescale.sum())
        self.counts["top1_images"] += top1 is not None
        return scores

    def predicted_boxes(self, key: str, scores: np.ndarray, labels) -> dict[int, tuple]:
        """class -> the box of its map (``scores`` as returned by ``add``) at the image's
        held-out threshold (the one chosen for GT-known loc on the other half)."""
        t = float(self.sweeps.thresholds_for("heldout")[self.sweeps.keys.index(key)])
        return {int(c): box_from_map(scores[j], t) for j, c in enumerate(labels)}


def _num(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def box_results(ev: BoxEvaluation, n_boot: int = 2000) -> dict:
    """The ``boxes`` section of eval.json: every metric of ``METRICS`` at the three kinds of
    threshold, each with its 95% bootstrap interval ([low, high]; None under 2 images), as
    fractions; None where a metric counts nothing (top-1 without recorded top-1 classes)."""
    sw = ev.sweeps
    out: dict = {
        "images": len(sw),
        **ev.counts,
        "thresholds": sw.thresholds,
        "regions": sw.regions,
        "iou": 0.5,
        "gt_known_loc_curve": [_num(round(float(v), 6)) for v in sw.accuracy_curve(0.5)],
    }
    cls_once: dict = {}  # top-1 classification uses no threshold: one bootstrap for all kinds
    for kind in KINDS:
        if kind == "fixed":
            entry: dict = {"threshold": ev.fixed}
        elif kind == "oracle":
            entry = {"thresholds": {f"iou_{d}": sw.best_threshold(d) for d in IOU_THRESHOLDS}}
        else:
            entry = {"thresholds": {f"iou_{d}": sw.heldout_thresholds(d) for d in IOU_THRESHOLDS}}
        for metric in METRICS:
            if metric.startswith("top1") and not ev.counts["top1_images"]:
                entry[metric] = entry[f"{metric}_interval"] = None
                continue
            if metric == "top1_cls" and cls_once:
                entry.update(cls_once)
                continue
            value, interval = _num(box_metric(sw, metric, kind, ev.fixed)), None
            if value is not None and len(sw) >= 2:
                r = box_interval(sw, metric, kind, ev.fixed, n_boot=n_boot)
                interval = [_num(r.low), _num(r.high)]
            entry[metric], entry[f"{metric}_interval"] = value, interval
            if metric == "top1_cls":
                cls_once = {metric: value, f"{metric}_interval": interval}
        out[kind] = entry
    out["note"] = (
        "Choe et al. 2020 (CVPR): a map's box is the tight box of the largest 8-connected region "
        "above the threshold; gt_known_loc: share of (image, labelled class) pairs whose box has "
        "IoU >= 0.5 with a true box of the class; max_box_acc_v2: mean over IoU 0.3/0.5/0.7 of "
        "that share, each at its own threshold; top1_loc: top-1 class right and its box IoU >= "
        "0.5; top1_cls: top-1 class one of the labels. heldout: each half of the images (by a "
        "hash of the key) at the threshold best on the other half (the headline); fixed: "
        "cams.bg_threshold; oracle: chosen on the scored boxes themselves, an upper bound. "
        "Intervals: 95% bootstrap over images."
    )
    if not ev.counts["top1_images"]:
        out["top1_note"] = NO_TOP1
    return out


def _figures(entry: dict) -> str:
    def one(metric: str) -> str:
        v, iv = entry[metric], entry[f"{metric}_interval"]
        if v is None:
            return f"{NAMES[metric]} n/a"
        text = f"{NAMES[metric]} {100 * v:.1f}"
        if iv and None not in iv:
            text += f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"
        return text

    return ", ".join(one(m) for m in METRICS)


def box_lines(res: dict, split: str, mode: str) -> list[str]:
    """The printed box figures, labelled as the mask figures are."""
    held = res["heldout"]["thresholds"]["iou_0.5"]
    ts = ", ".join(f"{t:.2f}" for t in held.values())
    sweep = "  ".join(
        f"{t:.2f}:" + ("n/a" if v is None else f"{100 * v:.1f}")
        for t, v in zip(res["thresholds"], res["gt_known_loc_curve"], strict=True)
    )
    lines = [
        f"eval cams: {res['images']} images with {res['boxes']} boxes of {split} ({mode} maps); "
        f"box localization (Choe et al. 2020), % with [95% bootstrap interval over images]"
        + (
            f"; {res['maps_normalised']} maps max-normalised here" if res["maps_normalised"] else ""
        ),
        f"  at held-out thresholds (each half at the best of the other half, {ts}): "
        + _figures(res["heldout"]),
        f"  at the fixed cams.bg_threshold={res['fixed']['threshold']:.2f}: "
        + _figures(res["fixed"]),
        f"  best (oracle: chosen on these boxes, an upper bound; at "
        f"{res['oracle']['thresholds']['iou_0.5']:.2f}): " + _figures(res["oracle"]),
        f"  sweep (threshold:GT-known loc%)  {sweep}",
    ]
    if "top1_note" in res:
        lines.append(f"  note: {res['top1_note']}")
    return lines


def overlay_row(item: tuple, classes: list[str], fixed: float, ev: BoxEvaluation):
    """One row of ``overlays.png`` for ``item`` = (key, rgb, meta, scores, gt or None, boxes or
    None): the heat maps (for an image with boxes, each with its class's predicted box at the
    image's held-out threshold in magenta and its true boxes in green, captioned with the IoU),
    then the label map at the fixed threshold and the mask (for an image with a mask)."""
    key, rgb, meta, scores, gt, boxes = item
    names = [classes[k] for k in meta["labels"]]
    pred = cam_labels(scores, meta["labels"], fixed) if gt is not None else None
    if boxes is None:
        return cam_panel(rgb, scores, names, label_map=pred, gt=gt)
    predicted = ev.predicted_boxes(key, scores, meta["labels"])
    b = np.asarray(boxes).reshape(-1, 5)
    notes = {}
    for c, box in predicted.items():
        mine = b[b[:, 0] == c, 1:]
        if len(mine):
            notes[c] = f"IoU {float(box_iou_matrix([box], mine).max()):.2f}"
    return box_panel(rgb, scores, names, meta["labels"], boxes, predicted, pred, gt, notes=notes)


def compare_boxes(
    a: list[BoxEvaluation], b: list[BoxEvaluation], fixed: float, n_boot: int, log=print
) -> dict:
    """Paired differences MaxBoxAccV2(A) − MaxBoxAccV2(B) and GT-known loc(A) − (B), mean over
    seeds, at each kind of threshold, with 95% bootstrap intervals over images (and seeds):
    ``{kind: {metric: BoxPairedResult.to_dict()}}``."""
    out: dict = {}
    sa, sb = [e.sweeps for e in a], [e.sweeps for e in b]
    for kind in KINDS:
        out[kind] = {}
        for metric in COMPARED:
            r = box_paired_difference(sa, sb, metric, kind, fixed=fixed, n_boot=n_boot)
            out[kind][metric] = r.to_dict()
            log(f"  {r.line('A', 'B')}")
    return out
