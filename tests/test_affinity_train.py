"""`mcis affinity` then `mcis masks` end to end on a real local Ray cluster: confident labels from
real CAM shards, AffinityNet trained by 2 Ray Train workers on the shared runner (the loss
falls, checkpoints carry the stage), a re-run resumes instead of starting over, and the trained
AffinityNet's random walk gives one pseudo mask per image, evaluated against the masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcis_dist.cli import main
from mcis_dist.config import load_config
from mcis_dist.models.build import build_model
from mcis_dist.runtime.checkpoint import load as load_checkpoint

from conftest import build_synthetic, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("affinity")
    shards = root / "shards"
    build_synthetic(str(shards), num_train=32, num_val=2, per_shard=8)
    base = [f"shards.url={shards}", f"run_root={root / 'runs'}"]
    cfg = load_config(CONFIG, base)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=8)
    save_checkpoint(model, root / "runs" / "demo" / "cls")
    assert (
        main(
            [
                "cams",
                "--config",
                CONFIG,
                *base,
                "cams.mode=single",
                "cams.scales=[1.0]",
                "cams.num_actors=2",
            ]
        )
        == 0
    )
    args = [
        *base,
        "affinity.head_width=0.0625",
        "affinity.data.crop_size=64",
        "affinity.data.batch_size=4",
        "affinity.train.epochs=3",
        "affinity.train.lr=0.05",
        "affinity.train.num_workers=2",
        "affinity.train.report_every_steps=2",
        "affinity.label_mode=threshold",
        "affinity.fg_threshold=0.5",
        "affinity.bg_threshold=0.2",
        "affinity.num_actors=2",
    ]
    return {"root": root, "args": args}


def run(cmd) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    proc = subprocess.run(
        [sys.executable, "-m", "mcis_dist.cli", *cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_affinity_trains_on_confident_labels_then_random_walk_masks(exp):
    root, args = exp["root"], exp["args"]
    aff = root / "runs" / "demo" / "affinity"
    proc = run(["affinity", "--config", CONFIG, *args])
    assert "affinity: done, epoch 3" in proc.stdout
    labels = json.loads((aff / "labels" / "manifest.json").read_text())
    assert labels["format"] == "mcis-labels/1" and labels["kind"] == "confident"
    assert labels["samples"] == 32
    records = [json.loads(x) for x in (aff / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "bg_pos" in r and "neg" in r]
    assert steps and steps[-1]["total"] < steps[0]["total"]  # the loss fell
    newest = max(p for p in (aff / "run").glob("checkpoint_*") if p.is_dir())
    saved = load_checkpoint(newest)
    assert saved["stage"] == "affinity" and saved["state"]["epoch"] == 3
    assert "fuse.weight" in saved["model"] and "tap_convs.0.weight" in saved["model"]

    # Done: a second run resumes from the newest checkpoint and trains no further.
    again = run(["affinity", "--config", CONFIG, *args])
    assert "affinity: done, epoch 3" in again.stdout
    assert max(p for p in (aff / "run").glob("checkpoint_*") if p.is_dir()) == newest

    # The trained AffinityNet's random walk: one pseudo mask per CAM, then its evaluation.
    assert main(["masks", "--config", CONFIG, *args, "masks.steps=16", "masks.num_actors=2"]) == 0
    masks = json.loads((root / "runs" / "demo" / "masks" / "manifest.json").read_text())
    assert masks["kind"] == "pseudo" and masks["mode"] == "random_walk"
    assert masks["samples"] == 32 and masks["skipped_count"] == 0
    assert main(["eval", "masks", "--config", CONFIG, *args]) == 0
    result = json.loads((root / "runs" / "demo" / "masks" / "eval" / "eval.json").read_text())
    assert 0 <= result["miou"] <= 1 and result["images"] == 32
