"""``mcis eval seg``: the segmentation network's mIoU on a split with masks (paper §4).

The split's shards are shared out over a pool of Ray actors (one per GPU, or ``seg.num_actors``
of ``seg.cpus_per_actor`` CPUs), each holding the network for its whole life and labelling whole
shards at the test scales ``seg.eval_scales`` × ``seg.eval_flip``, refined by the dense CRF when
``seg.crf`` (``mcis_dist.seg.infer.predict_labels``). Each shard comes back as its *raw*
confusion matrix; the driver sums them (never averaging per-shard mIoU), so the result is the
matrix of one pass over every pixel whose mask is not 255, whatever the number of actors. A lost
actor's shard is redone by a replacement (``mcis_dist.runtime.sharded.run_sharded``); an evaluation
writes no shards, so there is nothing to resume.

Writes ``eval.json`` (miou, per_class, matrix, settings, images, seconds, images_per_s) and
``overlays.png`` (image, prediction, mask) to ``<seg.out_url>/eval`` (or ``out_url``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import ray
import torch
from PIL import Image
from tqdm import tqdm

from mcis_dist.config import ExperimentConfig, config_from_dict
from mcis_dist.crf import crf_inference
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.stream import IMAGE_EXTS, iter_shard
from mcis_dist.data.transforms import decode_rgb, normalize
from mcis_dist.evaluation import ConfusionMatrix, blend, colorize, format_table, upload_grid
from mcis_dist.formats.labels import decode_label
from mcis_dist.models.deeplab import build_segmenter
from mcis_dist.runtime.paths import absolute_paths, absolute_url, endpoint_url
from mcis_dist.runtime.session import ray_session
from mcis_dist.runtime.sharded import StageError, Timer, actor_options, plan_actors, run_sharded
from mcis_dist.seg.infer import predict_labels
from mcis_dist.seg.train import load_segmenter
from mcis_dist.storage import open_storage

__all__ = ["SegActor", "evaluate_seg", "eval_settings"]

MAX_LISTED = 1000  # bad samples listed by key in eval.json (all are counted)


# ---------------------------------------------------------------------------------- the worker
def eval_settings(cfg: ExperimentConfig) -> dict:
    """The test-time settings a prediction depends on."""
    s = cfg.seg
    return {
        "scales": list(s.eval_scales),
        "flip": s.eval_flip,
        "crf": s.crf,
        "arch": s.arch,
        "backbone": s.backbone,
        "output_stride": s.output_stride,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class SegActor:
    """One trained network for the actor's life; ``labels(rgb)`` is its test-time prediction.
    Evaluation (``run``: one shard → its confusion matrix) and ``mcis predict`` (a subclass)
    share it."""

    def __init__(self, experiment: dict, state: dict, num_classes: int, spec: dict) -> None:

        cfg = config_from_dict(experiment, ExperimentConfig, source="<seg config>")
        cfg.seg.weights = None  # the checkpoint has every weight
        self.cfg, self.spec, self.num_classes = cfg, spec, num_classes
        self.device = torch.device(
            "cuda" if cfg.seg.use_gpu and torch.cuda.is_available() else "cpu"
        )
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.seg.torch_threads)
        model = build_segmenter(cfg, num_classes)
        model.load_state_dict(state)
        self.model = model.to(self.device).eval()
        self.source = open_storage(spec["source_url"], endpoint_url=spec.get("endpoint_url"))

    def pid(self) -> int:
        return os.getpid()

    def labels(self, rgb: torch.Tensor) -> np.ndarray:
        """(3, H, W) uint8 RGB → (H, W) int64 labels at ``seg.eval_scales`` × ``eval_flip``,
        refined by the CRF when ``seg.crf``."""

        c = self.cfg
        image = normalize(rgb[None].to(self.device), c.data.mean, c.data.std)  # (1, 3, H, W)
        crf = rgb_np = None
        if c.seg.crf:
            crf, rgb_np = crf_inference, rgb.permute(1, 2, 0).numpy()  # (H, W, 3)
        return predict_labels(
            self.model, image, c.seg.eval_scales, c.seg.eval_flip, crf=crf, rgb=rgb_np
        )

    def run(self, job: dict) -> dict:
        """The raw confusion matrix of one shard (and up to ``job["panels"]`` overlay rows)."""

        start = time.perf_counter()
        cm = ConfusionMatrix(self.num_classes)
        images, no_mask, bad, panels = 0, 0, [], []
        endpoint = getattr(self.source, "endpoint_url", None)
        try:
            for raw in iter_shard(self.source.describe(job["name"]), endpoint):
                key = raw.get("__key__", "?")
                if "mask.png" not in raw:
                    no_mask += 1
                    continue
                try:
                    data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
                    if data is None:
                        raise ValueError(f"no image member ({', '.join(IMAGE_EXTS)})")
                    rgb, gt = decode_rgb(data), decode_label(raw["mask.png"])
                    if gt.shape != tuple(rgb.shape[1:]):
                        raise ValueError(f"mask {gt.shape} but image {tuple(rgb.shape[1:])}")
                    pred = self.labels(rgb)  # (H, W)
                    cm.update(gt, pred)
                except ValueError as e:  # undecodable, mismatched, or mask values out of range
                    bad.append({"key": key, "reason": _reason(e)})
                    continue
                images += 1
                if len(panels) < job["panels"]:
                    panels.append((key, _panel(rgb.permute(1, 2, 0).numpy(), pred, gt)))
        except Exception as e:  # an unreadable or truncated shard: keep what was read, say so
            bad.append({"key": f"{job['name']}:*", "reason": f"shard: {_reason(e)}"})
        return {
            "name": job["name"],
            "index": job["index"],
            "matrix": cm.matrix,
            "images": images,
            "no_mask": no_mask,
            "bad": bad,
            "panels": panels,
            "seconds": round(time.perf_counter() - start, 3),
        }


def _panel(rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> list[np.ndarray]:
    """(image, prediction, mask) cells, at most 320 pixels a side (for the 160-pixel grid)."""

    cells = [rgb, blend(rgb, colorize(pred.astype(np.uint8))), blend(rgb, colorize(gt))]
    h, w = rgb.shape[:2]
    if max(h, w) <= 320:
        return cells
    size = (max(1, round(w * 320 / max(h, w))), max(1, round(h * 320 / max(h, w))))
    return [np.asarray(Image.fromarray(c).resize(size, Image.Resampling.BILINEAR)) for c in cells]


# ---------------------------------------------------------------------------------- the driver
def prepare(cfg: ExperimentConfig, checkpoint: str | None):
    """(cfg with absolute paths, endpoint, model, classes, where): what every driver of the
    trained network starts with."""

    cfg = absolute_paths(cfg)
    model, classes, where = load_segmenter(cfg, checkpoint)
    return cfg, endpoint_url(cfg), model, classes, where


def run_pool(
    cfg: ExperimentConfig,
    actor_cls,
    jobs: list[dict],
    state,
    num_classes: int,
    spec: dict,
    what: str,
    log,
    progress,
) -> tuple[list[dict], int]:
    """``actor_cls.run`` over the jobs on a pool of Ray actors; (records in job order, actors)."""

    with ray_session():
        s = cfg.seg
        n = plan_actors(s.num_actors, s.use_gpu, s.cpus_per_actor, len(jobs))
        experiment, state_ref = json.loads(cfg.model_dump_json()), ray.put(state)
        remote = ray.remote(actor_cls).options(**actor_options(s.use_gpu, s.cpus_per_actor))
        log(f"{what}: {len(jobs)} jobs on {n} actors")
        records = run_sharded(
            jobs,
            lambda: remote.remote(experiment, state_ref, num_classes, spec),
            n,
            max_failures=s.max_failures,
            log=log,
            what="job",
            progress=progress,
        )
        return records, n


def evaluate_seg(
    cfg: ExperimentConfig,
    checkpoint: str | None = None,
    split_url: str | None = None,
    out_url: str | None = None,
    log=print,
) -> dict:
    """mIoU of the trained network (``checkpoint``, default the newest of ``<seg.out_url>/run``)
    on ``split_url`` (default ``seg.val_url``); writes ``eval.json`` and ``overlays.png`` to
    ``out_url`` (default ``<seg.out_url>/eval``) and returns the results."""

    timer = Timer()
    cfg, endpoint, model, classes, where = prepare(cfg, checkpoint)
    split_url = absolute_url(split_url or cfg.seg.val_url)
    manifest, source = open_manifest(split_url, endpoint)
    if list(manifest["classes"]) != classes:
        raise StageError(
            f"the split {source.describe()} has classes {manifest['classes']}, but "
            f"{where} was trained on {classes}"
        )
    if manifest.get("with_mask") == 0:
        raise StageError(f"the split {source.describe()} has no masks to evaluate against")
    out = open_storage(
        absolute_url(out_url or f"{cfg.seg.out_url.rstrip('/')}/eval"), endpoint_url=endpoint
    )
    out.check_writable()
    names = ["background", *classes]
    jobs, budget = [], cfg.seg.eval_grid
    for i, shard in enumerate(manifest["shards"]):
        jobs.append(
            {
                "name": shard["name"],
                "index": i,
                "samples": shard["samples"],
                "panels": min(budget, shard["samples"]),
            }
        )
        budget -= jobs[-1]["panels"]
    settings = eval_settings(cfg)
    log(
        f"eval seg: {manifest['num_samples']} images of {source.describe()} in {len(jobs)} "
        f"shards, checkpoint {where}, scales {settings['scales']}, flip {settings['flip']}, "
        f"crf {settings['crf']}"
    )
    spec = {"source_url": source.describe(), "endpoint_url": endpoint}
    with tqdm(total=manifest["num_samples"], desc="eval seg", unit="img", disable=None) as bar:
        records, actors = run_pool(
            cfg,
            SegActor,
            jobs,
            model.state_dict(),
            len(names),
            spec,
            "eval seg",
            log,
            lambda r: bar.update(r["images"] + r["no_mask"] + len(r["bad"])),
        )
    cm = ConfusionMatrix(len(names))
    for r in records:  # raw counts summed: one matrix over every pixel of the split
        cm.merge(ConfusionMatrix.from_matrix(r["matrix"]))
    images = sum(r["images"] for r in records)
    bad = [{**b, "shard": r["name"]} for r in records for b in r["bad"]]
    for b in bad[:5]:
        log(f"eval seg: skipped {b['key']} ({b['shard']}): {b['reason']}")
    if images == 0:
        raise StageError(
            f"none of the {manifest['num_samples']} images of {source.describe()} "
            f"could be evaluated (no mask: {sum(r['no_mask'] for r in records)}, "
            f"bad: {len(bad)})"
        )
    seconds = timer()
    result = {
        "checkpoint": where,
        "split": source.describe(),
        "classes": names,
        **cm.to_dict(names),
        "settings": settings,
        "images": images,
        "no_mask": sum(r["no_mask"] for r in records),
        "bad_count": len(bad),
        "bad": bad[:MAX_LISTED],
        "actors": actors,
        "seconds": seconds,
        "compute_seconds": round(sum(r["seconds"] for r in records), 3),  # summed over actors
        "images_per_s": round(images / seconds, 3) if seconds else None,
    }
    out.write_bytes("eval.json", json.dumps(result, indent=1).encode())
    panels = [p for r in records for p in r["panels"]][: cfg.seg.eval_grid]
    if panels:
        upload_grid(
            out,
            "overlays.png",
            [cells for _, cells in panels],
            [[key, "prediction", "gt"] for key, _ in panels],
        )
    result["out"], result["overlays"] = out.describe(), bool(panels)
    log(_report(result, names, cm))
    return result


def _report(result: dict, names: list[str], cm: ConfusionMatrix) -> str:
    s = result["settings"]
    miou = "-" if result["miou"] is None else f"{100 * result['miou']:.2f}"
    return "\n".join(
        [
            f"eval seg: {result['images']} images of {result['split']}: mIoU {miou} "
            f"(scales {s['scales']}, flip {s['flip']}, crf {s['crf']}; {result['seconds']:.1f} s, "
            f"{result['images_per_s']} images/s on {result['actors']} actors)",
            format_table(names, cm.iou()),
            f"  written: {result['out']}/eval.json"
            + (", overlays.png" if result["overlays"] else ""),
        ]
    )
