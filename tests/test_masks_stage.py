"""Confident labels and pseudo masks end to end on a real local Ray cluster: CAMs from the real
`mcis cams`, then every CAM labelled once by two actors and matching the per-image functions,
shard-level resume with identical bytes, S3 output, bad inputs skipped and listed, and the
evaluation."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mcis_dist.cli import main
from mcis_dist.config import load_config
from mcis_dist.formats.cams import iter_cam_shard
from mcis_dist.formats.labels import iter_label_shard
from mcis_dist.formats.shards import iter_shard
from mcis_dist.masks.evaluate import evaluate_masks
from mcis_dist.masks.modes import MODES, make_sample
from mcis_dist.masks.stage import make_labels, make_masks
from mcis_dist.models.build import build_affinity_net, build_model
from mcis_dist.runtime.paths import affinity_run_url, labels_url
from mcis_dist.shards.build import ShardWriter
from mcis_dist.storage import open_storage

from conftest import build_synthetic, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow
# single-round maps: at random weights they vary over the image (co-attentive ones are flat)
FAST = [
    "cams.mode=single",
    "cams.scales=[1.0]",
    "cams.num_actors=2",
    "masks.steps=16",
    "masks.num_actors=2",
    "affinity.num_actors=2",
]
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (each stage reuses it instead of starting its own); the
    dummy S3 credentials are set first, so its workers have them."""
    import ray

    from conftest import S3_ENV

    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    """Shards (24 images in 6 shards), CAMs from `mcis cams` with a random classifier, and a
    random AffinityNet checkpoint where AffinityNet training puts its checkpoints."""
    root = tmp_path_factory.mktemp("masks_stage")
    shards = root / "shards"
    build_synthetic(str(shards), num_train=24, num_val=2, per_shard=4)
    overrides = [f"shards.url={shards}", f"run_root={root / 'runs'}", *FAST]
    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=8)
    with torch.no_grad():
        model.phi_coatt.weight.normal_(0, 0.5)
    save_checkpoint(model, root / "runs" / "demo" / "cls")
    assert main(["cams", "--config", CONFIG, *overrides]) == 0
    net = build_affinity_net(cfg)
    save_checkpoint(net, Path(affinity_run_url(cfg)))
    return {"root": root, "overrides": overrides, "cams": Path(cfg.cams.out_url), "net": net}


def config(setup, *extra):
    return load_config(CONFIG, [*setup["overrides"], *extra])


def label_keys(folder) -> list[str]:
    storage = open_storage(folder)
    manifest = json.loads(storage.read_bytes("manifest.json"))
    return [m["key"] for s in manifest["shards"] for m, _ in iter_label_shard(storage, s["name"])]


def cam_keys(folder) -> list[str]:
    storage = open_storage(folder)
    manifest = json.loads(storage.read_bytes("manifest.json"))
    return [m["key"] for s in manifest["shards"] for m, _ in iter_cam_shard(storage, s["name"])]


def shard_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))
    }


def recompute(setup, cfg, mode: str, state=None) -> dict:
    """Labels of one shard (the second) with the mode's per-image function, in this process."""
    label = MODES[mode].build(cfg, state, torch.device("cpu"))
    cams = open_storage(setup["cams"])
    maps = {m["key"]: (m, c) for m, c in iter_cam_shard(cams, "cams-000001.tar")}
    source = json.loads(cams.read_bytes("manifest.json"))["source"]["url"]
    out = {}
    for raw in iter_shard(f"{source}/shard-000001.tar"):
        meta, c = maps[raw["__key__"]]
        out[raw["__key__"]] = label(make_sample(raw, meta, c))
    return out


@pytest.fixture(scope="module")
def masks_run(setup):
    cfg = config(setup)
    return Path(cfg.masks.out_url), make_masks(cfg, **QUIET)


def test_confident_labels_one_per_cam_matching_the_per_image_function(setup):
    cfg = config(setup)
    manifest = make_labels(cfg, **QUIET)
    out = Path(labels_url(cfg))
    assert manifest["kind"] == "confident" and manifest["mode"] == "confident"
    assert label_keys(out) == cam_keys(setup["cams"]) and manifest["samples"] == 24
    assert manifest["settings"] == {
        "mode": "confident",
        "label_mode": "alpha",
        "alpha_low": 4.0,
        "alpha_high": 32.0,
        "crf": False,
    }
    assert [s["source"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    got = dict(
        (m["key"], lab) for m, lab in iter_label_shard(open_storage(out), "labels-000001.tar")
    )
    want = recompute(setup, cfg, "confident")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    part = json.loads((out / "_parts" / "labels-000001.json").read_text())
    assert part["empty"] == sum(bool((lab == 255).all()) for lab in want.values())
    result = evaluate_masks(cfg, masks_url=str(out), **QUIET)
    assert result["kind"] == "confident" and result["images"] == 24
    assert 0 < result["ignored_share"] < 1 and (out / "eval" / "overlays.png").exists()


def test_random_walk_masks_one_per_cam_matching_the_labeller(setup, masks_run):
    out, manifest = masks_run
    assert manifest["kind"] == "pseudo" and manifest["mode"] == "random_walk"
    assert manifest["checkpoint"].endswith("checkpoint.pt") and manifest["skipped_count"] == 0
    assert label_keys(out) == cam_keys(setup["cams"])
    got = dict(
        (m["key"], lab) for m, lab in iter_label_shard(open_storage(out), "labels-000001.tar")
    )
    want = recompute(setup, config(setup), "random_walk", setup["net"].state_dict())
    assert all(np.array_equal(got[k], want[k]) for k in want) and len(got) == 4
    result = evaluate_masks(config(setup), **QUIET)
    assert result["images"] == 24 and result["ignored_share"] == 0
    assert result["miou"] == result["miou_ignore_as_bg"]


def test_a_rerun_redoes_only_missing_shards_with_identical_bytes(setup, masks_run, tmp_path):
    clean, _ = masks_run
    out = tmp_path / "masks"
    shutil.copytree(clean, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "labels-000002.tar").unlink()
    (out / "_parts" / "labels-000002.json").unlink()
    (out / "manifest.json").unlink()
    logs = []
    make_masks(config(setup, f"masks.out_url={out}"), log=logs.append)
    assert any("5 shards already done" in line for line in logs)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert [n for n in after if after[n] != before.get(n)] == ["labels-000002.tar"]
    assert shard_hashes(out) == shard_hashes(clean)
    # Finished: a third run does nothing; another setting redoes every shard.
    logs.clear()
    make_masks(config(setup, f"masks.out_url={out}"), log=logs.append)
    assert "nothing to do" in logs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == after
    manifest = make_masks(config(setup, f"masks.out_url={out}", "masks.steps=8"), **QUIET)
    assert all(p.stat().st_mtime_ns != after[p.name] for p in out.glob("*.tar"))
    assert manifest["settings"]["steps"] == 8


def test_s3_output(setup, masks_run, s3_endpoint, s3_bucket, tmp_path):
    clean, _ = masks_run
    url = f"s3://{s3_bucket}/exp/masks"
    cfg = config(setup, f"masks.out_url={url}", f"shards.endpoint_url={s3_endpoint}")
    make_masks(cfg, **QUIET)
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="exp/masks/")["Contents"]}
    assert {
        "exp/masks/manifest.json",
        "exp/masks/labels-000005.tar",
        "exp/masks/labels-000005.idx",
        "exp/masks/_parts/labels-000005.json",
    } <= keys
    body = s3.get_object(Bucket=s3_bucket, Key="exp/masks/labels-000003.tar")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == shard_hashes(clean)["labels-000003.tar"]
    result = evaluate_masks(cfg, masks_url=url, out_url=str(tmp_path / "eval"), **QUIET)
    assert result["miou"] == json.loads((clean / "eval" / "eval.json").read_text())["miou"]


def test_a_cam_without_image_and_a_cam_of_another_size_are_skipped_and_listed(setup, tmp_path):
    """A copy of the CAM folder whose second shard has one key renamed (a CAM without its image,
    and an image without CAM) and one size changed; the baseline mode labels the rest."""
    cams = tmp_path / "cams"
    shutil.copytree(setup["cams"], cams)
    manifest = json.loads((cams / "manifest.json").read_text())
    shard = manifest["shards"][1]
    records = list(iter_cam_shard(open_storage(cams), shard["name"]))
    renamed, resized = records[0][0]["key"], records[1][0]["key"]
    records[0][0]["key"] = "ghost"
    records[1][0]["size"] = [records[1][0]["size"][0] + 1, records[1][0]["size"][1]]
    from mcis_dist.formats.cams import encode_cam

    writer = ShardWriter(cams / shard["name"])
    for meta, maps in records:
        writer.write(
            {"__key__": meta["key"], "cam.npy": encode_cam(maps), "json": json.dumps(meta).encode()}
        )
    (cams / shard["index_name"]).write_text(writer.close())
    shard.update(sha256=writer.sha256, bytes=writer.bytes)
    (cams / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "masks"
    result = make_masks(
        config(setup, "masks.mode=cams", f"masks.cams_url={cams}", f"masks.out_url={out}"), **QUIET
    )
    assert result["samples"] == 22 and result["skipped_count"] == 2
    reasons = {s["key"]: (s["shard"], s["reason"]) for s in result["skipped"]}
    assert reasons.keys() == {"ghost", resized}
    assert reasons["ghost"] == ("shard-000001.tar", "no image with this key in shard-000001.tar")
    assert "but the image is" in reasons[resized][1]
    keys = label_keys(out)
    assert renamed not in keys and resized not in keys and len(keys) == 22
    assert result["settings"] == {"mode": "cams", "bg_threshold": 0.2}
