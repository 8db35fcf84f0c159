"""Evaluation metrics against hand-computed and slow per-pixel references; the PNG grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from mcis_dist.evaluation import (
    ConfusionMatrix,
    ThresholdSweep,
    blend,
    cam_panel,
    colorize,
    format_table,
    heatmap,
    palette,
    parse_thresholds,
    save_grid,
)
from mcis_dist.evaluation.overlay import grid_size

# ---------------------------------------------------------------- ConfusionMatrix


def slow_matrix(gt: np.ndarray, pred: np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    """Reference: a pure-Python loop over pixels."""
    m = np.zeros((n, n), dtype=np.int64)
    for y in range(gt.shape[0]):
        for x in range(gt.shape[1]):
            g = int(gt[y, x])
            if g != ignore:
                m[g, int(pred[y, x])] += 1
    return m


def slow_iou(m: np.ndarray) -> list[float]:
    """Reference: IoU_c = TP / (TP + FP + FN) written with loops, NaN when 0 / 0."""
    n = m.shape[0]
    out = []
    for c in range(n):
        tp = int(m[c, c])
        fp = sum(int(m[r, c]) for r in range(n) if r != c)
        fn = sum(int(m[c, k]) for k in range(n) if k != c)
        out.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return out


def test_confusion_matrix_hand_example():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]], dtype=np.uint8)
    cm = ConfusionMatrix(num_classes=4)  # class 3 is in neither gt nor pred
    cm.update(gt, pred)
    # pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) [ignored] (1,0)
    expected = np.array(
        [
            [1, 1, 0, 0],
            [1, 2, 0, 0],
            [1, 0, 1, 0],
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    # class 0: TP 1, FP 2 (gt 1, gt 2), FN 1 -> 1/4; class 1: TP 2, FP 1, FN 1 -> 2/4;
    # class 2: TP 1, FP 0, FN 1 -> 1/2; class 3: absent -> NaN
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [0.25, 0.5, 0.5])
    assert np.isnan(iou[3])
    assert cm.miou() == pytest.approx(1.25 / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)
    assert cm.total == 7

    d = cm.to_dict(["bg", "a", "b", "c"])
    json.dumps(d)  # JSON-able (no NaN)
    assert d["per_class"] == {"bg": 0.25, "a": 0.5, "b": 0.5, "c": None}
    assert d["miou"] == pytest.approx(1.25 / 3)
    assert d["matrix"] == expected.tolist()


def test_confusion_matrix_matches_slow_loop():
    rng = np.random.default_rng(0)
    n = 5
    cm = ConfusionMatrix(n)
    ref = np.zeros((n, n), dtype=np.int64)
    for _ in range(3):
        gt = rng.integers(0, n, size=(13, 17))
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = rng.integers(0, n, size=(13, 17))
        cm.update(gt, pred)
        ref += slow_matrix(gt, pred, n)
    np.testing.assert_array_equal(cm.matrix, ref)
    np.testing.assert_allclose(cm.iou(), slow_iou(ref))
    assert cm.miou() == pytest.approx(np.mean(slow_iou(ref)))


def test_merge_equals_update_over_concatenation():
    rng = np.random.default_rng(1)
    n = 6
    gts = [rng.integers(0, n, size=(8, 9)).astype(np.uint8) for _ in range(4)]
    preds = [rng.integers(0, n, size=(8, 9)).astype(np.uint8) for _ in range(4)]
    gts[2][0, :] = 255
    whole = ConfusionMatrix(n)
    whole.update(np.concatenate(gts), np.concatenate(preds))
    rank0, rank1 = ConfusionMatrix(n), ConfusionMatrix(n)
    for g, p in zip(gts[:2], preds[:2], strict=True):
        rank0.update(g, p)
    for g, p in zip(gts[2:], preds[2:], strict=True):
        rank1.update(g, p)
    merged = ConfusionMatrix(n)
    merged += rank0
    merged.merge(rank1)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    np.testing.assert_array_equal(
        ConfusionMatrix.from_matrix(rank0.matrix + rank1.matrix).matrix, whole.matrix
    )
    with pytest.raises(ValueError, match="num_classes=7"):
        merged.merge(ConfusionMatrix(7))


def test_uint8_labels_do_not_overflow():
    cm = ConfusionMatrix(21)
    cm.update(np.array([[20]], dtype=np.uint8), np.array([[19]], dtype=np.uint8))
    assert cm.matrix[20, 19] == 1 and cm.total == 1


def test_confusion_matrix_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=r"gt has values \[7\]"):
        cm.update(np.array([0, 7, 255]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"pred has values \[-1\]"):
        cm.update(np.array([0, 1, 2]), np.array([0, -1, 2]))
    with pytest.raises(ValueError, match=r"pred has values \[255\]"):
        cm.update(np.array([0, 1, 2]), np.array([0, 255, 2]))
    with pytest.raises(TypeError, match="float"):
        cm.update(np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match="2 class names"):
        cm.to_dict(["a", "b"])
    assert cm.total == 0 and math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    assert cm.to_dict()["miou"] is None


# ---------------------------------------------------------------- ThresholdSweep


def slow_sweep_pred(scores, class_ids, t: float) -> np.ndarray:
    """Reference: per pixel, argmax over [t, s_1..s_L] with the first (background) on ties."""
    _, h, w = scores.shape
    pred = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            cands = [t] + [float(s) for s in scores[:, y, x]]
            best = 0
            for i, v in enumerate(cands):
                if v > cands[best]:
                    best = i
            pred[y, x] = 0 if best == 0 else class_ids[best - 1] + 1
    return pred


def test_threshold_sweep_matches_per_pixel_loop():
    rng = np.random.default_rng(2)
    n = 6
    # eighths are exact in float32 and float64: scores tie with each other and the thresholds
    thresholds = [0.5, 0.0, 0.25, 0.375, 1.0, 0.25]  # unsorted, with a duplicate
    sweep = ThresholdSweep(n, thresholds)
    refs = [np.zeros((n, n), dtype=np.int64) for _ in thresholds]
    for labels in ([3], [0, 4], [1, 2, 4], [], [4, 1]):
        scores = (rng.integers(0, 9, size=(len(labels), 7, 9)) / 8).astype(np.float32)
        gt = rng.integers(0, n, size=(7, 9))
        gt[rng.random(gt.shape) < 0.15] = 255
        sweep.update(scores, labels, gt)
        for r, t in zip(refs, thresholds, strict=True):
            r += slow_matrix(gt, slow_sweep_pred(scores, labels, t), n)
    mats = sweep.matrices()
    for t, r, cm in zip(thresholds, refs, mats, strict=True):
        np.testing.assert_array_equal(cm.matrix, r, err_msg=f"threshold {t}")
    assert [t for t, _ in sweep.results()] == thresholds
    mious = [ConfusionMatrix.from_matrix(r).miou() for r in refs]
    assert [m for _, m in sweep.results()] == pytest.approx(mious)
    t_best, cm_best = sweep.best()
    assert t_best == thresholds[int(np.argmax(mious))]
    np.testing.assert_array_equal(cm_best.matrix, refs[int(np.argmax(mious))])
    np.testing.assert_array_equal(sweep.matrix_at(0.375).matrix, refs[3])
    # threshold 1.0 >= every score: all background
    assert sweep.matrix_at(1.0).matrix[:, 1:].sum() == 0
    with pytest.raises(ValueError, match="swept"):
        sweep.matrix_at(0.3)


def test_threshold_sweep_merge_and_errors():
    rng = np.random.default_rng(3)
    n, ts = 4, [0.1, 0.3]
    a, b, both = ThresholdSweep(n, ts), ThresholdSweep(n, ts), ThresholdSweep(n, ts)
    for sweep in (a, b):
        scores = rng.random((2, 5, 6))
        gt = rng.integers(0, n, size=(5, 6))
        sweep.update(scores, [0, 2], gt)
        both.update(scores, [0, 2], gt)
    a += b
    for x, y in zip(a.matrices(), both.matrices(), strict=True):
        np.testing.assert_array_equal(x.matrix, y.matrix)
    with pytest.raises(ValueError, match="thresholds"):
        a.merge(ThresholdSweep(n, [0.1]))
    with pytest.raises(ValueError, match=r"class_ids \(foreground classes\) has values \[3\]"):
        a.update(np.zeros((1, 5, 6)), [3], np.zeros((5, 6), int))
    with pytest.raises(ValueError, match=r"2 score maps but class_ids \[1\]"):
        a.update(np.zeros((2, 5, 6)), [1], np.zeros((5, 6), int))
    with pytest.raises(ValueError, match=r"gt shape \(5, 5\)"):
        a.update(np.zeros((1, 5, 6)), [1], np.zeros((5, 5), int))
    with pytest.raises(ValueError, match="no pixels"):
        ThresholdSweep(n, ts).best()


# ---------------------------------------------------------------- text helpers


def test_parse_thresholds():
    assert parse_thresholds("0:0.6:0.05") == pytest.approx([i * 0.05 for i in range(13)])
    assert parse_thresholds("0:0.6:0.05")[3] == 0.15  # float noise rounded away
    assert parse_thresholds("0.1, 0.2,0.35") == [0.1, 0.2, 0.35]
    assert parse_thresholds("0.3") == [0.3]
    assert parse_thresholds("0.2:0.2:0.1") == [0.2]
    for bad in ("", "0:1", "0:1:0", "1:0:0.1", "a,b", "0.1,,0.2", "nan"):
        with pytest.raises(ValueError, match=f"bad thresholds {bad!r}"):
            parse_thresholds(bad)


def test_format_table():
    text = format_table(["background", "cat"], [0.5, math.nan], title="CAM t=0.25")
    lines = text.splitlines()
    assert lines[0] == "CAM t=0.25"
    assert any(ln.startswith("background") and ln.endswith("50.00") for ln in lines)
    assert any(ln.startswith("cat") and ln.endswith("-") for ln in lines)
    assert lines[-1].startswith("mean") and lines[-1].endswith("50.00")


# ---------------------------------------------------------------- pictures


def test_palette_and_colorize():
    pal = palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert pal[15].tolist() == [192, 128, 128]  # person
    img = colorize(np.array([[0, 1], [255, 15]], dtype=np.uint8))
    assert img.mode == "RGB" and img.size == (2, 2)
    a = np.asarray(img)
    assert a[0, 1].tolist() == [128, 0, 0]
    assert a[1, 0].tolist() == [255, 255, 255]
    assert a[1, 1].tolist() == [192, 128, 128]


def test_heatmap_and_blend():
    hm = heatmap(np.array([[0.0, 0.5, 1.0, 2.0]]))
    assert hm.shape == (1, 4, 3) and hm.dtype == np.uint8
    assert hm[0, 0, 2] > hm[0, 0, 0]  # low -> blue
    assert hm[0, 2, 0] > hm[0, 2, 2]  # high -> red
    assert hm[0, 3].tolist() == hm[0, 2].tolist()  # clipped
    img = np.zeros((1, 4, 3), np.uint8)
    assert blend(img, np.full_like(img, 200), alpha=0.25).max() == 50
    with pytest.raises(ValueError, match="shape"):
        blend(img, np.zeros((2, 4, 3), np.uint8))


def test_save_grid_and_cam_panel(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    scores = rng.random((2, 15, 20))  # CAMs at half resolution
    label_map = rng.integers(0, 3, size=(30, 40))
    cells, caps = cam_panel(image, scores, ["cat", "dog"], label_map=label_map, gt=label_map)
    assert len(cells) == len(caps) == 5
    assert caps[0] == "image" and caps[1] == f"cat {scores[0].max():.2f}" and caps[-1] == "gt"
    assert all(c.shape == (30, 40, 3) for c in cells)

    rows = [cells, [Image.fromarray(image), colorize(label_map.astype(np.uint8)), None]]
    captions = [caps, ["a", "a very long caption that will not fit in the cell", ""]]
    out = save_grid(rows, tmp_path / "sub" / "grid.png", captions=captions, cell=64)
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == grid_size(rows, 64, captions=True)
    # 5 columns of 64 + 6 pads of 4; 2 rows of 64 + 14 caption + 3 pads
    assert grid_size(rows, 64, captions=True) == (5 * 64 + 6 * 4, 2 * (64 + 14) + 3 * 4)

    with Image.open(save_grid([[image]], tmp_path / "one.png", cell=20)) as png:
        assert png.size == (20 + 8, 20 + 8)
    with pytest.raises(ValueError, match="captions"):
        save_grid(rows, tmp_path / "x.png", captions=[["a"], ["b"]])
