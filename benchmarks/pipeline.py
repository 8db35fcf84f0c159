"""The demo pipeline, stage by stage: wall seconds, and the share of each stage's wall time that
is Ray start-up and scheduling rather than work.

Runs ``mcis pipeline`` with configs/demo.yaml into a fresh folder (``--quick``: the demo at test
size), then reads what each stage wrote about its own work:

- trained stages (classifier, AffinityNet, DeepLab): ``worker_s`` in the run's ``metrics.jsonl``,
  the seconds a Ray Train worker spent in our training function (model, loader, epochs,
  checkpoints). What the driver waited beyond it is Ray: the controller, placement group, worker
  processes, the torch process group, and the teardown.
- sharded stages (CAMs, confident labels, pseudo masks, evaluation of DeepLab): the seconds each
  actor spent on its shards (``_parts``/manifest ``compute``) divided by the actors working in
  parallel. The rest of the wall is actor start-up (process, imports, model weights) and
  scheduling.
- evaluations of CAMs and masks run in the driver: their seconds count as work.

The share is ``1 - work / wall`` of the pipeline's own stage timer (``report.json``
``stage_seconds``), so both are measured in the same run. ``ray_start_seconds`` (starting the
embedded Ray once) is listed on its own.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import parse_args, print_table, write_results

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "synthetic.num_train=48",
    "synthetic.num_val=12",
    "shards.workers=1",
    "train.epochs=1",
    "cams.scales=[1.0]",
    "cams.related=1",
    "affinity.train.epochs=1",
    "masks.steps=16",
    "seg.train.epochs=1",
    "seg.data.batch_size=4",
]


def last_metric(run: Path, key: str) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1]).get(key, 0.0))


def sharded_work(folder: Path, actors: int) -> float:
    """Critical-path seconds of a sharded stage: its actors' compute spread over the actors."""
    manifest = json.loads((folder / "manifest.json").read_text())
    parallel = max(1, min(actors, len(manifest["shards"])))
    return manifest["seconds"]["compute"] / parallel


def eval_seconds(folder: Path) -> float:
    path = folder / "eval" / "eval.json"
    return json.loads(path.read_text()).get("seconds", 0.0) if path.exists() else 0.0


def stage_work(run: Path, cfg: dict) -> dict[str, float]:
    cams_actors, mask_actors = cfg["cams"]["num_actors"], cfg["masks"]["num_actors"]
    cams = [
        run / d
        for d in ("cams", "cams_single", "cams_coattentive", "cams_basic")
        if (run / d / "manifest.json").exists()
    ]
    seg_eval = json.loads((run / "seg" / "eval" / "eval.json").read_text())
    return {
        "train-cls": last_metric(run / "cls", "worker_s"),
        "cams": sum(sharded_work(c, cams_actors) + eval_seconds(c) for c in cams),
        "affinity": sharded_work(run / "affinity" / "labels", mask_actors)
        + last_metric(run / "affinity" / "run", "worker_s"),
        "masks": sharded_work(run / "masks", mask_actors) + eval_seconds(run / "masks"),
        "seg": last_metric(run / "seg" / "run", "worker_s"),
        "eval": seg_eval["compute_seconds"] / max(1, seg_eval["actors"]),
    }


def main() -> None:
    args = parse_args("pipeline", __doc__.splitlines()[0])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(REPO))
    from mcis_dist.config import ExperimentConfig, load_config
    from mcis_dist.pipeline import run_pipeline

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        overrides = [
            *(QUICK if args.quick else []),
            f"shards.url={tmp}/shards",
            f"run_root={tmp}/runs",
        ]
        cfg = load_config(str(REPO / "configs" / "demo.yaml"), overrides, schema=ExperimentConfig)
        t0 = time.perf_counter()
        report = run_pipeline(cfg, log=lambda *_: None, say=lambda *_: None)
        total = time.perf_counter() - t0
        work = stage_work(Path(tmp) / "runs" / cfg.name, report["config"])

    rows, ratios = [], {}
    metrics = {"total_s": round(total, 1), "ray_start_s": report["ray_start_seconds"]}
    cols = ["stage", "wall s", "work s", "Ray start-up + scheduling"]
    for stage, wall in report["stage_seconds"].items():
        busy = work.get(stage)
        row = {"stage": stage, "wall s": f"{wall:.1f}"}
        metrics[f"{stage}_wall_s"] = wall
        if busy is not None:
            share = max(0.0, 1 - busy / wall) if wall else 0.0
            row.update({"work s": f"{busy:.1f}", cols[3]: f"{100 * share:.0f}%"})
            metrics[f"{stage}_work_s"] = round(busy, 2)
            ratios[f"{stage}_ray_share"] = round(share, 3)
        rows.append(row)
    rows.append(
        {
            "stage": "ray start (once)",
            "wall s": f"{report['ray_start_seconds']:.1f}",
            cols[3]: "100%",
        }
    )
    rows.append({"stage": "total", "wall s": f"{total:.1f}"})
    title = "the demo at test size (--quick)" if args.quick else "configs/demo.yaml"
    print_table(rows, cols, title=f"pipeline, {title}")
    print(
        f"  mIoU: CAM single {100 * report['cam_miou_single']:.1f}, co-attentive "
        f"{100 * report['cam_miou_coattentive']:.1f}, pseudo {100 * report['pseudo_miou']:.1f}, "
        f"seg {100 * report['seg_miou']:.1f}"
    )
    write_results(args.out, "pipeline", metrics, ratios)


if __name__ == "__main__":
    main()
