"""Held-out thresholds and paired bootstrap intervals (``mcis_dist.evaluation.heldout``),
checked against plain per-pixel references written without the sweep's bin counting."""

from __future__ import annotations

import numpy as np
import pytest

from mcis_dist.cams.maps import cam_labels
from mcis_dist.evaluation import ConfusionMatrix
from mcis_dist.evaluation.heldout import (
    PerImageSweeps,
    fold_of,
    miou_rows,
    paired_difference,
)

THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
C = 4  # background + 3 classes


def _images(n: int, seed: int, noise: float = 0.0):
    """n random images: (key, scores (L, H, W), class ids, gt) with maps that partly agree with
    the masks (so thresholds matter) and some ignored pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(5, 9, size=2)
        ids = sorted(rng.choice(C - 1, size=int(rng.integers(1, 3)), replace=False).tolist())
        gt = np.zeros((h, w), dtype=np.int64)
        for k in ids:
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            gt[y : y + 3, x : x + 3] = k + 1
        gt[rng.random((h, w)) < 0.05] = 255
        scores = rng.random((len(ids), h, w)) * (0.4 + noise)
        for j, k in enumerate(ids):
            scores[j][gt == k + 1] += rng.uniform(0.1, 0.6)
        out.append((f"img{seed}_{i:03d}", np.clip(scores, 0, 1), ids, gt))
    return out


def _sweeps(images) -> PerImageSweeps:
    s = PerImageSweeps(C, THRESHOLDS)
    for key, scores, ids, gt in images:
        s.add(key, scores, ids, gt)
    return s


def _matrix(images, t: float) -> np.ndarray:
    """Plain reference: label every pixel with ``cam_labels`` at t and count."""
    cm = ConfusionMatrix(C)
    for _, scores, ids, gt in images:
        cm.update(gt, cam_labels(scores, ids, t).astype(np.int64))
    return cm.matrix


def _miou(matrix: np.ndarray) -> float:
    return ConfusionMatrix.from_matrix(matrix).miou()


def test_fold_is_a_fixed_function_of_the_key():
    keys = [f"k{i}" for i in range(400)]
    folds = [fold_of(k) for k in keys]
    assert set(folds) == {0, 1}
    assert 150 < sum(folds) < 250  # about half each
    assert folds == [fold_of(k) for k in keys]  # no state, no seed


def test_heldout_matches_a_brute_force_reference():
    images = _images(40, seed=1)
    sweeps = _sweeps(images)
    folds = np.array([fold_of(k) for k, *_ in images])
    assert 0 < folds.sum() < len(images)
    # reference: per half, the threshold best on the other half (first on ties), by brute force
    total = np.zeros((C, C), dtype=np.int64)
    chosen = {}
    for f in (0, 1):
        other = [im for im, g in zip(images, folds, strict=True) if g != f]
        mine = [im for im, g in zip(images, folds, strict=True) if g == f]
        mious = [_miou(_matrix(other, t)) for t in THRESHOLDS]
        chosen[str(f)] = THRESHOLDS[int(np.argmax(mious))]
        total += _matrix(mine, chosen[str(f)])
    assert sweeps.heldout_thresholds() == chosen
    assert np.array_equal(sweeps.matrix("heldout").matrix, total)
    # the fixed threshold and the oracle against the same reference
    assert np.array_equal(sweeps.matrix("fixed", 0.2).matrix, _matrix(images, 0.2))
    best = THRESHOLDS[int(np.argmax([_miou(_matrix(images, t)) for t in THRESHOLDS]))]
    assert np.array_equal(sweeps.matrix("oracle").matrix, _matrix(images, best))
    # the oracle can only flatter: it is at least the held-out figure
    assert _miou(sweeps.matrix("oracle").matrix) >= _miou(total)


def test_image_matrices_are_each_images_own_counts():
    images = _images(6, seed=2)
    sweeps = _sweeps(images)
    ts = np.array([0.0, 0.6, 0.3, 0.1, 0.5, 0.2])
    mats = sweeps.image_matrices(ts)
    for i, im in enumerate(images):
        assert np.array_equal(mats[i], _matrix([im], ts[i]))


def test_a_key_counts_once_and_unswept_thresholds_are_refused():
    images = _images(2, seed=3)
    sweeps = _sweeps(images)
    with pytest.raises(ValueError, match="counted twice"):
        sweeps.add(*images[0])
    with pytest.raises(ValueError, match="not swept"):
        sweeps.thresholds_for("fixed", 0.25)
    with pytest.raises(ValueError, match="kind must be one of"):
        sweeps.thresholds_for("best")


def test_miou_rows_equals_confusion_matrix_miou():
    rng = np.random.default_rng(4)
    stack = rng.integers(0, 20, size=(7, C, C))
    stack[2, 1, :] = stack[2, :, 1] = 0  # a class absent from gt and prediction
    stack[3] = 0  # nothing counted
    got = miou_rows(stack)
    for m, g in zip(stack, got, strict=True):
        want = ConfusionMatrix.from_matrix(m).miou()
        assert (np.isnan(want) and np.isnan(g)) or g == pytest.approx(want)


def test_paired_difference_of_a_set_with_itself_is_exactly_zero():
    sweeps = _sweeps(_images(20, seed=5))
    r = paired_difference([sweeps], [sweeps], "heldout", n_boot=200)
    assert r.diff == 0 and r.low == 0 and r.high == 0 and r.images == 20


def test_paired_difference_point_and_interval():
    """A = clean maps, B = the same maps with noise: the point estimate is the plain
    difference of pooled mIoUs, the interval contains it, and a clear gap excludes 0."""
    good = _images(60, seed=6)
    rng = np.random.default_rng(0)
    bad = [(k, np.clip(s + rng.random(s.shape) * 0.6, 0, 1), ids, gt) for k, s, ids, gt in good]
    a, b = _sweeps(good), _sweeps(bad)
    r = paired_difference([a], [b], "fixed", fixed=0.3, n_boot=500)
    want = _miou(_matrix(good, 0.3)) - _miou(_matrix(bad, 0.3))
    assert r.diff == pytest.approx(want)
    assert r.low <= r.diff <= r.high
    assert r.low > 0 and r.share_below_zero == 0
    # swapping A and B mirrors the result
    s = paired_difference([b], [a], "fixed", fixed=0.3, n_boot=500)
    assert s.diff == pytest.approx(-r.diff)


def test_paired_difference_over_seeds_averages_the_seeds():
    a1, b1 = _sweeps(_images(30, seed=7)), _sweeps(_images(30, seed=7, noise=0.5))
    a2, b2 = _sweeps(_images(30, seed=7, noise=0.2)), _sweeps(_images(30, seed=7, noise=0.3))
    r = paired_difference([a1, a2], [b1, b2], "oracle", n_boot=300)
    one = paired_difference([a1], [b1], "oracle", n_boot=10).diff
    two = paired_difference([a2], [b2], "oracle", n_boot=10).diff
    assert r.per_seed_diff == pytest.approx([one, two])
    assert r.diff == pytest.approx((one + two) / 2)
    assert r.seeds == 2 and r.low <= r.diff <= r.high


def test_paired_difference_needs_shared_images():
    a = _sweeps(_images(3, seed=8))
    b = _sweeps(_images(3, seed=9))  # other keys
    with pytest.raises(ValueError, match="share 0 scored images"):
        paired_difference([a], [b])
    with pytest.raises(ValueError, match="one \\(A, B\\) pair per seed"):
        paired_difference([a], [a, a])
