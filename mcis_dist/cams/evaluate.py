"""``mcis eval cams``: CAM mIoU against the masks of the mapped split (standard mIoU, paper §4).

Each stored map (L, h, w) at stride s is resized bilinearly to (h·s, w·s) and cropped to the
image (H, W); a pixel's label is the argmax over [threshold, maps], 0 (background) when the
threshold wins. IoU per class (background included) from a confusion matrix summed over every
pixel whose mask is not 255.

Two numbers are reported, and kept apart on purpose:

* at ``cams.bg_threshold``, the threshold the config fixed in advance: the CAMs' quality as the
  later stages will use them;
* the sweep over ``cams.eval_thresholds`` and its best threshold: how published WSSS papers
  report CAM quality. Choosing that threshold looks at ground truth, so it is for reporting only;
  no stage of this package ever reads it back.
"""

from __future__ import annotations

import json

from tqdm import tqdm

from mcis_dist.cams.maps import cam_labels, upsample_cams
from mcis_dist.cams.stage import check_model_state
from mcis_dist.config import ExperimentConfig
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.transforms import decode_mask, decode_rgb_array
from mcis_dist.evaluation import ConfusionMatrix, ThresholdSweep, format_table
from mcis_dist.evaluation.overlay import cam_panel, upload_grid
from mcis_dist.formats.cams import iter_cam_shard, read_cam_manifest
from mcis_dist.formats.shards import iter_shard
from mcis_dist.models.build import build_model
from mcis_dist.models.diagnostics import split_report
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.checkpoint import CheckpointError, load_model_state
from mcis_dist.runtime.paths import absolute_url, endpoint_url
from mcis_dist.runtime.sharded import StageError, Timer
from mcis_dist.storage import StorageError, open_storage

__all__ = ["evaluate_cams"]


def evaluate_cams(
    cfg: ExperimentConfig,
    cams_url: str | None = None,
    thresholds=None,
    out_url: str | None = None,
    log=print,
) -> dict:
    """Evaluate a finished CAM folder against its split's masks; write ``eval.json`` (and
    ``overlays.png``) to ``out_url`` (default ``<cams>/eval``) and return the results."""

    timer, endpoint = Timer(), endpoint_url(cfg)
    cams_url = absolute_url(cams_url or cfg.cams.out_url)
    manifest, cams = read_cam_manifest(cams_url, endpoint)
    source_manifest, source = open_manifest(manifest["source"]["url"], endpoint)
    classes = manifest["classes"]
    names = ["background", *classes]
    fixed = cfg.cams.bg_threshold
    sweep_t = sorted(set(thresholds if thresholds is not None else cfg.cams.eval_thresholds))
    sweep = ThresholdSweep(len(names), sorted({*sweep_t, fixed}))
    counts = {"images": 0, "no_mask": 0, "no_cam": 0, "bad": 0}
    panels: list = []
    by_source = {s["name"]: s for s in source_manifest["shards"]}
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
                if "mask.png" not in raw:
                    counts["no_mask"] += 1
                    continue
                meta, m = maps[key]
                try:
                    gt = decode_mask(raw["mask.png"])
                    if list(gt.shape) != meta["size"]:
                        raise ValueError(f"mask {gt.shape} but image {meta['size']}")
                    scores = upsample_cams(m, meta["stride"], tuple(meta["size"]))
                    sweep.update(scores, meta["labels"], gt)
                except ValueError as e:
                    counts["bad"] += 1
                    log(f"eval cams: skipped {key}: {e}")
                    continue
                counts["images"] += 1
                bar.update(1)
                if len(panels) < cfg.cams.eval_grid:
                    rgb = decode_rgb_array(raw.get("jpg", raw.get("png")))
                    pred = cam_labels(scores, meta["labels"], fixed)
                    panels.append(
                        (
                            key,
                            cam_panel(
                                rgb,
                                scores,
                                [classes[k] for k in meta["labels"]],
                                label_map=pred,
                                gt=gt,
                            ),
                        )
                    )
    if counts["images"] == 0:
        raise StageError(
            f"none of the {manifest['samples']} mapped images of {manifest['source']['url']} has a "
            f"mask: CAM mIoU needs a split with masks (e.g. the synthetic train split)"
        )
    at_fixed = sweep.matrix_at(fixed)
    best_t, best = _best(sweep, sweep_t)
    result = {
        "cams": cams.describe(),
        "split": manifest["source"]["url"],
        "mode": manifest["settings"]["mode"],
        **counts,
        "thresholds": sweep_t,
        "miou": [round(sweep.matrix_at(t).miou(), 6) for t in sweep_t],
        "threshold": fixed,
        "at_threshold": at_fixed.to_dict(names),
        "best_threshold": best_t,
        "best": best.to_dict(names),
        "note": "best_threshold is chosen by looking at ground truth: for reporting only",
        "seconds": timer(),
    }
    if cfg.cams.eval_attention_pairs:
        result["attention"] = attention_report(cfg, manifest, source_manifest, source, log)
    out = open_storage(
        absolute_url(out_url) if out_url else cams.describe("eval"), endpoint_url=endpoint
    )
    out.write_bytes("eval.json", json.dumps(result, indent=1).encode())
    if panels:
        upload_grid(
            out,
            "overlays.png",
            [cells for _, (cells, _c) in panels],
            [caps for _, (_x, caps) in panels],
        )
    result["out"] = out.describe()
    log(_report(result, sweep_t, names, at_fixed))
    return result


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


def _report(result: dict, thresholds, names, at_fixed: ConfusionMatrix) -> str:
    sweep = "  ".join(
        f"{t:.2f}:{100 * m:.1f}" for t, m in zip(thresholds, result["miou"], strict=True)
    )
    lines = [
        f"eval cams: {result['images']} images of {result['split']} ({result['mode']} maps)",
        f"  sweep (threshold:mIoU%)  {sweep}",
        f"  best (oracle, reporting only): {100 * result['best']['miou']:.1f} at "
        f"{result['best_threshold']:.2f}",
        format_table(
            names,
            at_fixed.iou(),
            title=f"IoU per class at cams.bg_threshold={result['threshold']:.2f}",
        ),
        _attention_line(result.get("attention")),
        f"  written: {result['out']}/eval.json"
        + (", overlays.png" if result.get("images") else ""),
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
