"""``mcis eval cams``: CAM mIoU against the masks of the mapped split (standard mIoU, paper §4).

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

``compare_cams`` (``mcis eval compare A B``) scores two map sets of the same images and gives
their paired difference with a 95% bootstrap interval over the images.
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
from mcis_dist.evaluation.heldout import KINDS, PerImageSweeps, paired_difference
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

__all__ = ["compare_cams", "evaluate_cams", "image_sweeps", "scored_images"]


def scored_images(cfg: ExperimentConfig, cams_url: str, counts: dict, log=print):
    """Every mapped image of a CAM folder that has a mask: yields (key, raw sample, meta,
    scores (L, H, W) on the image grid, gt (H, W)); ``counts`` gets images / no_mask / no_cam /
    bad. A mask whose size differs from its image is skipped and named."""
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
                if "mask.png" not in raw:
                    counts["no_mask"] += 1
                    continue
                meta, m = maps[key]
                try:
                    gt = decode_mask(raw["mask.png"])
                    if list(gt.shape) != meta["size"]:
                        raise ValueError(f"mask {gt.shape} but image {meta['size']}")
                    scores = upsample_cams(m, meta["stride"], tuple(meta["size"]))
                except ValueError as e:
                    counts["bad"] += 1
                    log(f"eval cams: skipped {key}: {e}")
                    continue
                counts["images"] += 1
                bar.update(1)
                yield key, raw, meta, scores, gt


def image_sweeps(
    cfg: ExperimentConfig, cams_url: str | None = None, thresholds=None, log=print
) -> tuple[PerImageSweeps, dict, dict]:
    """(per-image sweeps, counts, the CAM manifest) of a finished CAM folder, over
    ``thresholds`` (default ``cams.eval_thresholds``) plus ``cams.bg_threshold``."""
    cams_url = absolute_url(cams_url or cfg.cams.out_url)
    manifest, _ = read_cam_manifest(cams_url, endpoint_url(cfg))
    sweep_t = thresholds if thresholds is not None else cfg.cams.eval_thresholds
    sweeps = PerImageSweeps(1 + len(manifest["classes"]), [*sweep_t, cfg.cams.bg_threshold])
    counts: dict = {}
    for key, _raw, meta, scores, gt in scored_images(cfg, cams_url, counts, log):
        sweeps.add(key, scores, meta["labels"], gt)
    _check_any(counts, manifest)
    return sweeps, counts, manifest


def _check_any(counts: dict, manifest: dict) -> None:
    if counts["images"] == 0:
        raise StageError(
            f"none of the {manifest['samples']} mapped images of {manifest['source']['url']} has a "
            f"mask: CAM mIoU needs a split with masks (e.g. the synthetic train split)"
        )


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
    per_image = PerImageSweeps(len(names), [*sweep_t, fixed])
    counts: dict = {}
    panels: list = []
    for key, raw, meta, scores, gt in scored_images(cfg, cams_url, counts, log):
        per_image.add(key, scores, meta["labels"], gt)
        if len(panels) < cfg.cams.eval_grid:
            rgb = decode_rgb_array(raw.get("jpg", raw.get("png")))
            pred = cam_labels(scores, meta["labels"], fixed)
            labels = [classes[k] for k in meta["labels"]]
            panels.append((key, cam_panel(rgb, scores, labels, label_map=pred, gt=gt)))
    _check_any(counts, manifest)
    sweep = per_image.sweep()
    at_fixed = sweep.matrix_at(fixed)
    best_t, best = _best(sweep, sweep_t)
    heldout = per_image.matrix("heldout")
    result = {
        "cams": cams.describe(),
        "split": manifest["source"]["url"],
        "mode": manifest["settings"]["mode"],
        **counts,
        "thresholds": sweep_t,
        "miou": [round(sweep.matrix_at(t).miou(), 6) for t in sweep_t],
        "miou_heldout": heldout.miou(),
        "heldout": {
            **heldout.to_dict(names),
            "thresholds": per_image.heldout_thresholds(),
            "images": [int((per_image.folds() == f).sum()) for f in (0, 1)],
        },
        "threshold": fixed,
        "at_threshold": at_fixed.to_dict(names),
        "best_threshold": best_t,
        "best": best.to_dict(names),
        "note": "heldout: each half of the images (by a hash of the key) scored at the "
        "threshold best on the other half, pooled (the headline); at_threshold: the config's "
        "fixed threshold; best: the oracle, chosen on the scored masks themselves",
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
    log(_report(result, sweep_t, names, heldout))
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


def _report(result: dict, thresholds, names, heldout: ConfusionMatrix) -> str:
    ts = ", ".join(f"{t:.2f}" for t in result["heldout"]["thresholds"].values())
    sweep = "  ".join(
        f"{t:.2f}:{100 * m:.1f}" for t, m in zip(thresholds, result["miou"], strict=True)
    )
    lines = [
        f"eval cams: {result['images']} images of {result['split']} ({result['mode']} maps)",
        f"  mIoU at held-out thresholds (each half at the best of the other half, "
        f"{ts}): {100 * result['miou_heldout']:.1f}",
        f"  mIoU at the fixed cams.bg_threshold={result['threshold']:.2f}: "
        f"{100 * result['at_threshold']['miou']:.1f}",
        f"  sweep (threshold:mIoU%)  {sweep}",
        f"  best (oracle: chosen on these masks, an upper bound): "
        f"{100 * result['best']['miou']:.1f} at {result['best_threshold']:.2f}",
        format_table(names, heldout.iou(), title="IoU per class at the held-out thresholds"),
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
    with a 95% bootstrap interval over images (and seeds); writes ``compare.json`` to
    ``out_url`` when given."""
    if len(a_urls) != len(b_urls) or not a_urls:
        raise ValueError(f"need as many A folders as B folders, got {len(a_urls)}, {len(b_urls)}")
    a = [image_sweeps(cfg, u, log=log)[0] for u in a_urls]
    b = [image_sweeps(cfg, u, log=log)[0] for u in b_urls]
    result = {"a": [absolute_url(u) for u in a_urls], "b": [absolute_url(u) for u in b_urls]}
    for kind in KINDS:
        r = paired_difference(a, b, kind, fixed=cfg.cams.bg_threshold, n_boot=n_boot)
        result[kind] = r.to_dict()
        log(f"  {r.line('A', 'B')}")
    if out_url:
        out = open_storage(absolute_url(out_url), endpoint_url=endpoint_url(cfg))
        out.write_bytes("compare.json", json.dumps(result, indent=1).encode())
        result["out"] = out.describe("compare.json")
    return result
