"""``mcis eval masks``: the mIoU of a label folder (pseudo masks or confident labels) against the
masks of its image split (standard mIoU, paper §4).

One confusion matrix over every pixel whose ground truth is not 255. A label map may say 255
itself (ignore: the random walk's margin, the saliency route, confident labels); those pixels
are reported two ways, kept apart on purpose:

* ``miou`` (and ``per_class``, ``matrix``): pixels the labels ignore are left out, like the
  pixels the ground truth ignores; ``ignored_share`` is the share of the counted ground-truth
  pixels left out that way (the labels' coverage is 1 - ignored_share). This is how good the
  labels are where they say something, which is what a segmentation net trained on them sees.
* ``miou_ignore_as_bg``: every ignored pixel counted as background, so labels that ignore a lot
  cannot look better than they are.

``by_half`` gives ``miou`` on each fixed half of the images (a hash of the key,
``mcis_dist.evaluation.heldout.fold_of``): settings chosen by looking at one half's masks (the
random walk's beta, steps, background) are reported on the other half.
"""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from mcis_dist.config import ExperimentConfig
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.transforms import decode_mask, decode_rgb_array
from mcis_dist.evaluation import ConfusionMatrix, blend, colorize, format_table, upload_grid
from mcis_dist.evaluation.heldout import fold_of
from mcis_dist.formats.labels import IGNORE, iter_label_shard, read_label_manifest
from mcis_dist.formats.shards import iter_shard
from mcis_dist.runtime.paths import absolute_url, endpoint_url
from mcis_dist.runtime.sharded import StageError, Timer
from mcis_dist.storage import open_storage

__all__ = ["evaluate_masks", "count_labels"]


def count_labels(
    left_out: ConfusionMatrix, as_bg: ConfusionMatrix, gt: np.ndarray, pred: np.ndarray
) -> tuple[int, int]:
    """Count one (gt, pred) pair of (H, W) label maps into both matrices: ``left_out`` without
    the pixels ``pred`` ignores, ``as_bg`` with them as background. Returns (ground-truth
    pixels counted, of which the prediction ignores)."""
    gt, pred = np.asarray(gt, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"labels {pred.shape} but mask {gt.shape}")
    ignored = pred == IGNORE
    as_bg.update(gt, np.where(ignored, 0, pred))
    left_out.update(np.where(ignored, IGNORE, gt), np.where(ignored, 0, pred))
    valid = gt != IGNORE
    return int(valid.sum()), int((valid & ignored).sum())


def _panel(rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> list[np.ndarray]:
    return [rgb, blend(rgb, colorize(pred)), blend(rgb, colorize(gt))]


def evaluate_masks(
    cfg: ExperimentConfig, masks_url: str | None = None, out_url: str | None = None, log=print
) -> dict:
    """Evaluate a finished label folder (default ``masks.out_url``) against its split's masks;
    write ``eval.json`` and ``overlays.png`` to ``out_url`` (default ``<masks>/eval``)."""

    timer, endpoint = Timer(), endpoint_url(cfg)
    masks_url = absolute_url(masks_url or cfg.masks.out_url)
    manifest, labels = read_label_manifest(masks_url, endpoint)
    source_manifest, source = open_manifest(manifest["source"]["url"], endpoint)
    names = ["background", *manifest["classes"]]
    left_out, as_bg = ConfusionMatrix(len(names)), ConfusionMatrix(len(names))
    halves = [ConfusionMatrix(len(names)), ConfusionMatrix(len(names))]
    counts = {"images": 0, "no_mask": 0, "no_label": 0, "bad": 0}
    pixels = ignored = 0
    panels: list = []
    have = {s["name"] for s in source_manifest["shards"]}
    with tqdm(total=manifest["samples"], desc="eval masks", unit="img", disable=None) as bar:
        for shard in manifest["shards"]:
            if shard["source"] not in have:
                raise StageError(
                    f"{labels.describe(shard['name'])} was made from "
                    f"{shard['source']}, which {source.describe()} no longer has"
                )
            preds = {meta["key"]: p for meta, p in iter_label_shard(labels, shard["name"])}
            for raw in iter_shard(
                source.describe(shard["source"]), getattr(source, "endpoint_url", None)
            ):
                key = raw["__key__"]
                if key not in preds:
                    counts["no_label"] += 1
                    continue
                if "mask.png" not in raw:
                    counts["no_mask"] += 1
                    continue
                pred = preds[key]
                try:
                    gt = decode_mask(raw["mask.png"])
                    n, k = count_labels(left_out, as_bg, gt, pred)
                    count_labels(halves[fold_of(key)], ConfusionMatrix(len(names)), gt, pred)
                except ValueError as e:
                    counts["bad"] += 1
                    log(f"eval masks: skipped {key}: {e}")
                    continue
                pixels, ignored = pixels + n, ignored + k
                counts["images"] += 1
                bar.update(1)
                if len(panels) < cfg.masks.eval_grid:
                    panels.append(
                        (key, _panel(decode_rgb_array(raw.get("jpg", raw.get("png"))), pred, gt))
                    )
    if counts["images"] == 0:
        raise StageError(
            f"none of the {manifest['samples']} labelled images of {manifest['source']['url']} "
            f"has a mask: label mIoU needs a split with masks (e.g. the synthetic train split)"
        )
    result = {
        "masks": labels.describe(),
        "split": manifest["source"]["url"],
        "kind": manifest["kind"],
        "mode": manifest["mode"],
        **counts,
        **left_out.to_dict(names),
        "ignored_share": round(ignored / pixels, 6) if pixels else None,
        "miou_ignore_as_bg": as_bg.to_dict(names)["miou"],
        "ignore_as_bg": as_bg.to_dict(names),
        "by_half": {
            str(f): {"miou": h.to_dict(names)["miou"], "pixels": h.total}
            for f, h in enumerate(halves)
        },
        "seconds": timer(),
    }
    out = open_storage(
        absolute_url(out_url) if out_url else labels.describe("eval"), endpoint_url=endpoint
    )
    out.write_bytes("eval.json", json.dumps(result, indent=1).encode())
    if panels:
        upload_grid(
            out,
            "overlays.png",
            [cells for _, cells in panels],
            [[key, "labels", "gt"] for key, _ in panels],
        )
    result["out"], result["overlays"] = out.describe(), bool(panels)
    log(_report(result, names, left_out))
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _report(result: dict, names, left_out: ConfusionMatrix) -> str:
    lines = [
        f"eval masks: {result['images']} images of {result['split']} ({result['kind']} labels, "
        f"mode {result['mode']})",
        f"  mIoU {_pct(result['miou'])} where the labels say something (they ignore "
        f"{_pct(result['ignored_share'])}% of the pixels); {_pct(result['miou_ignore_as_bg'])} "
        f"with ignored pixels as background",
        format_table(names, left_out.iou(), title="IoU per class (ignored pixels left out)"),
        f"  written: {result['out']}/eval.json" + (", overlays.png" if result["overlays"] else ""),
    ]
    return "\n".join(lines)
