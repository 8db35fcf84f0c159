"""Behavioural tests for the built-in synthetic WSSS dataset (mcis_dist.shards.synthetic)."""

from __future__ import annotations

import hashlib
import itertools
import re
import subprocess
import sys

import numpy as np
import pytest

from mcis_dist.shards import synthetic as syn
from mcis_dist.shards.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_SPLITS,
    SyntheticSample,
    SyntheticSpec,
    class_names,
    synthetic_sample,
)

N_STATS = 200


def _digest(sample: SyntheticSample) -> str:
    h = hashlib.sha256()
    for part in (sample.key.encode(), sample.image.tobytes(), sample.mask.tobytes()):
        h.update(part)
    h.update(repr((sample.image.shape, sample.labels)).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def train_samples() -> list[SyntheticSample]:
    spec = SyntheticSpec()
    return [synthetic_sample(spec, "train", i) for i in range(N_STATS)]


def _group(cls: int) -> int:
    return next(g for g, members in enumerate(syn.CONTEXT_GROUPS) if cls in members)


def test_public_constants() -> None:
    assert SYNTHETIC_SPLITS == ("train", "val")
    assert len(SYNTHETIC_CLASSES) >= 8
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in SYNTHETIC_CLASSES)
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    assert len(set(syn._HEAD_RGB)) == len(set(syn._HEAD_PATTERN)) == len(SYNTHETIC_CLASSES)
    assert sorted(c for g in syn.CONTEXT_GROUPS for c in g) == list(range(len(SYNTHETIC_CLASSES)))
    spec = SyntheticSpec()
    assert class_names(spec) == list(SYNTHETIC_CLASSES[: spec.num_classes])
    assert class_names(SyntheticSpec(num_classes=3)) == list(SYNTHETIC_CLASSES[:3])
    assert spec.num_samples("train") == 600 and spec.num_samples("val") == 150


def test_deterministic_in_process_and_order_independent() -> None:
    spec = SyntheticSpec()
    first = [_digest(synthetic_sample(spec, "train", i)) for i in (7, 3, 11)]
    for i in range(12, 20):  # unrelated calls in between must not matter
        synthetic_sample(spec, "val", i)
    again = [_digest(synthetic_sample(SyntheticSpec(), "train", i)) for i in (11, 3, 7)]
    assert first == again[::-1]


def test_deterministic_across_processes() -> None:
    code = (
        "import hashlib\n"
        "from mcis_dist.shards.synthetic import SyntheticSpec, synthetic_sample\n"
        "spec = SyntheticSpec(seed=3)\n"
        "for split, i in (('train', 0), ('train', 42), ('val', 5)):\n"
        "    s = synthetic_sample(spec, split, i)\n"
        "    h = hashlib.sha256()\n"
        "    for part in (s.key.encode(), s.image.tobytes(), s.mask.tobytes()):\n"
        "        h.update(part)\n"
        "    h.update(repr((s.image.shape, s.labels)).encode())\n"
        "    print(h.hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    spec = SyntheticSpec(seed=3)
    local = [
        _digest(synthetic_sample(spec, s, i)) for s, i in (("train", 0), ("train", 42), ("val", 5))
    ]
    assert out == local


def test_splits_and_seeds_differ() -> None:
    spec = SyntheticSpec()
    train = {_digest(synthetic_sample(spec, "train", i)) for i in range(10)}
    val = {_digest(synthetic_sample(spec, "val", i)) for i in range(10)}
    other_seed = {_digest(synthetic_sample(SyntheticSpec(seed=1), "train", i)) for i in range(10)}
    assert len(train) == len(val) == len(other_seed) == 10
    assert not train & val and not train & other_seed
    a, b = synthetic_sample(spec, "train", 0), synthetic_sample(spec, "val", 0)
    assert a.key != b.key and a.image.tobytes() != b.image.tobytes()


@pytest.mark.parametrize("split", SYNTHETIC_SPLITS)
def test_sample_contract(split: str) -> None:
    spec = SyntheticSpec()
    keys = set()
    for i in range(60):
        s = synthetic_sample(spec, split, i)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", s.key) and s.key not in keys
        keys.add(s.key)
        h, w = s.mask.shape
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
        assert s.mask.dtype == np.uint8
        assert spec.min_size <= h <= spec.max_size and spec.min_size <= w <= spec.max_size
        values = set(np.unique(s.mask).tolist())
        assert values <= {0, 255, *range(1, spec.num_classes + 1)}
        assert s.labels == sorted(v - 1 for v in values - {0, 255})
        assert 1 <= len(s.labels) <= spec.max_objects
        for k in s.labels:  # every label has a real visible region
            assert (s.mask == k + 1).sum() >= 30, (s.key, k)
        assert 255 in values  # object outlines are marked ignore
        assert (s.mask == 0).mean() > 0.2  # clutter background remains


def test_ignore_border_marks_only_object_outlines() -> None:
    for i in range(10):
        plain = synthetic_sample(SyntheticSpec(ignore_border=0), "train", i)
        thin = synthetic_sample(SyntheticSpec(ignore_border=1), "train", i)
        thick = synthetic_sample(SyntheticSpec(ignore_border=2), "train", i)
        assert 255 not in plain.mask
        assert np.array_equal(plain.image, thin.image)  # the option does not change the picture
        keep = thin.mask != 255
        assert np.array_equal(thin.mask[keep], plain.mask[keep])
        h, w = plain.mask.shape
        padded = np.pad(plain.mask, 1, mode="edge")
        shifted = [
            padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        near_change = np.any([sh != plain.mask for sh in shifted], axis=0)  # (H, W)
        near_object = np.any([sh != 0 for sh in shifted], axis=0)  # (H, W)
        # every class change is marked; marks (incl. between touching same-class objects) hug objects
        assert not (near_change & keep).any()
        assert near_object[~keep].all()
        assert (thick.mask == 255).mean() > (thin.mask == 255).mean() > 0


def test_spec_variants() -> None:
    small = SyntheticSpec(min_size=64, max_size=64, num_classes=3, max_objects=1, num_train=5)
    for i in range(5):
        s = synthetic_sample(small, "train", i)
        assert s.image.shape == (64, 64, 3)
        assert len(s.labels) == 1 and s.labels[0] < 3
    assert small.num_samples("train") == 5
    # smallest allowed images still always get 1..max_objects visible labels
    for b in (0, 1, 2):
        tiny = SyntheticSpec(min_size=32 * max(1, b), max_size=32 * max(1, b), ignore_border=b)
        for i in range(40):
            s = synthetic_sample(tiny, "val", i)
            assert 1 <= len(s.labels) <= tiny.max_objects, (b, s.key)
            assert all((s.mask == k + 1).sum() >= 20 for k in s.labels), (b, s.key)


def test_dataset_statistics(train_samples: list[SyntheticSample]) -> None:
    num_classes = SyntheticSpec().num_classes
    label_sets = [set(s.labels) for s in train_samples]
    present = np.array([[k in ls for k in range(num_classes)] for ls in label_sets])  # (N, C)
    assert present.any(axis=0).all(), "every class must appear"
    assert np.mean([len(ls) >= 2 for ls in label_sets]) >= 0.30
    assert any(len(ls) == SyntheticSpec().max_objects for ls in label_sets)
    # Context groups: same-group classes co-occur in one image far more than independence predicts.
    marg = present.mean(axis=0)  # (C,)
    joint = present.T.astype(float) @ present / len(present)  # (C, C)
    pairs = list(itertools.combinations(range(num_classes), 2))
    same = [(j, k) for j, k in pairs if _group(j) == _group(k)]
    cross = [(j, k) for j, k in pairs if _group(j) != _group(k)]
    same_ratio = sum(joint[j, k] for j, k in same) / sum(marg[j] * marg[k] for j, k in same)
    cross_ratio = sum(joint[j, k] for j, k in cross) / sum(marg[j] * marg[k] for j, k in cross)
    assert same_ratio > 1.5 and cross_ratio < 1.0
    # Image pairs sharing a class (what the cross-image pair sampler needs) are common.
    shared = np.mean([bool(a & b) for a, b in itertools.combinations(label_sets, 2)])
    assert shared >= 0.25


def test_discriminative_head_and_shared_body(train_samples: list[SyntheticSample]) -> None:
    body_frac, head_frac = [], []
    for s in train_samples:
        for k in s.labels:
            body = np.array(syn._BODY_RGB[_group(k)], float)
            head = np.array(syn._HEAD_RGB[k], float)
            palette = np.stack([body, body * syn._BODY_DARK, head, syn._HEAD_DARK])  # (4, 3)
            px = s.image[s.mask == k + 1].astype(float)  # (P, 3)
            dist = ((px[:, None, :] - palette[None]) ** 2).sum(-1)  # (P, 4)
            assert np.mean(np.sqrt(dist.min(1)) > 40) < 0.02  # object pixels are head or body
            nearest = dist.argmin(1)
            body_frac.append(np.mean(nearest < 2))
            head_frac.append(np.mean(nearest >= 2))
    body_frac, head_frac = np.array(body_frac), np.array(head_frac)
    assert 0.55 <= np.median(body_frac) <= 0.85  # the shared body is most of each object
    assert np.mean(body_frac >= 0.5) >= 0.9
    assert np.mean(head_frac >= 0.1) >= 0.9  # ...yet the discriminative head stays visible
    # Head colours are object-only: background clutter almost never looks like a head.
    heads = np.array(syn._HEAD_RGB, float)  # (C, 3)
    bg = np.concatenate([s.image[s.mask == 0] for s in train_samples[:50]]).astype(float)
    near_head = (((bg[:, None, :] - heads[None]) ** 2).sum(-1) < 40**2).any(1)
    assert near_head.mean() < 0.01


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_classes": 0}, "num_classes=0"),
        ({"num_classes": len(SYNTHETIC_CLASSES) + 1}, f"num_classes={len(SYNTHETIC_CLASSES) + 1}"),
        ({"min_size": 150, "max_size": 140}, "min_size=150"),
        ({"min_size": 16, "max_size": 64}, "min_size=16"),
        ({"min_size": 64, "ignore_border": 3}, "ignore_border=3"),
        ({"ignore_border": -1}, "ignore_border=-1"),
        ({"num_train": -5}, "num_train=-5"),
        ({"max_objects": 0}, "max_objects=0"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_invalid_spec(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        SyntheticSpec(**kwargs)


def test_invalid_split_and_index() -> None:
    spec = SyntheticSpec(num_train=4, num_val=2)
    with pytest.raises(ValueError, match="'test'.*train"):
        synthetic_sample(spec, "test", 0)
    with pytest.raises(ValueError, match="'bogus'"):
        spec.num_samples("bogus")
    with pytest.raises(ValueError, match="index=4"):
        synthetic_sample(spec, "train", 4)
    with pytest.raises(ValueError, match="index=-1"):
        synthetic_sample(spec, "val", -1)
    with pytest.raises(ValueError, match="index=2.*0..1"):
        synthetic_sample(spec, "val", 2)
