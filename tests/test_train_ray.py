"""`mcis train-cls` on real local Ray clusters: 2 CPU workers train and the loss falls; a run
killed mid-way and re-run ends with the same weights as an uninterrupted one; a worker killed
mid-run is replaced and the run finishes; S3 run storage; bad configs fail before any worker
starts (`ray job submit` of the whole pipeline: tests/test_pipeline.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mcis_dist.cli import main
from mcis_dist.config import load_config
from mcis_dist.runtime.checkpoint import load as load_checkpoint
from mcis_dist.runtime.checkpoint import newest_checkpoint
from mcis_dist.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

BASE = [
    "train.num_workers=2",
    "train.epochs=4",
    "train.lr=0.01",
    "train.report_every_steps=6",
    "train.max_failures=0",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.crop_size=64",
    "data.resize_long=[64,96]",
    "data.pool_size=32",
    "train.schedule=step",
    "train.step_epochs=[3]",
]


def env() -> dict:
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "shards"
    assert (
        main(
            [
                "shards",
                "build",
                "--source",
                "synthetic",
                "--num-train",
                "96",
                "--num-val",
                "4",
                "--shard-size",
                "0.1",
                "--workers",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def train_cmd(shards: Path, run_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mcis_dist.cli",
        "train-cls",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"shards.url={shards}",
        f"run_root={run_root}",
        *BASE,
        *extra,
    ]


def run(cmd, timeout=420) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_checkpoint(run_root: Path) -> dict:
    cls = run_root / "demo" / "cls"
    snapshot = json.loads((cls / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot
    return load_checkpoint(cls / newest_checkpoint(open_storage(str(cls))))


def metrics(run_root: Path) -> list[dict]:
    lines = (run_root / "demo" / "cls" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_two_workers_train_and_the_loss_falls(shards, tmp_path):
    proc = run(train_cmd(shards, tmp_path / "runs"))
    assert "train-cls: done, epoch 4" in proc.stdout
    m = [r for r in metrics(tmp_path / "runs") if "single" in r]
    assert m[-1]["epoch"] == 4 or m[-1]["step"] == 48
    first, last = m[0]["single"], m[-1]["single"]
    assert last < first - 0.05, (first, last)
    timed = [r for r in m if "images_per_s" in r]
    assert timed and all(r["images_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in timed)
    # the attention diagnostics of each batch's first pair are reported with the losses
    for r in m:
        assert 0 < r["attn_hub_top1"] <= r["attn_hub_top5"] <= 1 + 1e-6
        assert 0 < r["attn_row_max"] <= 1 + 1e-6 and 0 <= r["attn_gate_mean"] <= 1
        assert r["attn_w_p_drift"] >= 0 and r["attn_temperature"] == pytest.approx(0.1)
    assert m[-1]["attn_w_p_drift"] > 0  # W_P was trained away from the identity
    ck = final_checkpoint(tmp_path / "runs")
    assert ck["state"]["epoch"] == 4 and ck["state"]["step"] == 4 * 12
    assert len(ck["loaders"]) == 2 and ck["loaders"][0]["epoch"] == 4
    saved = load_config(tmp_path / "runs" / "demo" / "cls" / "config.yaml")
    assert saved.train.epochs == 4 and (tmp_path / "runs" / "demo" / "cls" / "tensorboard").is_dir()
    kept = [
        p
        for p in (tmp_path / "runs" / "demo" / "cls").iterdir()
        if p.name.startswith("checkpoint_2")
    ]
    assert len(kept) <= 3  # keep_checkpoints


def test_killed_run_resumes_to_the_same_weights(shards, tmp_path):
    extra = ["train.checkpoint_every_steps=5", "train.epochs=3"]
    run(train_cmd(shards, tmp_path / "straight", *extra))
    reference = final_checkpoint(tmp_path / "straight")

    cmd = train_cmd(shards, tmp_path / "killed", *extra)
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    cls = tmp_path / "killed" / "demo" / "cls"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = [p for p in cls.glob("checkpoint_2*") if (p / "checkpoint.pt").exists()]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die mid-run
    proc.wait()
    # the newest finished checkpoint: a kill during a copy leaves a newer, truncated folder
    interrupted = load_checkpoint(cls / newest_checkpoint(open_storage(str(cls))))
    assert 0 < interrupted["state"]["step"] < reference["state"]["step"]

    resumed = run(cmd)  # the same command again
    assert "train-cls: done, epoch 3" in resumed.stdout
    final = final_checkpoint(tmp_path / "killed")
    assert final["state"]["step"] == reference["state"]["step"]
    for k, v in reference["model"].items():
        assert torch.allclose(final["model"][k].float(), v.float(), atol=1e-5, rtol=1e-4), k


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line]


def test_a_killed_worker_is_replaced_and_the_run_finishes(shards, tmp_path):
    cmd = train_cmd(
        shards,
        tmp_path / "runs",
        "train.max_failures=2",
        "train.checkpoint_every_steps=4",
        "train.epochs=3",
    )
    proc = subprocess.Popen(
        cmd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    cls = tmp_path / "runs" / "demo" / "cls"
    deadline = time.monotonic() + 300
    killed = None
    while time.monotonic() < deadline and killed is None:
        if any((p / "checkpoint.pt").exists() for p in cls.glob("checkpoint_2*")):
            pids = _train_worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed is not None, "no Ray Train worker found to kill"
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    assert "train-cls: done, epoch 3" in out
    assert final_checkpoint(tmp_path / "runs")["state"]["step"] == 3 * 12


def test_run_storage_on_s3(shards, tmp_path, s3_endpoint, s3_bucket):
    import boto3

    extra = [
        f"run_root=s3://{s3_bucket}/runs",
        f"data.endpoint_url={s3_endpoint}",
        "train.epochs=1",
    ]
    proc = subprocess.run(
        train_cmd(shards, tmp_path / "unused", *extra),
        env=env(),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket)[
            "Contents"
        ]
    ]
    assert any(
        k.startswith("runs/demo/cls/checkpoint_") and k.endswith("checkpoint.pt") for k in keys
    )
    assert "runs/demo/cls/metrics.jsonl" in keys and "runs/demo/cls/config.yaml" in keys


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.num_workers=64", "needs 64 CPUs; the cluster has"),
        ("train.amp=fp16", "fp16 needs GPUs"),
        ("data.train_url=/nonexistent/train", "does not exist"),
        (
            "train.seam=true model.backbone=vgg16 model.freeze_bn=null model.backbone_dropout=null",
            "train.seam needs conv4/conv5 taps",
        ),
        ("model.backbone=vgg16", "freeze_bn applies to resnet38 / resnet38_tiny only"),
        ("train.lrr=0.1", "override 'train.lrr=0.1': unknown key 'lrr' (did you mean 'lr'"),
    ],
)
def test_bad_configs_fail_before_any_worker_starts(shards, tmp_path, override, words):
    proc = subprocess.run(
        train_cmd(shards, tmp_path / "runs", *override.split()),
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").glob("demo/cls/checkpoint_*"))


def test_a_non_finite_loss_stops_naming_the_step_or_is_skipped(shards, tmp_path):
    """A learning rate that makes the loss blow up: `stop` ends the run with the step and the
    terms named; `skip` drops those steps, counts them and finishes."""
    explode = ["train.lr=1.0e+12", "train.epochs=1", "train.checkpoint_every_steps=2"]
    proc = subprocess.run(
        train_cmd(shards, tmp_path / "stop", *explode, "train.nonfinite=stop"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "non-finite loss at epoch 0, step" in proc.stderr and "total=" in proc.stderr
    proc = run(train_cmd(shards, tmp_path / "skip", *explode, "train.nonfinite=skip"))
    assert "train-cls: done, epoch 1" in proc.stdout
    final = final_checkpoint(tmp_path / "skip")
    assert final["state"]["skipped"] > 0


def test_bf16_autocast_and_channels_last_on_the_cpu(shards, tmp_path):
    proc = run(
        train_cmd(
            shards,
            tmp_path / "runs",
            "train.amp=bf16",
            "train.channels_last=true",
            "train.epochs=1",
            "train.num_workers=1",
        )
    )
    assert "train-cls: done, epoch 1" in proc.stdout
    losses = [r["total"] for r in metrics(tmp_path / "runs") if "total" in r]
    assert losses and all(0 < x < 10 for x in losses)  # finite, sane values under bf16
    final = final_checkpoint(tmp_path / "runs")
    assert all(v.dtype == torch.float32 for v in final["model"].values() if v.is_floating_point())


def test_seam_trains_alongside_the_co_attention(shards, tmp_path):
    proc = run(
        train_cmd(
            shards, tmp_path / "runs", "train.seam=true", "train.epochs=1", "train.num_workers=1"
        )
    )
    assert "train-cls: done, epoch 1" in proc.stdout
    m = [r for r in metrics(tmp_path / "runs") if "seam_er" in r]
    assert m and all(r["seam_er"] >= 0 and r["seam_ecr"] >= 0 for r in m)
    assert all(r["total"] >= r["single"] + r["coattention"] for r in m)
    final = final_checkpoint(tmp_path / "runs")
    pcm = final["extra"]["pcm"]
    assert pcm and all(torch.isfinite(v).all() for v in pcm.values())


def test_the_authors_self_pair_terms(shards, tmp_path):
    proc = run(
        train_cmd(
            shards,
            tmp_path / "runs",
            "train.self_pair_terms=true",
            "train.epochs=1",
            "train.num_workers=1",
            "model.domains=3",
        )
    )
    assert "train-cls: done, epoch 1" in proc.stdout
    m = [r for r in metrics(tmp_path / "runs") if "self_pairs" in r]
    assert m and all(r["self_pairs"] > 0 for r in m)
    assert all(
        r["total"] == pytest.approx(r["single"] + r["coattention"] + r["self_pairs"], rel=1e-4)
        for r in m
    )  # epoch 0: no contrastive term yet
