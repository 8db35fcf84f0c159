"""Box-scored WSOL metrics (``mcis_dist.evaluation.boxes``, Choe et al. 2020), checked against
plain references written here with loops: a breadth-first flood fill for the connected regions,
pixel counting for IoU, and per-pair loops for thresholds and accuracies."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from mcis_dist.evaluation.boxes import (
    EMPTY_BOX,
    IOU_THRESHOLDS,
    METRICS,
    BoxSweeps,
    box_from_map,
    box_interval,
    box_iou,
    box_iou_matrix,
    box_metric,
    box_metrics,
    box_paired_difference,
    boxes_from_map,
    gt_known_loc,
    max_box_acc_v2,
    top1_cls,
    top1_loc,
)
from mcis_dist.evaluation.heldout import fold_of

THRESHOLDS = [round(0.1 * i, 10) for i in range(10)]
CLASSES = 5


# ---------------------------------------------------------------- plain references


def _ref_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of a boolean mask by flood fill, in row-major order of first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            todo, region = deque([(y, x)]), []
            while todo:
                cy, cx = todo.popleft()
                region.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            todo.append((ny, nx))
            regions.append(region)
    return regions


def _ref_box_of(region) -> tuple[int, int, int, int]:
    ys, xs = [p[0] for p in region], [p[1] for p in region]
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


def _ref_boxes(cam: np.ndarray, t: float, regions: str = "largest") -> list:
    found = _ref_regions(cam > t)
    if not found:
        return [EMPTY_BOX]
    if regions == "all":
        return [_ref_box_of(r) for r in found]
    best = found[0]
    for r in found[1:]:
        if len(r) > len(best):  # strictly larger: the first one wins ties
            best = r
    return [_ref_box_of(best)]


def _ref_iou(a, b) -> float:
    """IoU by painting both half-open boxes on a pixel grid and counting."""
    size = int(max(a[2], a[3], b[2], b[3], 1))
    ma = np.zeros((size, size), dtype=bool)
    mb = np.zeros((size, size), dtype=bool)
    ma[a[1] : a[3], a[0] : a[2]] = True
    mb[b[1] : b[3], b[0] : b[2]] = True
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union else 0.0


def _images(n: int, seed: int, noise: float = 0.3, h_range=(6, 10)):
    """n random images (key, scores (L, H, W), class ids, boxes, predicted): maps with a blob
    inside one of the class's boxes over noise, values on a 0.05 grid (so some equal a
    threshold), some classes without a box, some images without a prediction."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(*h_range, size=2))
        ids = sorted(rng.choice(CLASSES, size=int(rng.integers(1, 3)), replace=False).tolist())
        boxes = []
        scores = np.round(rng.random((len(ids), h, w)) * noise / 0.05) * 0.05
        for j, c in enumerate(ids):
            for _ in range(int(rng.choice([0, 1, 1, 2]))):
                x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
                x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
                boxes.append((c, x0, y0, x1, y1))
            mine = [b for b in boxes if b[0] == c]
            if mine:
                _, x0, y0, x1, y1 = mine[int(rng.integers(len(mine)))]
                scores[j, y0:y1, x0:x1] += np.round(rng.uniform(0.2, 0.7) / 0.05) * 0.05
        pred = rng.choice([None, ids[0], ids[-1], (ids[0] + 1) % CLASSES])
        out.append((f"img{seed}_{i:03d}", np.clip(scores, 0, 1), ids, boxes, pred))
    return out


def _sweeps(images, regions: str = "largest", thresholds=THRESHOLDS) -> BoxSweeps:
    s = BoxSweeps(thresholds, regions=regions)
    for im in images:
        s.add(*im)
    return s


def _ref_pairs(images, regions: str = "largest"):
    """Per counted (image, class) pair: (image index, class, [best IoU at every threshold])."""
    pairs = []
    for i, (_, scores, ids, boxes, _) in enumerate(images):
        for j, c in enumerate(ids):
            gts = [b[1:] for b in boxes if b[0] == c]
            if not gts:
                continue
            curve = [
                max(_ref_iou(p, g) for p in _ref_boxes(scores[j], t, regions) for g in gts)
                for t in THRESHOLDS
            ]
            pairs.append((i, c, curve))
    return pairs


def _ref_acc(pairs, t_index: int, delta: float) -> tuple[int, int]:
    return sum(p[2][t_index] >= delta for p in pairs), len(pairs)


def _ref_best(pairs, delta: float) -> int:
    accs = [_ref_acc(pairs, t, delta)[0] for t in range(len(THRESHOLDS))]
    return accs.index(max(accs))  # first (lowest threshold) on ties


def _ref_chosen(images, pairs, kind: str, delta: float, fixed=None) -> list[int]:
    """Per image, the threshold index it is scored at."""
    if kind == "fixed":
        return [THRESHOLDS.index(fixed)] * len(images)
    if kind == "oracle":
        return [_ref_best(pairs, delta)] * len(images)
    folds = [fold_of(im[0]) for im in images]
    best = {f: _ref_best([p for p in pairs if folds[p[0]] != f], delta) for f in (0, 1)}
    return [best[f] for f in folds]


def _ref_box_acc(images, pairs, kind, delta, fixed=None) -> float:
    chosen = _ref_chosen(images, pairs, kind, delta, fixed)
    return sum(p[2][chosen[p[0]]] >= delta for p in pairs) / len(pairs)


def _ref_metric(images, pairs, metric, kind, fixed=None) -> float:
    if metric == "gt_known_loc":
        return _ref_box_acc(images, pairs, kind, 0.5, fixed)
    if metric == "max_box_acc_v2":
        return float(np.mean([_ref_box_acc(images, pairs, kind, d, fixed) for d in IOU_THRESHOLDS]))
    if metric == "top1_cls":
        scored = [im for im in images if im[4] is not None]
        return sum(im[4] in im[2] for im in scored) / len(scored)
    chosen = _ref_chosen(images, pairs, kind, 0.5, fixed)
    hits = counted = 0
    for i, (_, _, _, boxes, pred) in enumerate(images):
        if pred is None or not boxes:
            continue
        counted += 1
        mine = [p for p in pairs if p[0] == i and p[1] == pred]
        hits += bool(mine) and mine[0][2][chosen[i]] >= 0.5
    return hits / counted


# ---------------------------------------------------------------- boxes and IoU


def test_box_from_map_matches_a_flood_fill_reference():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 9, size=2))
        cam = np.round(rng.random((h, w)) / 0.1) * 0.1  # values equal to thresholds occur
        for t in (0.0, 0.3, 0.5, 0.7, 0.9):
            assert box_from_map(cam, t) == _ref_boxes(cam, t)[0]
            got = boxes_from_map(cam, t)
            want = [b for b in _ref_boxes(cam, t, "all") if b != EMPTY_BOX]
            assert [tuple(b) for b in got.tolist()] == want
            checked += len(want) > 1
    assert checked > 50  # several regions occurred, so the largest one was really picked


def test_box_from_map_conventions():
    cam = np.zeros((5, 6))
    cam[1, 1] = cam[2, 2] = 0.8  # diagonal neighbours: one region under 8-connectivity
    assert box_from_map(cam, 0.5) == (1, 1, 3, 3)
    cam[4, 5] = 1.0
    assert box_from_map(cam, 0.5) == (1, 1, 3, 3)  # 2 pixels beat 1
    assert box_from_map(cam, 0.8) == (5, 4, 6, 5)  # strict: 0.8 is not above 0.8
    # largest by pixels, not by box area: a 3-pixel diagonal (3 x 3 box) loses to a 2 x 2 block
    cam = np.zeros((6, 6))
    cam[0, 0] = cam[1, 1] = cam[2, 2] = 1.0
    cam[4:6, 4:6] = 1.0
    assert box_from_map(cam, 0.5) == (4, 4, 6, 6)
    # ties: the region met first in row-major order
    cam = np.zeros((4, 7))
    cam[2:4, 0:2] = cam[0:2, 5:7] = 1.0
    assert box_from_map(cam, 0.5) == (5, 0, 7, 2)
    with pytest.raises(ValueError, match="NaN"):
        box_from_map(np.full((2, 2), np.nan), 0.5)


def test_empty_and_full_maps():
    h, w = 5, 7
    for t in THRESHOLDS:
        assert box_from_map(np.zeros((h, w)), t) == EMPTY_BOX
        assert boxes_from_map(np.zeros((h, w)), t).shape == (0, 4)
        assert box_from_map(np.ones((h, w)), t) == (0, 0, w, h)
    s = BoxSweeps(THRESHOLDS)
    s.add("zero", np.zeros((1, h, w)), [3], [(3, 1, 1, 4, 3)])
    s.add("one", np.ones((1, h, w)), [3], [(3, 1, 1, 4, 3)])
    assert np.array_equal(s.ious("zero")[1], np.zeros((len(THRESHOLDS), 1)))
    assert np.array_equal(s.ious("one")[1], np.full((len(THRESHOLDS), 1), 6 / 35))
    # a box covering the whole image is found exactly by the full map
    s.add("whole", np.ones((1, h, w)), [2], [(2, 0, 0, w, h)])
    assert np.array_equal(s.ious("whole")[1], np.ones((len(THRESHOLDS), 1)))
    assert box_metric(s, "gt_known_loc", "fixed", 0.5) == pytest.approx(1 / 3)


def test_box_iou_matches_pixel_counting():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 12, size=(60, 4))
    b = rng.integers(0, 12, size=(40, 4))
    for boxes in (a, b):  # sorted corners; some boxes empty (x0 == x1 or y0 == y1)
        boxes[:, [0, 2]] = np.sort(boxes[:, [0, 2]], axis=1)
        boxes[:, [1, 3]] = np.sort(boxes[:, [1, 3]], axis=1)
    mat = box_iou_matrix(a, b)
    assert mat.shape == (60, 40)
    for i, x in enumerate(a.tolist()):
        for j, y in enumerate(b.tolist()):
            want = _ref_iou(x, y)
            assert box_iou(x, y) == pytest.approx(want, abs=1e-12)
            assert box_iou(y, x) == pytest.approx(want, abs=1e-12)
            assert mat[i, j] == pytest.approx(want, abs=1e-12)
    assert 0 < (mat > 0).mean() < 1 and (mat == 0).any()  # overlapping and disjoint pairs
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # half-open: touching is no overlap
    assert box_iou(EMPTY_BOX, EMPTY_BOX) == 0.0


# ---------------------------------------------------------------- sweeps and metrics


@pytest.mark.parametrize("regions", ["largest", "all"])
def test_sweeps_match_the_reference(regions):
    images = _images(30, seed=2)
    sweeps = _sweeps(images, regions)
    ref = _ref_pairs(images, regions)
    got = []
    for i, (key, _, ids, _, _) in enumerate(images):
        cls, ious = sweeps.ious(key)
        assert cls == tuple(ids)
        for j, c in enumerate(ids):
            if np.isnan(ious[:, j]).all():
                assert not [b for b in images[i][3] if b[0] == c]  # no box of that class
            else:
                got.append((i, c, ious[:, j].tolist()))
    assert [(i, c) for i, c, _ in got] == [(i, c) for i, c, _ in ref]
    for (_, _, g), (_, _, r) in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("regions", ["largest", "all"])
def test_every_metric_and_kind_matches_the_reference(regions):
    images = _images(60, seed=3)
    sweeps = _sweeps(images, regions)
    pairs = _ref_pairs(images, regions)
    folds = {fold_of(im[0]) for im in images}
    assert folds == {0, 1}
    for metric in METRICS:
        for kind, fixed in (("heldout", None), ("oracle", None), ("fixed", 0.3)):
            want = _ref_metric(images, pairs, metric, kind, fixed)
            assert box_metric(sweeps, metric, kind, fixed) == pytest.approx(want), (metric, kind)
    # the named functions are the same figures
    assert gt_known_loc(sweeps, "oracle") == box_metric(sweeps, "gt_known_loc", "oracle")
    assert max_box_acc_v2(sweeps) == box_metric(sweeps, "max_box_acc_v2", "heldout")
    assert top1_loc(sweeps, "fixed", 0.3) == box_metric(sweeps, "top1_loc", "fixed", 0.3)
    assert top1_cls(sweeps) == top1_cls(sweeps, "oracle")  # no threshold in classification
    assert box_metrics(sweeps, "oracle")["max_box_acc_v2"] == max_box_acc_v2(sweeps, "oracle")
    # the oracle only flatters: at least the held-out and any fixed figure
    for metric in ("gt_known_loc", "max_box_acc_v2"):
        oracle = box_metric(sweeps, metric, "oracle")
        assert oracle >= box_metric(sweeps, metric, "heldout")
        assert all(oracle >= box_metric(sweeps, metric, "fixed", t) for t in THRESHOLDS)


def test_max_box_acc_v2_chooses_a_threshold_per_iou():
    """3 maps give only a loose box (IoU 16/49 for t < 0.25), 1 map also the exact box at
    t = 0.3: δ = 0.3 is best at 0 (4/4, the lowest of the ties), δ = 0.5 and 0.7 at 0.3 (1/4
    each), so MaxBoxAccV2 = (1 + 1/4 + 1/4) / 3 = 1/2, above the best that one shared
    threshold gives (1/3, at t < 0.25)."""
    loose = np.zeros((10, 10))
    loose[1:8, 1:8] = 0.25
    exact = loose.copy()
    exact[2:6, 2:6] = 0.4
    box = [(0, 2, 2, 6, 6)]
    s = BoxSweeps(THRESHOLDS)
    for i, cam in enumerate((loose, loose, loose, exact)):
        s.add(f"k{i}", cam[None], [0], box)
    assert s.ious("k3")[1][:5, 0].tolist() == pytest.approx([16 / 49, 16 / 49, 16 / 49, 1, 0])
    assert [s.best_threshold(d) for d in IOU_THRESHOLDS] == [0.0, 0.3, 0.3]
    assert set(s.thresholds_for("oracle", iou=0.3)) == {0.0}
    assert max_box_acc_v2(s, "oracle") == pytest.approx(1 / 2)
    assert max(max_box_acc_v2(s, "fixed", t) for t in THRESHOLDS) == pytest.approx(1 / 3)
    assert gt_known_loc(s, "oracle") == pytest.approx(1 / 4)


def _keys_in_fold(fold: int, n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        if fold_of(f"k{i}") == fold:
            out.append(f"k{i}")
        i += 1
    return out


def _ringed(ring: float, core: float) -> np.ndarray:
    """10 x 10 map: 0 outside, ``ring`` on [2, 8)^2, ``core`` on the box [4, 6)^2."""
    cam = np.zeros((10, 10))
    cam[2:8, 2:8] = ring
    cam[4:6, 4:6] = core
    return cam


def test_heldout_thresholds_differ_from_the_oracle():
    """Half 0 holds 3 maps exact at t = 0.3 and 1 at t = 0.7; half 1 holds 1 and 2. Each half is
    scored at the other's best threshold, so held-out (2/7) < fixed 0.7 (3/7) < oracle (4/7)."""
    thresholds = [0.1, 0.3, 0.5, 0.7, 0.9]
    low, high = _ringed(0.2, 0.4), _ringed(0.6, 0.8)  # exact box only at 0.3, only at 0.7
    box = [(0, 4, 4, 6, 6)]  # the ring's box has IoU 4/36 with it
    s = BoxSweeps(thresholds)
    for key, cam in zip(_keys_in_fold(0, 4), (low, low, low, high), strict=True):
        s.add(key, cam[None], [0], box, predicted=0)
    for key, cam in zip(_keys_in_fold(1, 3), (low, high, high), strict=True):
        s.add(key, cam[None], [0], box, predicted=0)
    assert s.ious(s.keys[0])[1][:, 0].tolist() == pytest.approx([4 / 36, 1, 0, 0, 0])
    assert s.ious(s.keys[3])[1][:, 0].tolist() == pytest.approx([4 / 36, 4 / 36, 4 / 36, 1, 0])
    assert s.heldout_thresholds() == {"0": 0.7, "1": 0.3}
    assert s.best_threshold() == 0.3
    assert gt_known_loc(s, "heldout") == pytest.approx(2 / 7)
    assert gt_known_loc(s, "oracle") == pytest.approx(4 / 7)
    assert gt_known_loc(s, "fixed", 0.7) == pytest.approx(3 / 7)
    assert top1_loc(s, "heldout") == pytest.approx(2 / 7)  # every prediction is right
    # at IoU 0.3 and 0.7 the same maps, the same choices: MaxBoxAccV2 equals it too
    assert max_box_acc_v2(s, "heldout") == pytest.approx(2 / 7)
    # all images in one half: nothing to learn from, so that half takes its own best
    one = BoxSweeps(thresholds)
    for key, cam in zip(_keys_in_fold(0, 3), (low, low, high), strict=True):
        one.add(key, cam[None], [0], box)
    assert one.heldout_thresholds() == {"0": 0.3}


def test_multiple_boxes_of_a_class_and_a_class_without_a_box():
    cam = np.zeros((8, 8))
    cam[5:8, 5:8] = 0.9  # matches the second box of class 1
    unboxed = np.full((8, 8), 0.9)
    boxes = [(1, 0, 0, 2, 2), (1, 5, 5, 8, 8)]
    s = BoxSweeps(THRESHOLDS)
    s.add("a", np.stack([cam, unboxed]), [1, 4], boxes, predicted=1)
    cls, ious = s.ious("a")
    assert cls == (1, 4)
    assert ious[:, 0].tolist() == [1.0] * 9 + [0.0]  # 0.9 is not above 0.9
    assert np.isnan(ious[:, 1]).all()
    # only the boxed class counts: one pair, a hit
    assert gt_known_loc(s, "fixed", 0.5) == 1.0
    # a top-1 class that is labelled but has no box is a counted miss
    s.add("b", np.stack([cam, unboxed]), [1, 4], boxes, predicted=4)
    assert top1_loc(s, "fixed", 0.5) == 0.5 and top1_cls(s) == 1.0
    # an image whose labelled classes have no box counts for classification only
    s.add("c", unboxed[None], [4], [], predicted=2)
    assert top1_loc(s, "fixed", 0.5) == 0.5 and top1_cls(s) == pytest.approx(2 / 3)
    assert gt_known_loc(s, "fixed", 0.5) == 1.0
    # pairs, not images, are counted: an image with one hit and one miss counts 1/2
    t = BoxSweeps(THRESHOLDS)
    t.add("d", np.stack([cam, cam]), [1, 2], [*boxes, (2, 0, 0, 2, 2)])
    assert gt_known_loc(t, "fixed", 0.5) == 0.5


def test_bad_inputs_are_refused():
    s = BoxSweeps(THRESHOLDS)
    cam = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="not labelled with"):
        s.add("a", cam, [0], [(3, 0, 0, 2, 2)])
    with pytest.raises(ValueError, match="empty or outside"):
        s.add("a", cam, [0], [(0, 0, 0, 5, 2)])
    with pytest.raises(ValueError, match="empty or outside"):
        s.add("a", cam, [0], [(0, 2, 0, 2, 2)])
    with pytest.raises(ValueError, match="must be"):
        s.add("a", cam, [0, 1], [])
    s.add("a", cam, [0], [(0, 0, 0, 2, 2)])
    with pytest.raises(ValueError, match="counted twice"):
        s.add("a", cam, [0], [])
    with pytest.raises(ValueError, match="not swept"):
        gt_known_loc(s, "fixed", 0.25)
    with pytest.raises(ValueError, match="needs the fixed"):
        gt_known_loc(s, "fixed")
    with pytest.raises(ValueError, match="kind must be one of"):
        gt_known_loc(s, "best")
    with pytest.raises(ValueError, match="metric must be one of"):
        box_metric(s, "corloc")
    with pytest.raises(ValueError, match="regions must be one of"):
        BoxSweeps(THRESHOLDS, regions="biggest")


# ---------------------------------------------------------------- intervals


def test_paired_difference_of_a_set_with_itself_is_exactly_zero():
    s = _sweeps(_images(20, seed=5))
    r = box_paired_difference([s], [s], "max_box_acc_v2", "heldout", n_boot=200)
    assert r.diff == 0 and r.low == 0 and r.high == 0 and r.images == 20


def test_paired_difference_point_and_interval():
    """A = clean maps, B = the same maps with strong noise: the point estimate is the plain
    difference, the interval holds it, the clear gap excludes 0, and swapping mirrors it."""
    good = _images(80, seed=6, noise=0.2)
    rng = np.random.default_rng(0)
    bad = [
        (k, np.clip(s + np.round(rng.random(s.shape) * 12) * 0.05, 0, 1), ids, b, p)
        for k, s, ids, b, p in good
    ]
    a, b = _sweeps(good), _sweeps(bad)
    ref_good, ref_bad = _ref_pairs(good), _ref_pairs(bad)
    for metric in ("gt_known_loc", "max_box_acc_v2"):
        r = box_paired_difference([a], [b], metric, "fixed", fixed=0.3, n_boot=500)
        want = _ref_metric(good, ref_good, metric, "fixed", 0.3) - _ref_metric(
            bad, ref_bad, metric, "fixed", 0.3
        )
        assert r.diff == pytest.approx(want)
        assert r.low <= r.diff <= r.high
        assert r.low > 0 and r.share_below_zero == 0
        s = box_paired_difference([b], [a], metric, "fixed", fixed=0.3, n_boot=500)
        assert s.diff == pytest.approx(-r.diff)
        assert (s.low, s.high) == pytest.approx((-r.high, -r.low))  # same resamples, mirrored
    assert (
        "fixed threshold" in r.line()
        and "oracle" in box_paired_difference([a], [b], "gt_known_loc", "oracle", n_boot=10).line()
    )


def test_paired_difference_over_seeds_averages_the_seeds():
    a1, b1 = _sweeps(_images(30, seed=7)), _sweeps(_images(30, seed=7, noise=0.8))
    a2, b2 = _sweeps(_images(30, seed=7, noise=0.4)), _sweeps(_images(30, seed=7, noise=0.6))
    r = box_paired_difference([a1, a2], [b1, b2], "gt_known_loc", "oracle", n_boot=300)
    one = box_paired_difference([a1], [b1], "gt_known_loc", "oracle", n_boot=10).diff
    two = box_paired_difference([a2], [b2], "gt_known_loc", "oracle", n_boot=10).diff
    assert r.per_seed_diff == pytest.approx([one, two])
    assert r.diff == pytest.approx((one + two) / 2)
    assert r.seeds == 2 and r.low <= r.diff <= r.high


def test_paired_difference_needs_shared_images():
    a = _sweeps(_images(3, seed=8))
    b = _sweeps(_images(3, seed=9))  # other keys
    with pytest.raises(ValueError, match="share 0 scored images"):
        box_paired_difference([a], [b])
    with pytest.raises(ValueError, match="one \\(A, B\\) pair per seed"):
        box_paired_difference([a], [a, a])


def test_single_set_interval_has_the_binomial_width():
    """400 images, one pair each, 200 hits: the bootstrap's 95% interval is about
    ±1.96·sqrt(p(1-p)/n) = ±0.049 around 0.5."""
    box = [(0, 1, 1, 3, 3)]
    hit = np.zeros((1, 4, 4))
    hit[0, 1:3, 1:3] = 1.0
    s = BoxSweeps([0.5])
    for i in range(400):
        s.add(f"i{i}", hit if i % 2 else np.zeros((1, 4, 4)), [0], box, predicted=0)
    r = box_interval(s, "gt_known_loc", "fixed", 0.5, n_boot=2000)
    assert r.value == 0.5 and r.images == 400
    assert r.low < 0.5 < r.high
    assert 0.08 < r.high - r.low < 0.115
    assert abs((r.high - 0.5) - (0.5 - r.low)) < 0.02
    # every image a hit: no spread at all
    full = box_interval(s, "top1_cls", "fixed", 0.5, n_boot=200)
    assert (full.value, full.low, full.high) == (1.0, 1.0, 1.0)
    assert "95% bootstrap interval" in r.line()
