"""`mcis cams` / `mcis eval cams` end to end on real local Ray clusters: a whole split mapped by
two actors, resume at shard level, an actor killed mid-run, S3 output, bad inputs, and the
evaluation against a hand-computed confusion matrix."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcis_dist.cams.infer import CamEngine, CamSettings
from mcis_dist.cams.stage import CamActor
from mcis_dist.cli import main
from mcis_dist.config import load_config
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.transforms import decode_rgb
from mcis_dist.formats.cams import encode_cam, iter_cam_shard
from mcis_dist.models.build import build_model
from mcis_dist.shards.build import ShardWriter
from mcis_dist.storage import open_storage

from conftest import build_synthetic, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow
FAST = [
    "cams.mode=coattentive",
    "cams.scales=[1.0]",
    "cams.related=2",
    "cams.related_size=64",
    "cams.num_actors=2",
    "cams.max_failures=2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards (24 images in 6 shards) and a classifier checkpoint laid out as Ray Train writes
    it (<run_root>/demo/cls/checkpoint_*/checkpoint.pt); random weights are enough here."""
    root = tmp_path_factory.mktemp("cams_stage")
    shards = root / "shards"
    build_synthetic(str(shards), num_train=24, num_val=2, per_shard=4)
    cfg = load_config(CONFIG, [f"shards.url={shards}"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=8)
    with torch.no_grad():
        model.phi_coatt.weight.normal_(0, 0.5)
        model.w_p.add_(0.05 * torch.randn_like(model.w_p))  # as if trained away from W_P = I
    save_checkpoint(model, root / "runs" / "demo" / "cls")
    return {"root": root, "shards": shards, "run_root": root / "runs", "model": model}


def args(setup, *extra) -> list[str]:
    return [
        "--config",
        CONFIG,
        f"shards.url={setup['shards']}",
        f"run_root={setup['run_root']}",
        *FAST,
        *extra,
    ]


def env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def shard_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))
    }


def all_keys(folder: Path) -> list[str]:
    storage = open_storage(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return [m["key"] for s in manifest["shards"] for m, _ in iter_cam_shard(storage, s["name"])]


@pytest.fixture(scope="module")
def clean_run(setup):
    out = setup["root"] / "cams_clean"
    assert main(["cams", *args(setup, f"cams.out_url={out}")]) == 0
    return out


def test_two_actors_map_every_image_once_and_match_the_engine(setup, clean_run):
    manifest = json.loads((clean_run / "manifest.json").read_text())
    source, storage = open_manifest(str(setup["shards"] / "train"))
    want_keys = [k for s in source["shards"] for k in s["keys"]]
    assert all_keys(clean_run) == want_keys  # every image once, in order
    assert manifest["samples"] == 24 and len(manifest["shards"]) == 6
    assert manifest["skipped_count"] == 0 and manifest["settings"]["mode"] == "coattentive"
    # One image's stored maps equal a direct CamEngine call with the same settings.
    sampler = RelatedSampler(source, storage, seed=0)
    key, labels, data = sampler.read_image(5)
    settings = CamSettings(
        mode="coattentive", related=2, scales=(1.0,), related_size=64, readout="contribution"
    )  # as configs/demo.yaml
    want, _ = CamEngine(setup["model"].eval(), settings, sampler).cams(
        decode_rgb(data), labels, key
    )
    got = {m["key"]: (m, c) for m, c in iter_cam_shard(open_storage(clean_run), "cams-000001.tar")}
    meta, maps = got[key]
    assert meta["labels"] == labels and meta["size"] == list(decode_rgb(data).shape[-2:])
    np.testing.assert_allclose(maps.astype(np.float32), want.numpy(), atol=2e-3)


def test_a_rerun_redoes_only_missing_shards_with_identical_bytes(setup, clean_run, tmp_path):
    out = tmp_path / "cams"
    import shutil

    shutil.copytree(clean_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "cams-000002.tar").unlink()
    (out / "_parts" / "cams-000002.json").unlink()
    (out / "manifest.json").unlink()
    assert main(["cams", *args(setup, f"cams.out_url={out}")]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert [n for n in after if after[n] != before.get(n)] == ["cams-000002.tar"]
    assert shard_hashes(out) == shard_hashes(clean_run)
    # Finished: a third run does nothing; new settings redo every shard.
    assert main(["cams", *args(setup, f"cams.out_url={out}")]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == after
    assert main(["cams", *args(setup, f"cams.out_url={out}", "cams.mode=single")]) == 0
    assert all(p.stat().st_mtime_ns != after[p.name] for p in out.glob("*.tar"))
    assert json.loads((out / "manifest.json").read_text())["settings"]["mode"] == "single"


def _cam_actor_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "CamActor" in cmd:
            pids.append(p.info["pid"])
    return pids


def test_an_actor_killed_mid_run_has_its_shard_redone(setup, clean_run, tmp_path):
    out = tmp_path / "cams"
    cmd = [sys.executable, "-m", "mcis_dist.cli", "cams", *args(setup, f"cams.out_url={out}")]
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed, deadline = None, time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        pids = _cam_actor_pids()
        parts = list((out / "_parts").glob("*.json")) if (out / "_parts").exists() else []
        if pids and parts:  # actors are mid-run: at least one shard done, more to do
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=300)
    assert killed is not None, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    assert "actor lost" in output
    assert all_keys(out) == all_keys(clean_run)  # nothing missing, nothing twice
    assert shard_hashes(out) == shard_hashes(clean_run)
    assert not list(out.glob("*.tmp"))


def test_s3_output_then_evaluation_from_s3(setup, clean_run, s3_endpoint, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/exp/cams"
    assert (
        main(["cams", *args(setup, f"cams.out_url={url}", f"shards.endpoint_url={s3_endpoint}")])
        == 0
    )
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="exp/cams/")["Contents"]}
    assert "exp/cams/manifest.json" in keys and "exp/cams/cams-000005.tar" in keys
    body = s3.get_object(Bucket=s3_bucket, Key="exp/cams/cams-000003.tar")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == shard_hashes(clean_run)["cams-000003.tar"]
    assert (
        main(
            [
                "eval",
                "cams",
                "--config",
                CONFIG,
                "--cams",
                url,
                f"shards.endpoint_url={s3_endpoint}",
            ]
        )
        == 0
    )
    result = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="exp/cams/eval/eval.json")["Body"].read()
    )
    local = tmp_path / "eval"
    assert (
        main(["eval", "cams", "--config", CONFIG, "--cams", str(clean_run), "--out", str(local)])
        == 0
    )
    local_result = json.loads((local / "eval.json").read_text())
    assert result["miou"] == local_result["miou"]
    # the classifier's attention diagnostics, on pairs of the split, the same from both places
    attention = local_result["attention"]
    assert attention == result["attention"] and attention["pairs"] > 0
    assert attention["affinity"] == "cosine" and attention["checkpoint"].endswith("checkpoint.pt")
    for key in ("hub_top1", "hub_top5", "gate_mean", "gate_iou"):
        assert 0 <= attention[key] <= 1 + 1e-6, key
    assert attention["bg_to_fg"] > 0 and attention["w_p_drift"] > 0
    s3.head_object(Bucket=s3_bucket, Key="exp/cams/eval/overlays.png")


def test_a_checkpoint_for_another_model_names_the_keys(setup, tmp_path, capsys):
    code = main(["cams", *args(setup, f"cams.out_url={tmp_path}", "model.domains=3")])
    err = capsys.readouterr().err
    assert code == 2 and "w_p" in err and "does not match the configured model" in err
    code = main(["cams", *args(setup, f"cams.out_url={tmp_path}", f"run_root={tmp_path}/none")])
    assert code == 2 and "no classifier checkpoint" in capsys.readouterr().err


def test_an_undecodable_image_is_skipped_and_listed(setup, tmp_path):
    from test_loader import corrupt_copy

    bad = tmp_path / "bad"
    info = corrupt_copy(setup["shards"] / "train", bad)
    out = tmp_path / "cams"
    assert main(["cams", *args(setup, f"cams.split_url={bad}", f"cams.out_url={out}")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped_count"] == 2
    assert sorted(s["key"] for s in manifest["skipped"]) == sorted(info["bad"])
    assert manifest["samples"] == 22 and sorted(info["bad"])[0] not in all_keys(out)


# ------------------------------------------------------------- evaluation: a hand-made case
def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_validation_maps_with_related_images_from_the_training_split(setup, tmp_path, capsys):
    """cams.related_url: the val split's images are mapped with related images drawn from the
    train split (so validation images never read each other): the stage's actor, run in this
    process on the val shard, writes maps equal to a direct CamEngine call with a sampler over
    train; a related split with another class list is refused before any work."""
    out = tmp_path / "val_cams"
    train, val = setup["shards"] / "train", setup["shards"] / "val"
    cfg = load_config(
        CONFIG,
        [
            *args(setup)[2:],
            f"cams.split_url={val}",
            f"cams.related_url={train}",
            f"cams.out_url={out}",
        ],
    )
    state = setup["model"].state_dict()
    actor = CamActor(json.loads(cfg.model_dump_json()), state, num_classes=8)
    source, storage = open_manifest(str(val))
    shard = source["shards"][0]["name"]
    job = {"name": "cams-000000.tar", "index": 0, "source": shard, "fingerprint": "x"}
    record = actor.run(job)
    assert record["samples"] == 2 and record["fallback_images"] == 0
    related, related_storage = open_manifest(str(train))
    sampler = RelatedSampler(related, related_storage, seed=0)
    key, labels, data = RelatedSampler(source, storage).read_image(0)
    settings = CamSettings(
        mode="coattentive", related=2, scales=(1.0,), related_size=64, readout="contribution"
    )
    want, _ = CamEngine(setup["model"].eval(), settings, sampler).cams(
        decode_rgb(data), labels, key
    )
    got = {m["key"]: c for m, c in iter_cam_shard(open_storage(out), "cams-000000.tar")}
    np.testing.assert_allclose(got[key].astype(np.float32), want.numpy(), atol=2e-3)
    other = tmp_path / "other"
    build = ["shards", "build", "--source", "synthetic", "--num-train", "4", "--num-val", "0"]
    build += ["--num-classes", "3", "--workers", "1", "--no-progress", "--out", str(other)]
    assert main(build) == 0
    bad = [f"cams.split_url={val}", f"cams.related_url={other / 'train'}"]
    capsys.readouterr()
    assert main(["cams", *args(setup, *bad, f"cams.out_url={tmp_path / 'x'}")]) == 2
    assert "same class list" in capsys.readouterr().err


def test_evaluation_against_a_hand_computed_confusion_matrix(setup, tmp_path):
    """Two 2x4 images with known masks and stride-1 maps: the label maps at threshold 0.5 are
    written out by hand, and so are the confusion matrix and the IoUs."""
    from mcis_dist.cams.evaluate import evaluate_cams
    from mcis_dist.formats.cams import FORMAT

    split, cams = tmp_path / "split", tmp_path / "cams"
    split.mkdir(), cams.mkdir()
    gts = [np.array([[0, 1, 1, 255], [0, 0, 2, 2]]), np.array([[1, 1, 0, 0], [1, 0, 0, 0]])]
    maps = [
        np.array(
            [
                [[0.0, 0.9, 0.2, 0.9], [0.0, 0.7, 0.0, 0.0]],  # class 0 (label 1)
                [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.4]],
            ]
        ),  # class 1 (label 2)
        np.array([[[0.6, 0.4, 0.0, 0.0], [0.9, 0.0, 0.7, 0.0]]]),
    ]  # class 0 (label 1)
    labels = [[0, 1], [0]]
    # predictions at 0.5: image 1 [[0,1,0,1],[0,1,2,0]]  image 2 [[1,0,0,0],[1,0,1,0]]
    writer, cam_writer = (
        ShardWriter(split / "shard-000000.tar"),
        ShardWriter(cams / "cams-000000.tar"),
    )
    for i in range(2):
        key = f"img{i}"
        rgb = np.zeros((2, 4, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        writer.write(
            {
                "__key__": key,
                "png": buf.getvalue(),
                "mask.png": _png(gts[i]),
                "json": json.dumps({"labels": labels[i]}).encode(),
            }
        )
        meta = {"key": key, "labels": labels[i], "size": [2, 4], "stride": 1, "fallback": []}
        cam_writer.write(
            {"__key__": key, "cam.npy": encode_cam(maps[i]), "json": json.dumps(meta).encode()}
        )
    (split / "shard-000000.idx").write_text(writer.close())
    cam_writer.close()
    classes = ["a", "b"]
    (split / "manifest.json").write_text(
        json.dumps(
            {
                "format": "mcis-shards/1",
                "classes": classes,
                "num_samples": 2,
                "shards": [
                    {
                        "name": "shard-000000.tar",
                        "index": "shard-000000.idx",
                        "first": 0,
                        "samples": 2,
                        "bytes": writer.bytes,
                        "sha256": writer.sha256,
                        "keys": ["img0", "img1"],
                    }
                ],
                "class_index": [[0, 1], [0]],
            }
        )
    )
    (cams / "manifest.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "classes": classes,
                "samples": 2,
                "source": {"url": str(split), "samples": 2},
                "settings": {"mode": "single"},
                "shards": [{"name": "cams-000000.tar", "source": "shard-000000.tar", "samples": 2}],
            }
        )
    )
    cfg = load_config(CONFIG, ["cams.bg_threshold=0.5", "cams.eval_grid=2"])
    result = evaluate_cams(cfg, cams_url=str(cams), thresholds=[0.0, 0.5], log=lambda *_: None)
    # rows gt, columns prediction; the 255 pixel is left out.
    want = np.array([[6, 2, 0], [2, 3, 0], [1, 0, 1]])
    assert np.array_equal(np.array(result["at_threshold"]["matrix"]), want)
    iou = [6 / (8 + 9 - 6), 3 / (5 + 5 - 3), 1 / (2 + 1 - 1)]
    assert result["at_threshold"]["miou"] == pytest.approx(np.mean(iou))
    assert result["miou"][1] == pytest.approx(np.mean(iou), abs=1e-6)
    assert result["images"] == 2 and (cams / "eval" / "overlays.png").exists()
    # held-out: each image at the threshold best on the other half (img0 / img1 are in
    # different halves), so the headline never exceeds the oracle
    from mcis_dist.evaluation.heldout import fold_of

    assert {fold_of("img0"), fold_of("img1")} == {0, 1}
    assert set(result["heldout"]["thresholds"].values()) <= {0.0, 0.5}
    assert result["heldout"]["images"] == [1, 1]
    assert result["miou_heldout"] <= result["best"]["miou"] + 1e-12
    saved = json.loads((cams / "eval" / "eval.json").read_text())
    assert saved["miou_heldout"] == pytest.approx(result["miou_heldout"])
