"""`mcis pipeline`: killed inside a stage and between stages it goes on where it stopped (and
`mcis demo` at reduced size on the result explains itself and prints the table); a
config whose stages disagree fails before any work; `ray job submit` of the whole pipeline
against a local head, with shards, checkpoints, CAMs, masks and the report on S3 (moto)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcis_dist.config import ExperimentConfig, load_config
from mcis_dist.pipeline import check_consistency, training_complete
from mcis_dist.runtime.sharded import StageError

from conftest import DEMO, REPO, SMALL, TINY, env, pipeline_cmd


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def kill(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray: a lost machine
    proc.wait()


def newest_epoch(cls: Path) -> int:
    """The epoch of the newest complete checkpoint (the file is written before Ray registers it)."""
    done = sorted(p for p in cls.glob("checkpoint_2*") if (p / "checkpoint.pt").exists())
    if not done:
        return 0
    import torch

    try:
        return torch.load(done[-1] / "checkpoint.pt", weights_only=False)["state"]["epoch"]
    except Exception:  # noqa: BLE001 - still being written
        return 0


@pytest.mark.slow
def test_killed_inside_training_and_inside_cams_then_resumed_then_the_demo(tmp_path):
    overrides = [f"shards.url={tmp_path}/shards", f"run_root={tmp_path}/runs", "train.epochs=4"]
    cmd = pipeline_cmd(*overrides)
    run = tmp_path / "runs" / "demo"

    # 1. Killed inside the classifier's training, once its first epoch is checkpointed.
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_for(lambda: newest_epoch(run / "cls") >= 1, proc, "the first checkpoint")
    kill(proc)
    assert not training_complete(str(run / "cls"), 4)

    # 2. Started again: training resumes from epoch 1; killed inside the CAM stage, once some
    #    of its shards are written and before its manifest.
    parts = run / "cams" / "_parts"
    proc = subprocess.Popen(
        cmd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    wait_for(lambda: len(list(parts.glob("*.json"))) >= 1, proc, "the first CAM shard", 400)
    kill(proc)
    second = proc.stdout.read()
    assert training_complete(str(run / "cls"), 4)
    assert not (run / "cams" / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    shards = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())["shards"]
    assert 1 <= len(before) < len(shards), "the kill came too late to leave CAM shards undone"
    epochs = [json.loads(x) for x in (run / "cls" / "metrics.jsonl").read_text().splitlines()]
    ends = [m["epoch"] for m in epochs if m.get("epoch_end")]
    assert ends.count(1) == 1 and ends[-1] == 4, ends  # epoch 1 trained once, not again
    assert "[train-cls]" in second

    # 3. Started again: the classifier is skipped (complete), the CAMs keep their written
    #    shards, and every later stage runs to the report.
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "complete (4 epochs)" in out
    # Actors that were mid-shard at the kill may still finish it (their raylet is gone, they
    # are not): such a shard counts as done too, as it should.
    kept = re.search(r"cams: \w+ maps .*; (\d+) shards already done", out)
    assert kept and len(before) <= int(kept[1]) < len(shards), out[-3000:]
    assert f"cams: {len(shards) - int(kept[1])} shards to map" in out
    for name, mtime in before.items():
        assert (parts / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    manifest = json.loads((run / "cams" / "manifest.json").read_text())
    assert len(manifest["shards"]) == len(shards)
    report = json.loads((run / "report.json").read_text())
    for key in (
        "cam_miou_single",
        "cam_miou_coattentive",
        "cam_miou_single_heldout",
        "cam_miou_coattentive_heldout",
        "pseudo_miou",
        "seg_miou",
    ):
        assert 0 <= report[key] <= 1, key
    assert {"train-cls", "cams", "affinity", "masks", "seg", "eval"} <= set(report["stage_seconds"])
    # 4. `mcis demo` on the same folders (the demo at reduced size): the shards and every stage
    #    are complete, so it explains itself, skips them all and prints the same table.
    demo = [sys.executable, "-m", "mcis_dist.cli", "demo", "--config", DEMO, *SMALL, *overrides]
    again = subprocess.run(demo, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    text = again.stdout
    for stage in ("[shards]", "[train-cls]", "[cams]", "[affinity]", "[masks]", "[seg]", "[eval]"):
        assert stage in text, stage
    assert text.count("complete") >= 4 and "shards to map" not in text
    assert "MCIS learns segmentation from image-level labels only" in text
    assert "CAM mIoU, co-attentive" in text and "segmentation mIoU (val)" in text
    assert f"{100 * report['seg_miou']:.1f}" in text.split("segmentation mIoU (val)")[-1][:20]
    assert (run / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "report.md").exists() and (run / "report_iou.png").exists()
    saved = (run / "config.yaml").read_text()
    assert "num_train: 40" in saved and f"train_url: {tmp_path}/shards/train" in saved
    assert json.loads((run / "report.json").read_text())["seg_miou"] == report["seg_miou"]
    # the run report lists the classifier's attention diagnostics
    assert (
        report["attention"]["pairs"] > 0
        and "Attention diagnostics" in (run / "report.md").read_text()
    )
    # 5. Changed pseudo-mask settings: the masks are redone, and DeepLab, trained on the old
    #    masks, is refused with the run named instead of being silently reused.
    changed = subprocess.run(
        pipeline_cmd(*overrides, "masks.steps=8"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode != 0
    err = changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "was trained on pseudo masks" in err and f"{run}/seg/run" in err, err


@pytest.mark.parametrize(
    "override, words",
    [
        ("masks.cams_url=/elsewhere/cams", "masks.cams_url (/elsewhere/cams) is not cams.out_url"),
        ("seg.masks_url=/elsewhere/masks", "seg.masks_url (/elsewhere/masks) is not masks.out_url"),
        ("cams.split_url=/other/train", "cams.split_url (/other/train) is not the classifier's"),
    ],
)
def test_stages_that_disagree_fail_naming_the_disagreement(override, words):
    cfg = load_config(DEMO, [override], schema=ExperimentConfig)
    with pytest.raises(
        StageError,
        match="the pipeline's stages disagree: .*" + words.replace("(", r"\(").replace(")", r"\)"),
    ):
        check_consistency(cfg)


def test_different_class_lists_in_train_and_val_are_named(tmp_path, capsys):
    from mcis_dist.cli import main

    for split, n in (("train", "8"), ("val", "4")):
        argv = [
            "shards",
            "build",
            "--source",
            "synthetic",
            "--num-train",
            "6",
            "--num-val",
            "3",
            "--split",
            split,
            "--num-classes",
            n,
            "--workers",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "ds"),
        ]
        assert main(argv) == 0
    capsys.readouterr()
    code = main(
        ["pipeline", "--config", DEMO, f"shards.url={tmp_path}/ds", f"run_root={tmp_path}/runs"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "the training split's classes" in err and "differ" in err, err
    assert not (tmp_path / "runs" / "demo" / "cls").exists()  # nothing was trained


def test_the_pipeline_builds_a_list_source_from_shards_splits(tmp_path):
    """A config that names a source and its splits (not built shards): the shards step builds
    each missing split with `mcis shards build`'s options, then leaves complete ones alone."""
    from mcis_dist.pipeline import build_shards

    from fixtures_data import make_list_dataset

    lst, images, classes, masks, expected = make_list_dataset(tmp_path / "lid")
    common = f"list_file: {lst}, image_root: {images}, classes: {classes}"
    cfg = load_config(
        DEMO,
        [
            "shards.source=list",
            f"shards.url={tmp_path}/shards",
            "shards.workers=1",
            "shards.shard_size_mb=1",
            f"shards.splits={{train: {{{common}}}, val: {{{common}, mask_root: {masks}}}}}",
        ],
        schema=ExperimentConfig,
    )
    said: list[str] = []
    build_shards(cfg, said.append)
    train = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())
    val = json.loads((tmp_path / "shards" / "val" / "manifest.json").read_text())
    assert train["num_samples"] == len(expected) and val["num_samples"] == len(expected)
    assert train["with_mask"] == 0 and val["with_mask"] == 4  # mask_root given for val only
    assert any("building" in line and "/val" in line for line in said)
    said.clear()
    build_shards(cfg, said.append)
    assert said == [f"  {tmp_path}/shards: complete"]


def test_a_source_without_shards_or_splits_says_how_to_build_them(tmp_path, capsys):
    from mcis_dist.cli import main

    code = main(
        [
            "pipeline",
            "--config",
            DEMO,
            "shards.source=list",
            f"shards.url={tmp_path}/s",
            f"run_root={tmp_path}/runs",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"data.train_url={tmp_path}/s/train has no manifest.json" in err, err
    assert "mcis shards build --source list" in err and "shards.splits" in err


def test_an_unknown_split_option_is_named(tmp_path):
    from mcis_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"splits.train: unknown option\(s\) \['list'\]"):
        load_config(
            DEMO,
            ["shards.source=list", "shards.splits={train: {list: a.txt}}"],
            schema=ExperimentConfig,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.slow
def test_ray_job_submit_of_the_pipeline_with_everything_on_s3(tmp_path, s3_endpoint, s3_bucket):
    import boto3

    ray = str(Path(sys.executable).parent / "ray")
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}-{port}"
    e = env(RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    root = f"s3://{s3_bucket}"
    try:
        _wait_port(dash)
        cmd = [
            ray,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            str(REPO),
            "--",
            sys.executable,
            "-m",
            "mcis_dist.cli",
            "pipeline",
            "--config",
            "configs/demo.yaml",
            *SMALL,
            *TINY,  # what is tested is the submission and S3, not the stages' accuracy
            f"shards.url={root}/shards",
            f"run_root={root}/runs",
            f"shards.endpoint_url={s3_endpoint}",
        ]
        deadline = time.time() + 90
        while True:  # the dashboard answers before its job agent is up on a loaded machine
            proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
            if "No available agent" not in proc.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout.lower()
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    }
    for key in (
        "shards/train/manifest.json",
        "shards/val/manifest.json",
        "runs/demo/cams/manifest.json",
        "runs/demo/affinity/labels/manifest.json",
        "runs/demo/masks/manifest.json",
        "runs/demo/report.json",
        "runs/demo/report.md",
        "runs/demo/config.yaml",
    ):
        assert key in keys, sorted(keys)[:50]
    assert any(k.startswith("runs/demo/cls/checkpoint_") for k in keys)
    assert any(k.startswith("runs/demo/seg/") and k.endswith("checkpoint.pt") for k in keys)
    report = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/demo/report.json")["Body"].read())
    assert 0 <= report["seg_miou"] <= 1 and report["config"]["shards"]["url"] == f"{root}/shards"
    assert not list(tmp_path.iterdir())  # nothing was written locally
