"""Label shards and label modes without Ray: the PNG round trip, each mode's per-image function
against direct calls of the functions it wraps, the actor's join of a CAM shard with its image
shard (bad inputs skipped and listed), the AffinityNet checkpoint checks, and the evaluation
against a hand-computed confusion matrix with ignored predictions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcis_dist.affinity.labels import confident_labels, saliency_labels
from mcis_dist.affinity.random_walk import neighbour_offsets, propagate_to_labels
from mcis_dist.cams.maps import cam_labels, upsample_cams
from mcis_dist.config import load_config
from mcis_dist.crf import crf_inference
from mcis_dist.data.transforms import normalize
from mcis_dist.formats.cams import FORMAT as CAM_FORMAT
from mcis_dist.formats.cams import encode_cam
from mcis_dist.formats.labels import (
    FORMAT,
    decode_label,
    encode_label,
    iter_label_shard,
    read_label_manifest,
)
from mcis_dist.masks.modes import MODES, Sample, SkipSample, cams_on_grid, make_sample
from mcis_dist.masks.stage import LabelActor, resolve_affinity_checkpoint
from mcis_dist.models.build import build_affinity_net
from mcis_dist.runtime.paths import affinity_run_url
from mcis_dist.runtime.sharded import StageError
from mcis_dist.shards.build import ShardWriter
from mcis_dist.storage import open_storage

from conftest import save_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
CPU = torch.device("cpu")


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def smooth_cams(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w) float32 maps in [0, 1], each max-normalised, with a blob per class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    maps = []
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.1 * h * w)) + 0.05 * rng.random((h, w))
        maps.append(m / m.max())
    return np.stack(maps).astype(np.float32)


def sample(h=21, w=30, stride=4, ids=(1, 4), seed=0, saliency=None) -> Sample:
    grid = (-(-h // stride), -(-w // stride))
    return Sample(
        "k",
        list(ids),
        smooth_cams(len(ids), *grid, seed=seed),
        stride,
        noise_rgb(h, w, seed),
        saliency,
    )


def cfg_with(*overrides: str):
    return load_config(CONFIG, list(overrides))


# ---------------------------------------------------------------------------------- the format
def test_label_png_round_trip_is_exact():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, size=(37, 53)).astype(np.uint8)
    label[rng.random(label.shape) < 0.2] = 255
    blob = encode_label(label)
    with Image.open(io.BytesIO(blob)) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (53, 37)
    back = decode_label(blob)
    assert back.dtype == np.uint8 and np.array_equal(back, label)
    assert encode_label(label) == blob  # deterministic bytes
    with pytest.raises(ValueError, match="uint8"):
        encode_label(label.astype(np.int64))
    with pytest.raises(ValueError, match="8-bit grey"):
        decode_label(png(noise_rgb(4, 4)))


def test_read_label_manifest_errors(tmp_path):
    with pytest.raises(StageError, match="has no manifest.json"):
        read_label_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": CAM_FORMAT}))
    with pytest.raises(StageError, match="not a label manifest.*mcis-cams/1"):
        read_label_manifest(str(tmp_path))


# --------------------------------------------------------------------- each mode, one image
def test_confident_mode_is_confident_labels_at_full_resolution():
    s = sample()
    full = upsample_cams(s.cams, s.stride, s.size)
    got = MODES["confident"].build(cfg_with(), None, CPU)(s)
    assert got.shape == s.size and got.dtype == np.uint8
    assert np.array_equal(got, confident_labels(full, [1, 4], 4.0, 32.0))
    c = cfg_with("affinity.alpha_low=2", "affinity.alpha_high=8")
    assert np.array_equal(
        MODES["confident"].build(c, None, CPU)(s), confident_labels(full, [1, 4], 2.0, 8.0)
    )
    c = cfg_with(
        "affinity.label_mode=threshold", "affinity.fg_threshold=0.4", "affinity.bg_threshold=0.1"
    )
    want = confident_labels(full, [1, 4], fg_threshold=0.4, bg_threshold=0.1)
    assert np.array_equal(MODES["confident"].build(c, None, CPU)(s), want)
    c = cfg_with("affinity.crf=true")
    want = confident_labels(full, [1, 4], 4.0, 32.0, crf=crf_inference, image=s.rgb)
    assert np.array_equal(MODES["confident"].build(c, None, CPU)(s), want)
    assert {0, 2, 5, 255} >= set(np.unique(want).tolist())


def test_cams_mode_is_cam_labels_at_the_threshold():
    s = sample(stride=8)
    c = cfg_with("cams.bg_threshold=0.45")
    want = cam_labels(upsample_cams(s.cams, 8, s.size), [1, 4], 0.45)
    assert np.array_equal(MODES["cams"].build(c, None, CPU)(s), want)
    assert set(np.unique(want).tolist()) == {0, 2, 5}


def test_saliency_mode_is_saliency_labels_and_skips_what_it_leaves_out():
    s = sample(h=24, w=32, stride=8, saliency=(noise_rgb(24, 32, 3)[..., 0] // 2 + 100))
    label = MODES["saliency"].build(cfg_with(), None, CPU)
    want, keep = saliency_labels(upsample_cams(s.cams, 8, s.size), [1, 4], s.saliency)
    assert keep and np.array_equal(label(s), want)
    with pytest.raises(SkipSample, match="no saliency map"):
        label(sample(h=24, w=32, stride=8))
    with pytest.raises(SkipSample, match="foreground under 1%"):
        label(sample(h=24, w=32, stride=8, saliency=np.zeros((24, 32), np.uint8)))


@pytest.fixture(scope="module")
def affinity_net():
    cfg = cfg_with("masks.steps=6", "masks.radius=3")
    torch.manual_seed(0)
    return cfg, build_affinity_net(cfg).eval()


def direct_walk(cfg, net, s: Sample, **kw) -> np.ndarray:
    """The random walk's label written out with the library calls themselves."""
    x = torch.from_numpy(s.rgb).permute(2, 0, 1)[None]
    offsets = neighbour_offsets(cfg.masks.radius)
    with torch.no_grad():
        aff = net.affinities(net(normalize(x, cfg.data.mean, cfg.data.std)), offsets)[0][0]
    m = cfg.masks
    return propagate_to_labels(
        torch.from_numpy(s.cams),
        aff,
        offsets,
        s.size,
        background=m.background,
        bg_threshold=m.bg_threshold,
        bg_power=m.bg_power,
        beta=m.beta,
        steps=m.steps,
        stride=8,
        class_ids=[k + 1 for k in s.class_ids],
        **kw,
    ).numpy()


@pytest.mark.parametrize("background", ["constant", "power"])
def test_random_walk_mode_is_propagate_to_labels_on_the_affinity_nets_affinities(
    affinity_net, background
):
    cfg, net = affinity_net
    cfg = cfg.model_copy(deep=True)
    cfg.masks.background = background
    s = sample(h=37, w=52, stride=8, ids=(0, 6), seed=2)  # grid 5 x 7
    label = MODES["random_walk"].build(cfg, net.state_dict(), CPU)
    want = direct_walk(cfg, net, s)
    assert np.array_equal(label(s), want) and want.shape == (37, 52)
    # The scores path (needed by the margin and the CRF) takes the same steps.
    scores = label.scores(torch.from_numpy(s.cams), label.affinities(s.rgb), s.size).numpy()
    assert scores.shape == (3, 37, 52)
    assert np.array_equal(np.array([0, 1, 7], np.uint8)[scores.argmax(0)], want)
    # A margin ignores the pixels whose best two scores are closer than it.
    top2 = np.sort(scores, axis=0)[-2:]
    cfg.masks.ignore_margin = margin = float(np.quantile(top2[1] - top2[0], 0.3))
    got = MODES["random_walk"].build(cfg, net.state_dict(), CPU)(s)
    close = top2[1] - top2[0] < margin
    assert 0 < close.sum() < close.size
    assert np.array_equal(got, np.where(close, 255, want))


def test_random_walk_mode_with_crf_and_cams_at_another_stride(affinity_net):
    cfg, net = affinity_net
    cfg = cfg.model_copy(deep=True)
    cfg.masks.crf = True
    s = sample(h=30, w=41, stride=4, ids=(2,), seed=5)
    label = MODES["random_walk"].build(cfg, net.state_dict(), CPU)
    aff = label.affinities(s.rgb)  # (O, 4, 6)
    grid = cams_on_grid(s.cams, 4, s.size, tuple(aff.shape[-2:]), 8)
    scores = label.scores(grid, aff, s.size).numpy()
    probs = scores / scores.sum(0, keepdims=True)
    want = np.array([0, 3], np.uint8)[crf_inference(s.rgb, probs).argmax(0)]
    assert np.array_equal(label(s), want)


def test_cams_on_grid_averages_the_pixels_of_each_cell():
    maps = np.stack([np.full((4, 6), 0.5), np.arange(24).reshape(4, 6) / 23]).astype(np.float32)
    same = cams_on_grid(maps, 8, (30, 41), (4, 6), 8)
    assert torch.equal(same, torch.from_numpy(maps))
    full = upsample_cams(maps, 8, (30, 41))  # stored at stride 8, wanted at stride 16
    got = cams_on_grid(maps, 8, (30, 41), (2, 3), 16)
    assert got.shape == (2, 2, 3)
    assert torch.allclose(got[0], torch.full((2, 3), 0.5))
    assert got[1, 0, 0] == pytest.approx(full[1, :16, :16].mean(), abs=1e-6)
    assert got[1, 1, 2] == pytest.approx(full[1, 16:, 32:].mean(), abs=1e-6)  # edge-padded cell
    assert cams_on_grid(np.zeros((0, 4, 6), np.float32), 4, (16, 24), (2, 3), 8).shape == (0, 2, 3)


def test_make_sample_skips_inputs_that_do_not_fit():
    rgb = noise_rgb(16, 24)
    meta = {"key": "a", "labels": [0, 2], "size": [16, 24], "stride": 8}
    maps = smooth_cams(2, 2, 3)
    raw = {"__key__": "a", "png": png(rgb), "sal.png": png(rgb[..., 0])}
    s = make_sample(raw, meta, maps, saliency=True)
    assert np.array_equal(s.rgb, rgb) and np.array_equal(s.saliency, rgb[..., 0])
    assert make_sample(raw, meta, maps).saliency is None
    cases = [
        ({**raw, "png": b"not an image"}, meta, maps, "undecodable image"),
        ({"__key__": "a"}, meta, maps, "no image member"),
        (raw, {**meta, "size": [16, 25]}, maps, r"for size \[16, 25\] but the image is \[16, 24\]"),
        (raw, meta, maps[:1], "does not fit labels"),
        ({**raw, "sal.png": png(rgb[:8, :, 0])}, meta, maps, "saliency map"),
    ]
    for r, m, c, reason in cases:
        with pytest.raises(SkipSample, match=reason):
            make_sample(r, m, c, saliency=True)


# ------------------------------------------------------- hand-made split and CAM folder
def write_split(folder: Path, items: list[dict], classes: list[str]) -> None:
    """One shard of items {key, rgb, labels[, mask][, sal]} and its manifest."""
    folder.mkdir(parents=True)
    writer = ShardWriter(folder / "shard-000000.tar")
    for it in items:
        entry = {
            "__key__": it["key"],
            "png": png(it["rgb"]),
            "json": json.dumps({"labels": it["labels"]}).encode(),
        }
        if "mask" in it:
            entry["mask.png"] = png(it["mask"])
        writer.write(entry)
    (folder / "shard-000000.idx").write_text(writer.close())
    keys = [it["key"] for it in items]
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": "mcis-shards/1",
                "classes": classes,
                "num_samples": len(items),
                "shards": [
                    {
                        "name": "shard-000000.tar",
                        "index": "shard-000000.idx",
                        "first": 0,
                        "samples": len(items),
                        "bytes": writer.bytes,
                        "sha256": writer.sha256,
                        "keys": keys,
                    }
                ],
            }
        )
    )


def write_cams(folder: Path, split: Path, entries: list[dict], classes: list[str]) -> None:
    """One CAM shard of entries {key, labels, size, stride, maps} and its manifest."""
    folder.mkdir(parents=True)
    writer = ShardWriter(folder / "cams-000000.tar")
    for e in entries:
        meta = {k: e[k] for k in ("key", "labels", "size", "stride")} | {"fallback": []}
        writer.write(
            {
                "__key__": e["key"],
                "cam.npy": encode_cam(e["maps"]),
                "json": json.dumps(meta).encode(),
            }
        )
    writer.close()
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": CAM_FORMAT,
                "fingerprint": "f",
                "classes": classes,
                "samples": len(entries),
                "source": {"url": str(split), "samples": len(entries)},
                "settings": {"mode": "single"},
                "shards": [
                    {
                        "name": "cams-000000.tar",
                        "index": 0,
                        "source": "shard-000000.tar",
                        "samples": len(entries),
                        "sha256": writer.sha256,
                        "keys": [e["key"] for e in entries],
                    }
                ],
            }
        )
    )


def test_the_actor_joins_cams_with_images_and_lists_what_it_skips(tmp_path):
    """In-process (the class Ray runs as an actor): 3 images, 4 CAMs of which one has no image,
    one another size than its image; one image has no CAM (the CAM stage skipped it)."""
    classes = ["a", "b", "c"]
    items = [{"key": f"im{i}", "rgb": noise_rgb(20, 28, i), "labels": [i % 3]} for i in range(4)]
    write_split(tmp_path / "split", items, classes)
    cams = [
        {
            "key": f"im{i}",
            "labels": [i % 3],
            "size": [20, 28],
            "stride": 8,
            "maps": smooth_cams(1, 3, 4, seed=i),
        }
        for i in (0, 1, 3)
    ]
    cams[1]["size"] = [20, 29]
    cams.append({**cams[0], "key": "ghost"})
    write_cams(tmp_path / "cams", tmp_path / "split", cams, classes)
    cfg = cfg_with("cams.bg_threshold=0.3")
    spec = {
        "mode": "cams",
        "cams_url": str(tmp_path / "cams"),
        "use_gpu": False,
        "threads": 1,
        "source_url": str(tmp_path / "split"),
        "out_url": str(tmp_path / "out"),
    }
    actor = LabelActor(json.loads(cfg.model_dump_json()), spec, None)
    record = actor.run(
        {
            "name": "labels-000000.tar",
            "index": 0,
            "source": "shard-000000.tar",
            "cams": "cams-000000.tar",
            "fingerprint": "x",
        }
    )
    assert record["keys"] == ["im0", "im3"] and record["samples"] == 2
    reasons = {s["key"]: s["reason"] for s in record["skipped"]}
    assert set(reasons) == {"im1", "ghost"}
    assert "[20, 29] but the image is [20, 28]" in reasons["im1"]
    assert "no image with this key" in reasons["ghost"]
    out = open_storage(tmp_path / "out")
    got = list(iter_label_shard(out, "labels-000000.tar"))
    assert [m["key"] for m, _ in got] == ["im0", "im3"]
    assert got[1][0] == {"key": "im3", "labels": [0], "size": [20, 28]}
    want = cam_labels(upsample_cams(cams[2]["maps"], 8, (20, 28)), [0], 0.3)
    assert np.array_equal(got[1][1], want)
    assert out.exists("labels-000000.idx") and out.exists("_parts/labels-000000.json")


def test_affinity_checkpoint_missing_or_for_another_net(tmp_path):
    cfg = cfg_with(f"run_root={tmp_path}")
    with pytest.raises(StageError, match="no AffinityNet checkpoint under"):
        resolve_affinity_checkpoint(cfg, None)
    other = cfg_with("affinity.head_width=0.5")
    ckpt = save_checkpoint(build_affinity_net(other), Path(affinity_run_url(cfg)))
    with pytest.raises(StageError, match=r"does not match.*shape: fuse.weight.*head_width"):
        resolve_affinity_checkpoint(cfg, None)
    state, where = resolve_affinity_checkpoint(other, str(ckpt))
    assert where.endswith("checkpoint.pt") and "fuse.weight" in state
    torch.save({"weights": {}}, tmp_path / "x.pt")
    with pytest.raises(StageError, match="no 'model' entry"):
        resolve_affinity_checkpoint(cfg, str(tmp_path / "x.pt"))


# ------------------------------------------------------------- evaluation: a hand-made case
def test_evaluation_against_a_hand_computed_confusion_matrix(tmp_path):
    """Two 2x4 images with known masks and labels holding 255s: the two confusion matrices (255
    predictions left out / as background) and the IoUs are written out by hand."""
    from mcis_dist.masks.evaluate import evaluate_masks

    classes = ["a", "b"]
    gts = [np.array([[0, 1, 1, 255], [0, 0, 2, 2]]), np.array([[1, 1, 0, 0], [1, 0, 0, 0]])]
    preds = [np.array([[0, 1, 255, 1], [0, 1, 2, 255]]), np.array([[1, 0, 0, 255], [1, 0, 1, 0]])]
    items = [
        {"key": f"img{i}", "rgb": noise_rgb(2, 4, i), "labels": [0], "mask": gts[i]}
        for i in range(2)
    ]
    write_split(tmp_path / "split", items, classes)
    labels = tmp_path / "labels"
    labels.mkdir()
    writer = ShardWriter(labels / "labels-000000.tar")
    for i, p in enumerate(preds):
        meta = {"key": f"img{i}", "labels": [0, 1], "size": [2, 4]}
        writer.write(
            {
                "__key__": f"img{i}",
                "label.png": encode_label(p.astype(np.uint8)),
                "json": json.dumps(meta).encode(),
            }
        )
    writer.close()
    (labels / "manifest.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "kind": "pseudo",
                "mode": "random_walk",
                "classes": classes,
                "samples": 2,
                "source": {"url": str(tmp_path / "split")},
                "shards": [
                    {"name": "labels-000000.tar", "source": "shard-000000.tar", "samples": 2}
                ],
            }
        )
    )
    cfg = cfg_with("masks.eval_grid=2")
    result = evaluate_masks(cfg, masks_url=str(labels), log=lambda *_: None)
    # rows gt, columns prediction; gt 255 never counted; 3 gt pixels predicted 255.
    left_out = np.array([[5, 2, 0], [1, 3, 0], [0, 0, 1]])
    as_bg = np.array([[6, 2, 0], [2, 3, 0], [1, 0, 1]])
    assert np.array_equal(np.array(result["matrix"]), left_out)
    assert np.array_equal(np.array(result["ignore_as_bg"]["matrix"]), as_bg)
    assert result["miou"] == pytest.approx(np.mean([5 / 8, 3 / 6, 1 / 1]))
    assert result["miou_ignore_as_bg"] == pytest.approx(np.mean([6 / 11, 3 / 7, 1 / 2]))
    assert result["ignored_share"] == pytest.approx(3 / 15)
    assert result["per_class"] == pytest.approx({"background": 5 / 8, "a": 0.5, "b": 1.0})
    assert result["images"] == 2 and result["kind"] == "pseudo"
    # per half (img0 and img1 hash to different halves), by hand from the same pixels
    from mcis_dist.evaluation.heldout import fold_of

    halves = result["by_half"]
    assert halves[str(fold_of("img0"))]["miou"] == pytest.approx(np.mean([2 / 3, 1 / 2, 1]))
    assert halves[str(fold_of("img1"))]["miou"] == pytest.approx(np.mean([3 / 5, 1 / 2]))
    assert json.loads((labels / "eval" / "eval.json").read_text())["miou"] == result["miou"]
    assert (labels / "eval" / "overlays.png").exists()


def test_a_truncated_image_shard_keeps_what_was_read(tmp_path):
    classes = ["a"]
    items = [{"key": f"im{i}", "rgb": noise_rgb(40, 48, i), "labels": [0]} for i in range(4)]
    write_split(tmp_path / "split", items, classes)
    cams = [
        {
            "key": f"im{i}",
            "labels": [0],
            "size": [40, 48],
            "stride": 8,
            "maps": smooth_cams(1, 5, 6, seed=i),
        }
        for i in range(4)
    ]
    write_cams(tmp_path / "cams", tmp_path / "split", cams, classes)
    tar = tmp_path / "split" / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    spec = {
        "mode": "cams",
        "cams_url": str(tmp_path / "cams"),
        "use_gpu": False,
        "threads": 1,
        "source_url": str(tmp_path / "split"),
        "out_url": str(tmp_path / "out"),
    }
    actor = LabelActor(json.loads(cfg_with().model_dump_json()), spec, None)
    record = actor.run(
        {
            "name": "labels-000000.tar",
            "index": 0,
            "source": "shard-000000.tar",
            "cams": "cams-000000.tar",
            "fingerprint": "x",
        }
    )
    assert 0 < record["samples"] < 4
    reasons = [s["reason"] for s in record["skipped"]]
    assert record["skipped"][0]["key"] == "shard-000000.tar:*" and reasons[0].startswith("shard:")
    assert len(reasons) == 1 + 4 - record["samples"]
    assert all(r == "shard-000000.tar could not be read to its end" for r in reasons[1:])
