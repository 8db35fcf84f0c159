"""The segmentation stage end to end on a real local Ray cluster: DeepLab (ResNet-18) trained by
2 Ray Train workers on pseudo masks cut from the synthetic split's own masks (the loss falls,
the checkpoint carries the stage); its evaluation on 2 actors gives exactly the confusion matrix
of a plain one-process loop, also multi-scale × flip with the CRF; predictions of a folder of
images (a corrupt one listed, a re-run skipping what exists) and of an image split."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcis_dist.cli import main
from mcis_dist.config import load_config
from mcis_dist.crf import crf_inference
from mcis_dist.data.transforms import decode_rgb, normalize
from mcis_dist.evaluation import ConfusionMatrix, palette
from mcis_dist.formats.labels import assemble_manifest, decode_label, encode_label
from mcis_dist.formats.shards import iter_shard
from mcis_dist.runtime.checkpoint import load as load_checkpoint
from mcis_dist.runtime.sharded import StageError
from mcis_dist.runtime.trainer import TrainingError
from mcis_dist.seg.evaluate import evaluate_seg
from mcis_dist.seg.infer import predict_labels
from mcis_dist.seg.predict import predict
from mcis_dist.seg.train import check_seg, load_segmenter, run_url, train_seg
from mcis_dist.shards.build import ShardWriter

from conftest import build_synthetic

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow
QUIET = {"log": lambda *_: None}
FAST = [
    "seg.backbone=resnet18",
    "seg.data.crop_size=64",
    "seg.data.batch_size=4",
    "seg.data.scale=[0.5,0.7]",
    "seg.train.epochs=3",
    "seg.train.num_workers=2",
    "seg.train.lr=0.01",
    "seg.train.report_every_steps=1",
    "seg.num_actors=2",
]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray of 2 CPUs for the module: training and every actor pool reuse it."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
        yield
        ray.shutdown()


def write_masks_from_ground_truth(split: Path, out: Path) -> dict:
    """A pseudo-mask folder (``mcis-labels/1``, kind "pseudo") whose labels are the split's own
    masks: targets a segmentation net can learn."""
    manifest = json.loads((split / "manifest.json").read_text())
    out.mkdir(parents=True)
    records = []
    for i, shard in enumerate(manifest["shards"]):
        name, keys = f"labels-{i:06d}.tar", []
        writer = ShardWriter(out / name)
        for raw in iter_shard(str(split / shard["name"])):
            label = decode_label(raw["mask.png"])
            meta = {
                "key": raw["__key__"],
                "labels": json.loads(raw["json"])["labels"],
                "size": list(label.shape),
            }
            writer.write(
                {
                    "__key__": raw["__key__"],
                    "label.png": encode_label(label),
                    "json": json.dumps(meta).encode(),
                }
            )
            keys.append(raw["__key__"])
        (out / name.replace(".tar", ".idx")).write_text(writer.close())
        records.append(
            {
                "name": name,
                "index": i,
                "source": shard["name"],
                "cams": None,
                "samples": len(keys),
                "keys": keys,
                "bytes": writer.bytes,
                "sha256": writer.sha256,
                "index_name": name.replace(".tar", ".idx"),
                "skipped": [],
                "empty": 0,
                "seconds": 0.0,
            }
        )
    labels = assemble_manifest(
        records,
        kind="pseudo",
        mode="ground_truth",
        fingerprint="test",
        classes=manifest["classes"],
        source={"url": str(split), "samples": manifest["num_samples"]},
        cams_url="",
        settings={},
        seconds=0.0,
    )
    (out / "manifest.json").write_text(json.dumps(labels))
    return labels


@pytest.fixture(scope="module")
def exp(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("seg")
    shards = root / "shards"
    build_synthetic(str(shards), num_train=24, num_val=8, per_shard=6)
    overrides = [f"shards.url={shards}", f"run_root={root / 'runs'}", *FAST]
    cfg = load_config(CONFIG, overrides)
    write_masks_from_ground_truth(shards / "train", Path(cfg.seg.masks_url))
    return {"root": root, "shards": shards, "overrides": overrides}


def config(exp, *extra):
    return load_config(CONFIG, [*exp["overrides"], *extra])


@pytest.fixture(scope="module")
def trained(exp):
    cfg = config(exp)
    result = train_seg(cfg, **QUIET)
    return cfg, result


def plain_matrix(cfg, split: Path, crf=None) -> ConfusionMatrix:
    """The confusion matrix of every val image, one at a time in this process."""
    model, classes, _ = load_segmenter(cfg)
    cm = ConfusionMatrix(len(classes) + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors (seg.torch_threads)
    try:
        for shard in json.loads((split / "manifest.json").read_text())["shards"]:
            for raw in iter_shard(str(split / shard["name"])):
                rgb = decode_rgb(raw["jpg"])  # (3, H, W)
                image = normalize(rgb[None], cfg.data.mean, cfg.data.std)
                pred = predict_labels(
                    model,
                    image,
                    cfg.seg.eval_scales,
                    cfg.seg.eval_flip,
                    crf=crf,
                    rgb=rgb.permute(1, 2, 0).numpy(),
                )
                cm.update(decode_label(raw["mask.png"]), pred)
    finally:
        torch.set_num_threads(threads)
    return cm


# ------------------------------------------------------------------------------------- training
def test_two_workers_train_and_the_loss_falls(trained, exp):
    cfg, result = trained
    assert result.metrics["epoch"] == 3
    run = Path(run_url(cfg))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "ce" in r]
    assert len(steps) >= 6 and steps[-1]["ce"] < steps[0]["ce"] - 0.1, [r["ce"] for r in steps]
    newest = max(p for p in run.glob("checkpoint_*") if p.is_dir())
    saved = load_checkpoint(newest)
    assert saved["stage"] == "seg" and saved["state"]["epoch"] == 3
    assert len(saved["loaders"]) == 2  # one position per worker
    model, classes, where = load_segmenter(cfg)
    assert where.startswith(str(newest)) and len(classes) == 8
    assert model.num_classes == 9 and not model.training
    assert load_config(str(run / "config.yaml")).seg.backbone == "resnet18"
    with pytest.raises(StageError, match=r"missing: .*'backbone': 'resnet34'.*'resnet18'"):
        load_segmenter(config(exp, "seg.backbone=resnet34"))


def test_setup_errors_name_the_offending_values(exp, tmp_path):
    with pytest.raises(TrainingError, match=r"seg.global_batch=9 .*num_workers=2"):
        check_seg(config(exp, "seg.global_batch=9"))
    check_seg(config(exp, "seg.global_batch=8"))
    renamed = tmp_path / "val"
    renamed.mkdir()
    manifest = json.loads((exp["shards"] / "val" / "manifest.json").read_text())
    manifest["classes"] = [c.upper() for c in manifest["classes"]]
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match=r"'disc'.*'DISC'"):
        check_seg(config(exp, f"seg.val_url={renamed}"))
    with pytest.raises(TrainingError, match="has no manifest.json"):
        check_seg(config(exp, f"seg.masks_url={tmp_path / 'none'}"))
    with pytest.raises(StageError, match="no segmentation checkpoint under"):
        load_segmenter(config(exp, f"seg.out_url={tmp_path / 'nothing'}"))


# ----------------------------------------------------------------------------------- evaluation
def test_sharded_evaluation_equals_a_plain_loop(trained, exp, tmp_path):
    cfg, _ = trained
    result = evaluate_seg(cfg, out_url=str(tmp_path / "eval"), **QUIET)
    want = plain_matrix(cfg, exp["shards"] / "val")
    assert np.array_equal(np.array(result["matrix"]), want.matrix)
    assert result["miou"] == pytest.approx(want.miou()) and result["images"] == 8
    assert result["actors"] == 2 and result["images_per_s"] > 0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["matrix"] == want.matrix.tolist() and saved["settings"]["scales"] == [1.0]
    assert len(saved["per_class"]) == 9 and saved["per_class"]["background"] is not None
    with Image.open(tmp_path / "eval" / "overlays.png") as im:
        assert im.size[0] > 3 * 160  # image, prediction, gt
    default = evaluate_seg(cfg, **QUIET)  # the default place: <seg.out_url>/eval
    assert (Path(cfg.seg.out_url) / "eval" / "eval.json").exists()
    assert default["matrix"] == result["matrix"]


def test_multiscale_flip_crf_evaluation_equals_a_plain_loop(trained, exp, tmp_path):
    cfg = config(
        exp, "seg.eval_scales=[0.75,1.25]", "seg.eval_flip=true", "seg.crf=true", "seg.num_actors=0"
    )
    result = evaluate_seg(cfg, out_url=str(tmp_path / "ms"), **QUIET)
    want = plain_matrix(cfg, exp["shards"] / "val", crf=crf_inference)
    assert np.array_equal(np.array(result["matrix"]), want.matrix)
    assert result["settings"]["scales"] == [0.75, 1.25] and result["settings"]["crf"] is True
    # a split named on the call: the train split has masks too
    train = evaluate_seg(
        trained[0], split_url=str(exp["shards"] / "train"), out_url=str(tmp_path / "train"), **QUIET
    )
    assert train["images"] == 24 and train["split"] == str(exp["shards"] / "train")


# ---------------------------------------------------------------------------------- predictions
def test_predict_a_folder_lists_bad_and_skips_existing(trained, tmp_path, one_thread):
    cfg, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {"a": (70, 50), "b": (96, 96), "c": (41, 83)}  # (W, H)
    rng = np.random.default_rng(0)
    for stem, (w, h) in sizes.items():
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.{'png' if stem == 'b' else 'jpg'}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = predict(cfg, str(folder), str(out), chunk_size=2, **QUIET)
    assert summary["written"] == 3 and summary["existing"] == 0 and summary["images"] == 4
    assert [f["input"] for f in summary["failed"]] == ["broken.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "predictions.json"]
    model, _, _ = load_segmenter(cfg)
    for stem, size in sizes.items():
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == size
            assert im.getpalette()[:30] == palette(10).flatten().tolist()
            got = np.array(im)
        src = next(folder.glob(f"{stem}.*"))
        rgb = decode_rgb(src.read_bytes())
        want = predict_labels(model, normalize(rgb[None], cfg.data.mean, cfg.data.std))
        assert np.array_equal(got, want)
    assert json.loads((out / "predictions.json").read_text())["failed_count"] == 1

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = predict(cfg, str(folder), str(out), **QUIET)
    assert again["written"] == 0 and again["existing"] == 3 and again["failed_count"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    (out / "b.png").unlink()
    third = predict(cfg, str(folder), str(out), **QUIET)
    assert third["written"] == 1 and (out / "b.png").exists()


def test_predict_an_image_split_writes_one_png_per_key(trained, exp, tmp_path):
    cfg, _ = trained
    split = exp["shards"] / "val"
    summary = predict(cfg, str(split), str(tmp_path / "val"), **QUIET)
    shards = json.loads((split / "manifest.json").read_text())["shards"]
    keys = [k for s in shards for k in s["keys"]]
    assert summary["kind"] == "split" and summary["written"] == 8 and not summary["failed"]
    assert sorted(p.stem for p in (tmp_path / "val").glob("*.png")) == sorted(keys)
    raw = next(iter_shard(str(split / "shard-000000.tar")))
    with Image.open(tmp_path / "val" / f"{raw['__key__']}.png") as im:
        assert im.size == Image.open(io.BytesIO(raw["jpg"])).size and im.mode == "P"
    with pytest.raises(StageError, match="is the input folder"):
        predict(cfg, str(split), str(split), **QUIET)


def test_export_of_the_trained_network_matches_pytorch(trained, exp, tmp_path):
    import onnxruntime

    out = tmp_path / "export"
    assert (
        main(["export", "--config", CONFIG, *exp["overrides"], "--out", str(out), "--size", "64"])
        == 0
    )
    info = json.loads((out / "export.json").read_text())
    assert info["classes"][0] == "background" and len(info["classes"]) == 9
    assert all(v["max_abs_diff"] < 1e-4 for v in info["exports"].values())
    # A deployment without this package: ONNX Runtime on another image size.
    cfg, _ = trained
    model, _, _ = load_segmenter(cfg)
    x = torch.randn(1, 3, 72, 88)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (1, 9, 72, 88) and abs(got - want).max() < 1e-3
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    assert torch.allclose(scripted(x), torch.from_numpy(want), atol=1e-4)
