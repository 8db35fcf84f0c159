"""``mcis eval cams``: CAM mIoU against the masks of the mapped split (standard mIoU, paper §4),
and box localization against its bounding boxes.

Each stored map (L, h, w) at stride s is resized bilinearly to (h·s, w·s) and cropped to the
image (H, W); a pixel's label is the argmax over [threshold, maps], 0 (background) when the
threshold wins. IoU per class (background included) from a confusion matrix summed over every
pixel whose mask is not 255.

Three numbers are reported, and kept apart on purpose (``mcis_dist.evaluation.heldout``):

* **held-out** (``miou_heldout``, the headline): the images are split into two fixed halves by
  a hash of their key; each half is scored at the threshold of ``cams.eval_thresholds`` that is
  best on the *other* half, and the two halves are pooled. No image is scored at a threshold its
  own mask helped to choose;
* at ``cams.bg_threshold``, the threshold the config fixed in advance: the CAMs' quality as the
  later stages will use them;
* the sweep and its best threshold (``best``): how published WSSS papers report CAM quality.
  Choosing that threshold looks at the scored masks themselves, so it is an oracle, an upper
  bound; no stage of this package ever reads it back.

On a split whose images carry bounding boxes, the maps are also scored as weakly supervised
object localization is (Choe et al., CVPR 2020): GT-known loc, MaxBoxAccV2, top-1 loc and top-1
cls, each at held-out, fixed and oracle thresholds with a 95% bootstrap interval, under
``boxes`` in eval.json (``mcis_dist.cams.evaluate_boxes``). A split with masks and boxes gets
both; one with neither is refused.

``compare_cams`` (``mcis eval compare A B``) scores two map sets of the same images and gives
their paired difference (mIoU; MaxBoxAccV2 and GT-known loc on a split with boxes) with a 95%
bootstrap interval over the images.
"""

from __future__ import annotations

import json

from tqdm import tqdm

from mcis_dist.cams.evaluate_boxes import (
    BoxEvaluation,
    box_lines,
    box_results,
    check_boxes,
    compare_boxes,
    overlay_row,
)
from mcis_dist.cams.maps import upsample_cams
from mcis_dist.cams.stage import check_model_state
from mcis_dist.config import ExperimentConfig
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.transforms import decode_mask, decode_rgb_array
from mcis_dist.evaluation import ConfusionMatrix, ThresholdSweep, format_table
from mcis_dist.evaluation.heldout import KINDS, PerImageSweeps, paired_difference
from mcis_dist.evaluation.overlay import upload_grid
from mcis_dist.formats.cams import iter_cam_shard, read_cam_manifest
from mcis_dist.formats.shards import decode_boxes, iter_shard
from mcis_dist.models.build import build_model
from mcis_dist.models.diagnostics import split_report
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.checkpoint import CheckpointError, load_model_state
from mcis_dist.runtime.paths import absolute_url, endpoint_url
from mcis_dist.runtime.sharded import StageError, Timer
from mcis_dist.storage import StorageError, open_storage

__all__ = [
    "compare_cams",
    "evaluate_cams",
    "image_sweeps",
    "map_sweeps",
    "mapped_images",
    "scored_images",
]


def mapped_images(cfg: ExperimentConfig, cams_url: str, counts: dict, log=print):
    """Every mapped image of a CAM folder that has a mask or boxes: yields (key, raw sample,
    meta, maps as stored (L, h, w), scores (L, H, W) on the image grid, gt (H, W) or None,
    boxes (n, 5) or None); ``counts`` gets images (with a mask) / no_mask / no_cam / bad, and
    box_images when some have boxes. A mask whose size differs from its image, or a box outside
    it or of a class without a map, is skipped and named."""
    endpoint = endpoint_url(cfg)
    manifest, cams = read_cam_manifest(cams_url, endpoint)
    source_manifest, source = open_manifest(manifest["source"]["url"], endpoint)
    by_source = {s["name"]: s for s in source_manifest["shards"]}
    for k in ("images", "no_mask", "no_cam", "bad"):
        counts.setdefault(k, 0)
    with tqdm(total=manifest["samples"], desc="eval cams", unit="img", disable=None) as bar:
        for shard in manifest["shards"]:
            if shard["source"] not in by_source:
                raise StageError(
                    f"{cams.describe(shard['name'])} was made from {shard['source']},"
                    f" which {source.describe()} no longer has"
                )
            maps = {meta["key"]: (meta, m) for meta, m in iter_cam_shard(cams, shard["name"])}
            for raw in iter_shard(
                source.describe(shard["source"]), getattr(source, "endpoint_url", None)
            ):
                key = raw["__key__"]
                if key not in maps:
                    counts["no_cam"] += 1
                    continue
                meta, m = maps[key]
                try:
                    boxes = decode_boxes(raw)
                    boxes = boxes if boxes is not None and len(boxes) else None
                    if boxes is not None:
                        check_boxes(boxes, meta["labels"], meta["size"])
                    gt = decode_mask(raw["mask.png"]) if "mask.png" in raw else None
                    if gt is not None and list(gt.shape) != meta["size"]:
                        raise ValueError(f"mask {gt.shape} but image {meta['size']}")
                    if gt is None and boxes is None:
                        counts["no_mask"] += 1
                        continue
                    scores = upsample_cams(m, meta["stride"], tuple(meta["size"]))
                except ValueError as e:
                    counts["bad"] += 1
                    log(f"eval cams: skipped {key}: {e}")
                    continue
                if gt is None:
                    counts["no_mask"] += 1
                else:
                    counts["images"] += 1
                if boxes is not None:
                    counts["box_images"] = counts.get("box_images", 0) + 1
                bar.update(1)
                yield key, raw, meta, m, scores, gt, boxes


def scored_images(cfg: ExperimentConfig, cams_url: str, counts: dict, log=print):
    """Every mapped image of a CAM folder that has a mask: yields (key, raw sample, meta,
    scores (L, H, W) on the image grid, gt (H, W)); ``counts`` as ``mapped_images``."""
    for key, raw, meta, _m, scores, gt, _boxes in mapped_images(cfg, cams_url, counts, log):
        if gt is not None:
            yield key, raw, meta, scores, gt


def map_sweeps(
    cfg: ExperimentConfig, cams_url: str | None = None, thresholds=None, log=print
) -> tuple[PerImageSweeps | None, BoxEvaluation | None, dict, dict]:
    """(per-image mask sweeps or None, box sweeps or None, counts, the CAM manifest) of a
    finished CAM folder, in one pass: masks over ``thresholds`` (default
    ``cams.eval_thresholds``) plus ``cams.bg_threshold``, boxes over ``BOX_THRESHOLDS`` plus
    ``cams.bg_threshold``; None for a kind of truth no mapped image has."""
    cams_url = absolute_url(cams_url or cfg.cams.out_url)
    manifest, _ = read_cam_manifest(cams_url, endpoint_url(cfg))
    sweep_t = thresholds if thresholds is not None else cfg.cams.eval_thresholds
    sweeps = PerImageSweeps(1 + len(manifest["classes"]), [*sweep_t, cfg.cams.bg_threshold])
    boxes = BoxEvaluation(cfg.cams.bg_threshold)
    counts: dict = {}
    for key, _raw, meta, m, scores, gt, gt_boxes in mapped_images(cfg, cams_url, counts, log):
        if gt is not None:
            sweeps.add(key, scores, meta["labels"], gt)
        if gt_boxes is not None:
            boxes.add(key, meta, m, scores, gt_boxes)
    _check_any(counts, manifest)
    return (sweeps if counts["images"] else None), (boxes if len(boxes) else None), counts, manifest


def image_sweeps(
    cfg: ExperimentConfig, cams_url: str | None = None, thresholds=None, log=print
) -> tuple[PerImageSweeps, dict, dict]:
    """(per-image sweeps, counts, the CAM manifest) of a finished CAM folder, over
    ``thresholds`` (default ``cams.eval_thresholds``) plus ``cams.bg_threshold``."""
    sweeps, _boxes, counts, manifest = map_sweeps(cfg, cams_url, thresholds, log)
    if sweeps is None:
        raise StageError(
            f"none of the {manifest['samples']} mapped images of {manifest['source']['url']} has "
            "a mask: CAM mIoU needs a split with masks (its boxes are scored by `mcis eval cams`)"
        )
    return sweeps, counts, manifest


def _check_any(counts: dict, manifest: dict) -> None:
    if counts["images"] == 0 and not counts.get("box_images"):
        raise StageError(
            f"none of the {manifest['samples']} mapped images of {manifest['source']['url']} has a "
            f"mask or boxes: CAM evaluation needs a split with masks (CAM mIoU, e.g. the "
            f"synthetic train split) or bounding boxes (box localization, e.g. a split built "
            f"with `mcis shards build ... --boxes`)"
        )


def evaluate_cams(
    cfg: ExperimentConfig,
    cams_url: str | None = None,
    thresholds=None,
    out_url: str | None = None,
    log=print,
) -> dict:
    """Evaluate a finished CAM folder against its split's masks and/or boxes; write
    ``eval.json`` (and ``overlays.png``) to ``out_url`` (default ``<cams>/eval``) and return
    the results. Box figures go under ``boxes`` (``mcis_dist.cams.evaluate_boxes``)."""

    timer, endpoint = Timer(), endpoint_url(cfg)
    cams_url = absolute_url(cams_url or cfg.cams.out_url)
    manifest, cams = read_cam_manifest(cams_url, endpoint)
    source_manifest, source = open_manifest(manifest["source"]["url"], endpoint)
    classes = manifest["classes"]
    names = ["background", *classes]
    fixed = cfg.cams.bg_threshold
    sweep_t = sorted(set(thresholds if thresholds is not None else cfg.cams.eval_thresholds))
    per_image = PerImageSweeps(len(names), [*sweep_t, fixed])
    box_eval = BoxEvaluation(fixed)
    counts: dict = {}
    shown: list = []  # the first cams.eval_grid images, drawn once the thresholds are chosen
    for key, raw, meta, m, scores, gt, boxes in mapped_images(cfg, cams_url, counts, log):
        if gt is not None:
            per_image.add(key, scores, meta["labels"], gt)
        if boxes is not None:
            scores = box_eval.add(key, meta, m, scores, boxes)
        if len(shown) < cfg.cams.eval_grid:
            rgb = decode_rgb_array(raw.get("jpg", raw.get("png")))
            shown.append((key, rgb, meta, scores, gt, boxes))
    _check_any(counts, manifest)
    result = {
        "cams": cams.describe(),
        "split": manifest["source"]["url"],
        "mode": manifest["settings"]["mode"],
        **counts,
    }
    heldout = None
    if counts["images"]:
        heldout = per_image.matrix("heldout")
        result.update(_mask_results(per_image, sweep_t, fixed, names, heldout))
    if len(box_eval):
        result["boxes"] = box_results(box_eval)
    result["seconds"] = timer()
    if cfg.cams.eval_attention_pairs:
        result["attention"] = attention_report(cfg, manifest, source_manifest, source, log)
    out = open_storage(
        absolute_url(out_url) if out_url else cams.describe("eval"), endpoint_url=endpoint
    )
    out.write_bytes("eval.json", json.dumps(result, indent=1).encode())
    if shown:
        panels = [overlay_row(item, classes, fixed, box_eval) for item in shown]
        upload_grid(out, "overlays.png", [p[0] for p in panels], [p[1] for p in panels])
    result["out"] = out.describe()
    log(_report(result, sweep_t, names, heldout, overlays=bool(shown)))
    return result


def _mask_results(per_image: PerImageSweeps, sweep_t, fixed, names, heldout) -> dict:
    sweep = per_image.sweep()
    best_t, best = _best(sweep, sweep_t)
    return {
        "thresholds": sweep_t,
        "miou": [round(sweep.matrix_at(t).miou(), 6) for t in sweep_t],
        "miou_heldout": heldout.miou(),
        "heldout": {
            **heldout.to_dict(names),
            "thresholds": per_image.heldout_thresholds(),
            "images": [int((per_image.folds() == f).sum()) for f in (0, 1)],
        },
        "threshold": fixed,
        "at_threshold": sweep.matrix_at(fixed).to_dict(names),
        "best_threshold": best_t,
        "best": best.to_dict(names),
        "note": "heldout: each half of the images (by a hash of the key) scored at the "
        "threshold best on the other half, pooled (the headline); at_threshold: the config's "
        "fixed threshold; best: the oracle, chosen on the scored masks themselves",
    }


def attention_report(
    cfg: ExperimentConfig, manifest: dict, source_manifest: dict, source, log=print
) -> dict | None:
    """The classifier's attention diagnostics (``mcis_dist.models.diagnostics``) on
    ``cams.eval_attention_pairs`` pairs of the mapped split; None (with a line) when the maps'
    checkpoint cannot be loaded."""

    try:
        state, where = ckpt.classifier_checkpoint(cfg, manifest.get("checkpoint"))
        check_model_state(cfg, state, len(manifest["classes"]), where)
    except (StageError, CheckpointError, StorageError) as e:
        log(f"eval cams: no attention diagnostics ({e})")
        return None
    model = build_model(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}),
        len(manifest["classes"]),
    )
    load_model_state(model, state, where=where)
    sampler = RelatedSampler(source_manifest, source, seed=cfg.cams.seed)
    report = split_report(
        model.eval(),
        sampler,
        cfg.data.crop_size,
        cfg.data.mean,
        cfg.data.std,
        pairs=cfg.cams.eval_attention_pairs,
        seed=cfg.cams.seed,
    )
    report["checkpoint"] = where
    return report


def _best(sweep: ThresholdSweep, thresholds) -> tuple[float, ConfusionMatrix]:
    scored = [(sweep.matrix_at(t).miou(), -i, t) for i, t in enumerate(thresholds)]
    _, _, t = max(scored)
    return t, sweep.matrix_at(t)


def _report(
    result: dict, thresholds, names, heldout: ConfusionMatrix | None, overlays: bool
) -> str:
    lines = []
    if heldout is not None:
        ts = ", ".join(f"{t:.2f}" for t in result["heldout"]["thresholds"].values())
        sweep = "  ".join(
            f"{t:.2f}:{100 * m:.1f}" for t, m in zip(thresholds, result["miou"], strict=True)
        )
        lines += [
            f"eval cams: {result['images']} images of {result['split']} ({result['mode']} maps)",
            f"  mIoU at held-out thresholds (each half at the best of the other half, "
            f"{ts}): {100 * result['miou_heldout']:.1f}",
            f"  mIoU at the fixed cams.bg_threshold={result['threshold']:.2f}: "
            f"{100 * result['at_threshold']['miou']:.1f}",
            f"  sweep (threshold:mIoU%)  {sweep}",
            f"  best (oracle: chosen on these masks, an upper bound): "
            f"{100 * result['best']['miou']:.1f} at {result['best_threshold']:.2f}",
            format_table(names, heldout.iou(), title="IoU per class at the held-out thresholds"),
        ]
    if "boxes" in result:
        lines += box_lines(result["boxes"], result["split"], result["mode"])
    lines += [
        _attention_line(result.get("attention")),
        f"  written: {result['out']}/eval.json" + (", overlays.png" if overlays else ""),
    ]
    return "\n".join(lines)


def _attention_line(a: dict | None) -> str:
    if not a or not a.get("pairs"):
        return "  attention diagnostics: none"

    def f(key):
        v = a.get(key)
        return "n/a" if v is None else f"{v:.3g}"

    return (
        f"  attention ({a['affinity']}, {a['pairs']} pairs): hub mass top-1 {f('hub_top1')} "
        f"top-5 {f('hub_top5')}, background->objects {f('bg_to_fg')}x chance, "
        f"objects->same class {f('fg_to_same')}x chance, gate mean {f('gate_mean')} "
        f"IoU {f('gate_iou')}, W_P drift {f('w_p_drift')}"
    )


def compare_cams(
    cfg: ExperimentConfig,
    a_urls: list[str],
    b_urls: list[str],
    n_boot: int = 2000,
    out_url: str | None = None,
    log=print,
) -> dict:
    """Paired comparison of map sets A and B of the same images (one folder each per seed):
    for each kind of threshold (held-out, fixed, oracle), mean over seeds of mIoU(A) − mIoU(B)
    (on a split with masks) and of MaxBoxAccV2 and GT-known loc (on a split with boxes, under
    ``boxes``), with 95% bootstrap intervals over images (and seeds); writes ``compare.json``
    to ``out_url`` when given."""
    if len(a_urls) != len(b_urls) or not a_urls:
        raise ValueError(f"need as many A folders as B folders, got {len(a_urls)}, {len(b_urls)}")
    a = [map_sweeps(cfg, u, log=log) for u in a_urls]
    b = [map_sweeps(cfg, u, log=log) for u in b_urls]
    result = {"a": [absolute_url(u) for u in a_urls], "b": [absolute_url(u) for u in b_urls]}
    fixed = cfg.cams.bg_threshold
    if all(x[0] is not None for x in (*a, *b)):
        for kind in KINDS:
            r = paired_difference(
                [x[0] for x in a], [x[0] for x in b], kind, fixed=fixed, n_boot=n_boot
            )
            result[kind] = r.to_dict()
            log(f"  {r.line('A', 'B')}")
    if all(x[1] is not None for x in (*a, *b)):
        result["boxes"] = compare_boxes(
            [x[1] for x in a], [x[1] for x in b], fixed, n_boot=n_boot, log=log
        )
    if len(result) == 2:
        raise ValueError(
            "the map sets share no kind of truth: every folder of A and B must map a split "
            "with masks, or every one a split with boxes"
        )
    if out_url:
        out = open_storage(absolute_url(out_url), endpoint_url=endpoint_url(cfg))
        out.write_bytes("compare.json", json.dumps(result, indent=1).encode())
        result["out"] = out.describe("compare.json")
    return result
