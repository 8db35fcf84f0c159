"""Localization maps (paper §3.2): each mode of ``CamEngine`` against direct calls of the model's
functions on the same inputs (a plain, slow composition of scales, flips and related images),
the feature cache, the single-round fallback, and the evaluation's pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcis_dist.cams.infer import CamEngine, CamSettings, FeatureCache, resize_long
from mcis_dist.cams.maps import cam_labels, upsample_cams
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.transforms import decode_rgb, normalize
from mcis_dist.formats.cams import decode_cam, encode_cam
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import (
    MCISClassifier,
    coattentive_cam,
    contribution_map,
    normalize_cam,
    single_round_cam,
)

from conftest import build_synthetic

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("cams") / "shards"
    build_synthetic(str(out), num_train=16, num_val=2, per_shard=8)
    manifest, storage = open_manifest(str(out / "train"))
    return manifest, storage


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = MCISClassifier(build_backbone("resnet38_tiny"), num_classes=8).eval()
    with torch.no_grad():  # biased phi_co so maps are not all zero after ReLU
        net.phi_coatt.weight.normal_(0, 0.5)
    return net


def sample(split, g):
    manifest, storage = split
    key, labels, data = RelatedSampler(manifest, storage).read_image(g)
    return key, labels, decode_rgb(data)


def prep(rgb):
    return normalize(rgb.unsqueeze(0), MEAN, STD)


def scaled(x, s):
    h, w = x.shape[-2:]
    return (
        x
        if s == 1
        else F.interpolate(
            x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False
        )
    )


def minmax_by_hand(total):
    """(L, h, w): each map's (m - min) / (max - min), element by element; constant -> 0."""
    out = torch.zeros_like(total)
    for i in range(total.shape[0]):
        low, high = float(total[i].min()), float(total[i].max())
        if high > low:
            for y in range(total.shape[1]):
                for x in range(total.shape[2]):
                    out[i, y, x] = (float(total[i, y, x]) - low) / (high - low)
    return out


def assert_minmax_of(got, total):
    """``got`` is the min-max normalisation of ``total`` (L, h, w): compared on ``total``'s
    scale (got · (max - min) + min), since a nearly constant map makes min-max magnify float
    rounding; and ``got`` spans [0, 1] where ``total`` is not constant."""
    low = total.amin(dim=(1, 2), keepdim=True)
    span = total.amax(dim=(1, 2), keepdim=True) - low
    torch.testing.assert_close(got * span + low, total, atol=1e-6, rtol=1e-5)
    want = minmax_by_hand(total)
    wide = span.flatten() > 1e-3  # well conditioned: compare the normalised values too
    torch.testing.assert_close(got[wide], want[wide], atol=1e-4, rtol=1e-4)
    assert torch.allclose(got.amax(dim=(1, 2))[span.flatten() > 0], torch.tensor(1.0), atol=1e-5)


def compose(per_view, x, scales, flip, out_size, n_maps, minmax=False):
    """Σ over scales × flips of up(ReLU(map)), then per-map max normalisation; ``per_view(x)``
    returns the raw (L, h, w) maps of one view, computed alone (no batching). ``minmax``: the
    raw Σ of up(map), without the ReLU or a normalisation (see ``assert_minmax_of``)."""
    total = torch.zeros(n_maps, *out_size)
    for s in scales:
        xs = scaled(x, s)
        views = [per_view(xs)] + ([per_view(xs.flip(-1)).flip(-1)] if flip else [])
        for v in views:
            total += F.interpolate(
                (v if minmax else F.relu(v))[None],
                size=out_size,
                mode="bilinear",
                align_corners=False,
            )[0]
    return total if minmax else normalize_cam(total)


def assert_engine_maps(got, per_view, rgb, settings):
    """The engine's maps ``got`` equal ``compose`` of ``per_view`` over the settings' scales ×
    flip, normalised as ``settings.normalize`` says."""
    minmax = settings.normalize == "minmax"
    want = compose(
        per_view, prep(rgb), settings.scales, settings.flip, out_size_of(rgb), len(got), minmax
    )
    if minmax:
        assert_minmax_of(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def out_size_of(rgb, stride=8):
    return (math.ceil(rgb.shape[1] / stride), math.ceil(rgb.shape[2] / stride))


@pytest.mark.parametrize("normalize", ["relu_max", "minmax"])
def test_single_round_maps_equal_direct_calls(split, model, normalize):
    key, labels, rgb = sample(split, 3)
    settings = CamSettings(mode="single", scales=(0.5, 1.0, 1.5), flip=True, normalize=normalize)
    got, fell = CamEngine(model, settings).cams(rgb, labels, key)
    assert fell == [] and got.shape == (len(labels), *out_size_of(rgb))
    assert_engine_maps(got, lambda v: single_round_cam(model, v)[0, labels], rgb, settings)
    if normalize == "minmax":  # every map spans [0, 1], whatever the sign of its evidence
        assert torch.allclose(got.amin(dim=(1, 2)), torch.zeros(len(labels)), atol=1e-6)
    assert float(got.amax()) == pytest.approx(1.0, abs=1e-3)


def related_images(split, g_list, size):
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage)
    return [resize_long(prep(decode_rgb(sampler.read_image(g)[2])), size) for g in g_list]


def per_class_mean(labels, rel, one):
    """(L, h, w): for each class k, the mean over its related images r of one(r, k) (h, w)."""
    return torch.stack([torch.stack([one(r, k) for r in rel[k]]).mean(0) for k in labels])


@pytest.mark.parametrize(
    ("cache_mb", "normalize"), [(0, "relu_max"), (64, "relu_max"), (0, "minmax")]
)
def test_coattentive_maps_equal_direct_calls(split, model, cache_mb, normalize):
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=5)
    key, labels, rgb = sample(split, 6)
    settings = CamSettings(
        mode="coattentive",
        related=2,
        scales=(1.0, 0.75),
        flip=True,
        related_size=96,
        normalize=normalize,
    )
    engine = CamEngine(model, settings, sampler, cache_bytes=cache_mb * 2**20)
    got, fell = engine.cams(rgb, labels, key)
    rel = {k: related_images(split, sampler.draw(k, 2, key), 96) for k in labels}

    def per_view(v):  # L_k = mean over r of coattentive_cam(image, r, k), one r at a time
        return per_class_mean(labels, rel, lambda r, k: coattentive_cam(model, v, r, k))

    assert fell == []
    assert_engine_maps(got, per_view, rgb, settings)
    first_hits = engine.cache.hits  # an image related under two classes hits already
    again, _ = engine.cams(rgb, labels, key)  # same draws: from the cache when there is one
    torch.testing.assert_close(again, got)
    draws = sum(len(r) for r in rel.values())
    assert engine.cache.hits - first_hits == (draws if cache_mb else 0)


def test_wrong_class_control_reads_images_sharing_no_class(split, model):
    """related_classes="other": the same co-attentive maps, but every related image holds none
    of the query's classes (drawn per class with draw_unrelated)."""
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=5)
    key, labels, rgb = sample(split, 6)
    settings = CamSettings(
        mode="coattentive",
        related=2,
        scales=(1.0,),
        flip=False,
        related_size=96,
        related_classes="other",
    )
    got, fell = CamEngine(model, settings, sampler).cams(rgb, labels, key)
    drawn = {k: sampler.draw_unrelated(labels, 2, key, salt=k) for k in labels}
    for g_list in drawn.values():
        assert g_list and all(not set(sampler.read_image(g)[1]) & set(labels) for g in g_list)
    rel = {k: related_images(split, drawn[k], 96) for k in labels}

    def per_view(v):
        return per_class_mean(labels, rel, lambda r, k: coattentive_cam(model, v, r, k))

    want = compose(per_view, prep(rgb), (1.0,), False, out_size_of(rgb), len(labels))
    assert fell == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    same, _ = CamEngine(
        model, CamSettings(**{**settings.__dict__, "related_classes": "same"}), sampler
    ).cams(rgb, labels, key)
    assert not torch.allclose(same, got)  # other images: other maps


@pytest.mark.parametrize("readout, layer", [("object", "phi"), ("contribution", "phi")])
def test_read_out_settings_reach_the_map_functions(split, model, readout, layer):
    """cams.readout / cams.readout_layer: the engine's maps equal contribution_map called
    with the same options on the same related images."""
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=5)
    key, labels, rgb = sample(split, 6)
    settings = CamSettings(
        mode="coattentive",
        related=2,
        scales=(1.0,),
        flip=False,
        related_size=96,
        readout=readout,
        readout_layer=layer,
    )
    got, _ = CamEngine(model, settings, sampler).cams(rgb, labels, key)
    rel = {k: related_images(split, sampler.draw(k, 2, key), 96) for k in labels}

    def per_view(v):
        f, obj = model.backbone(v), readout == "object"
        return per_class_mean(
            labels,
            rel,
            lambda r, k: contribution_map(
                model, f, model.backbone(r), k, layer=layer, from_object=obj
            )[0],
        )

    want = compose(per_view, prep(rgb), (1.0,), False, out_size_of(rgb), len(labels))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def contrastive_reference(model, v, others, k):
    """Eq. 6-8 written out: mask the query's features by 1 - sigmoid(W_B F^{q∩o}), phi_co[k]."""
    fq = model.backbone(v)
    maps = []
    for o in others:
        fo = model.backbone(o)
        q_coatt, _ = model.coattentive_features(fq, fo)
        gate = torch.sigmoid(model.w_b(q_coatt))
        maps.append(model.phi_co(fq * (1 - gate))[0, k])
    return torch.stack(maps)


def test_contrastive_and_self_pair_options_equal_direct_calls(split, model):
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=1)
    key, labels, rgb = sample(split, 2)
    settings = CamSettings(
        mode="coattentive",
        related=2,
        scales=(1.0,),
        flip=False,
        related_size=80,
        contrastive=True,
        self_pairs=True,
    )
    got, _ = CamEngine(model, settings, sampler).cams(rgb, labels, key)
    x = prep(rgb)
    own = [x.flip(-1), scaled(x, 0.75), scaled(x, 2.0)]

    def per_view(v):
        out = []
        for k in labels:
            pos = related_images(split, sampler.draw(k, 2, key), 80) + own
            neg = related_images(split, sampler.draw_without(k, 2, key), 80)
            assert all(k not in sampler.read_image(g)[1] for g in sampler.draw_without(k, 2, key))
            maps = [coattentive_cam(model, v, r, k) for r in pos]
            maps += list(contrastive_reference(model, v, neg, k))
            out.append(torch.stack(maps).mean(0))
        return torch.stack(out)

    want = compose(per_view, x, (1.0,), False, out_size_of(rgb), len(labels))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_class_no_other_image_holds_falls_back_to_single_round(split, model):
    manifest, storage = split
    key, labels, rgb = sample(split, 0)
    k_alone = labels[0]
    lonely = dict(manifest)  # only the query holds k_alone
    g0 = RelatedSampler(manifest, storage).global_index(key)
    lonely["class_index"] = [
        ([g0] if k == k_alone else members) for k, members in enumerate(manifest["class_index"])
    ]
    sampler = RelatedSampler(lonely, storage)
    settings = CamSettings(
        mode="coattentive", related=1, scales=(1.0,), flip=False, related_size=64
    )
    engine = CamEngine(model, settings, sampler)
    got, fell = engine.cams(rgb, labels, key)
    assert fell == [k_alone]
    assert engine.counts["fallback_images"] == 1 and engine.counts["fallback_classes"] == 1
    single, _ = CamEngine(model, CamSettings(mode="single", scales=(1.0,), flip=False)).cams(
        rgb, labels, key
    )
    torch.testing.assert_close(got[0], single[0], atol=1e-5, rtol=1e-4)


def test_related_pool_limits_draws_to_a_fixed_per_class_set(split):
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=0, pool=2)
    k = max(range(len(manifest["class_index"])), key=lambda c: len(manifest["class_index"][c]))
    seen = {g for q in manifest["shards"][0]["keys"] for g in sampler.draw(k, 3, q)}
    assert len(seen) <= 2 + 1  # the pool, or one more when the query is in it
    assert seen <= set(manifest["class_index"][k])


def test_feature_cache_is_bounded_lru():
    cache = FeatureCache(max_bytes=3 * 4 * 10)  # three float32 tensors of 10
    for i in range(4):
        cache.put(i, torch.zeros(10))
    assert cache.get(0) is None and cache.get(3) is not None
    cache.get(1)
    cache.put(4, torch.zeros(10))  # evicts 2, the least recently used
    assert cache.get(2) is None and cache.get(1) is not None
    cache.put(5, torch.zeros(100))  # larger than the whole cache: not kept
    assert cache.get(5) is None
    assert cache.stats()["entries"] == 3


def test_cam_encoding_round_trips_in_float16():
    maps = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    back = decode_cam(encode_cam(maps))
    assert back.dtype == np.float16 and back.shape == (3, 5, 7)
    np.testing.assert_allclose(back, maps, atol=1e-3)


def test_upsampled_maps_cover_the_image_grid_and_labels_follow_the_threshold():
    maps = np.zeros((2, 3, 4), dtype=np.float32)  # stride 8 over a 20 x 30 image
    maps[0, 0, 0], maps[1, 2, 3] = 1.0, 0.6
    up = upsample_cams(maps, 8, (20, 30))
    assert up.shape == (2, 20, 30)
    assert up[0, 2, 2] > 0.9 and up[1, 19, 29] > 0.5  # the cells' centres keep their values
    labels = cam_labels(up, [4, 1], threshold=0.5)
    assert labels[2, 2] == 5 and labels[19, 29] == 2 and labels[10, 15] == 0
    assert (cam_labels(up, [4, 1], threshold=1.0) == 0).all()  # ties go to the background
    assert cam_labels(np.zeros((0, 4, 4)), [], 0.2).shape == (4, 4)
