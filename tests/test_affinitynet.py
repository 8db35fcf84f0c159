"""AffinityNet (psa): affinities, pair targets and loss against slow dense references,
the model's forward/NaN/backward on real backbones, parameter groups and classifier weights."""

from __future__ import annotations

import math

import pytest
import torch

from mcis_dist.affinity.loss import affinity_loss, affinity_targets, pair_offsets
from mcis_dist.models.affinitynet import (
    AffinityNet,
    choose_taps,
    match_size,
    pair_affinities,
    shift_map,
)
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier

torch.set_num_threads(1)

# the training set at radius 3 plus offsets pointing back/left and one never inside a 5x4 grid
OFFSETS = pair_offsets(3) + [(-1, -2), (2, -3), (0, -7)]


# ---- offsets and shifting ---------------------------------------------------------------
@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8])
def test_pair_offsets_cover_each_unordered_pair_once(radius):
    offs = pair_offsets(radius)
    disc = {
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if 0 < dy * dy + dx * dx < radius * radius
    }
    assert len(offs) == len(set(offs))
    assert set(offs) | {(-dy, -dx) for dy, dx in offs} == disc
    assert not set(offs) & {(-dy, -dx) for dy, dx in offs}
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in offs)


def test_pair_offsets_radius5_is_psa_34():
    assert len(pair_offsets(5)) == 34
    with pytest.raises(ValueError, match="radius"):
        pair_offsets(0)


@pytest.mark.parametrize("dy,dx", [(0, 0), (1, 2), (-2, 1), (3, -3), (0, 9)])
def test_shift_map_matches_loop(dy, dx):
    x = torch.arange(2 * 4 * 5).reshape(2, 4, 5)
    out = shift_map(x, dy, dx, fill=-1)
    for b in range(2):
        for y in range(4):
            for xx in range(5):
                inside = 0 <= y + dy < 4 and 0 <= xx + dx < 5
                want = x[b, y + dy, xx + dx] if inside else -1
                assert out[b, y, xx] == want


# ---- affinities -------------------------------------------------------------------------
def _dense_affinities(feats, offsets):
    """Every pair one at a time: a_ij = exp(-mean_c |f_i - f_j|), 0 outside the grid."""
    b, _, h, w = feats.shape
    rows = []
    for n in range(b):
        per_offset = []
        for dy, dx in offsets:
            grid = []
            for y in range(h):
                for x in range(w):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        d = (feats[n, :, y, x] - feats[n, :, y + dy, x + dx]).abs().mean()
                        grid.append(torch.exp(-d))
                    else:
                        grid.append(feats.new_zeros(()))
            per_offset.append(torch.stack(grid).reshape(h, w))
        rows.append(torch.stack(per_offset))
    return torch.stack(rows)  # (B, O, h, w)


def test_affinities_values_and_gradients_match_dense_loop():
    torch.manual_seed(0)
    feats = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.rand(2, len(OFFSETS), 5, 4, dtype=torch.float64)

    aff, valid = AffinityNet.affinities(feats, OFFSETS)
    (grad,) = torch.autograd.grad((aff * upstream).sum(), feats)
    ref = _dense_affinities(feats, OFFSETS)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), feats)

    assert aff.shape == (2, len(OFFSETS), 5, 4) and valid.shape == (len(OFFSETS), 5, 4)
    torch.testing.assert_close(aff, ref)
    torch.testing.assert_close(grad, ref_grad)
    for o, (dy, dx) in enumerate(OFFSETS):
        for y in range(5):
            for x in range(4):
                assert bool(valid[o, y, x]) == (0 <= y + dy < 5 and 0 <= x + dx < 4)
    assert not valid[-1].any() and (aff[:, -1] == 0).all()  # (0, -7): never inside
    assert ((aff > 0) == valid).all()


def test_affinities_gradcheck():
    torch.manual_seed(1)
    feats = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: pair_affinities(f, OFFSETS)[0], (feats,))


# ---- targets and loss -------------------------------------------------------------------
def _random_labels(seed, shape=(2, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([0, 0, 1, 2, 3, 255], dtype=torch.uint8)
    return choices[torch.randint(len(choices), shape, generator=g)]


def _pairs(labels, offsets):
    """Plain double loop: ``(b, o, y, x, label_i, label_j)`` for every pair inside the grid."""
    b, h, w = labels.shape
    for n in range(b):
        for o, (dy, dx) in enumerate(offsets):
            for y in range(h):
                for x in range(w):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        yield n, o, y, x, int(labels[n, y, x]), int(labels[n, y + dy, x + dx])


def test_targets_match_double_loop():
    labels = _random_labels(0)
    bg_pos, fg_pos, neg = affinity_targets(labels, OFFSETS)
    want = {k: torch.zeros(bg_pos.shape, dtype=torch.bool) for k in ("bg", "fg", "neg")}
    for n, o, y, x, a, b in _pairs(labels, OFFSETS):
        if a == 255 or b == 255:
            continue
        kind = "neg" if a != b else ("bg" if a == 0 else "fg")
        want[kind][n, o, y, x] = True
    assert bg_pos.shape == (2, len(OFFSETS), 5, 6)
    assert torch.equal(bg_pos, want["bg"])
    assert torch.equal(fg_pos, want["fg"])
    assert torch.equal(neg, want["neg"])
    assert want["bg"].any() and want["fg"].any() and want["neg"].any()


def _reference_loss(aff, labels, offsets, eps=1e-5):
    """psa's loss written out pair by pair."""
    terms = {"bg": [], "fg": [], "neg": []}
    for n, o, y, x, a, b in _pairs(labels, offsets):
        if a == 255 or b == 255:
            continue
        v = aff[n, o, y, x]
        if a == b:
            terms["bg" if a == 0 else "fg"].append(-torch.log(v.clamp_min(eps)))
        else:
            terms["neg"].append(-torch.log((1 - v).clamp_min(eps)))
    mean = {k: torch.stack(v).mean() if v else aff.sum() * 0 for k, v in terms.items()}
    return mean["bg"] / 4 + mean["fg"] / 4 + mean["neg"] / 2, mean


def test_loss_values_and_gradients_match_reference():
    torch.manual_seed(2)
    labels = _random_labels(3)
    aff = torch.rand(2, len(OFFSETS), 5, 6, dtype=torch.float64)
    aff[0, 0, 0, 0], aff[0, 1, 0, 0] = 0.0, 1.0  # exercise the eps clamp
    aff.requires_grad_(True)

    total, parts = affinity_loss(aff, labels, OFFSETS)
    (grad,) = torch.autograd.grad(total, aff)
    ref_total, ref_parts = _reference_loss(aff, labels, OFFSETS)
    (ref_grad,) = torch.autograd.grad(ref_total, aff)

    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(grad, ref_grad)
    for mine, theirs in (("bg_pos", "bg"), ("fg_pos", "fg"), ("neg", "neg")):
        torch.testing.assert_close(parts[mine], ref_parts[theirs].detach())
    bg_pos, fg_pos, neg = affinity_targets(labels, OFFSETS)
    assert int(parts["n_bg_pos"]) == int(bg_pos.sum()) > 0
    assert int(parts["n_fg_pos"]) == int(fg_pos.sum()) > 0
    assert int(parts["n_neg"]) == int(neg.sum()) > 0
    assert torch.isfinite(total)


def test_loss_gradcheck():
    torch.manual_seed(4)
    labels = _random_labels(5, shape=(1, 3, 4))
    aff = (0.05 + 0.9 * torch.rand(1, len(OFFSETS), 3, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: affinity_loss(a, labels, OFFSETS)[0], (aff,))


@pytest.mark.parametrize(
    "fill,zero_terms",
    [(255, {"bg_pos", "fg_pos", "neg"}), (0, {"fg_pos", "neg"}), (2, {"bg_pos", "neg"})],
)
def test_terms_without_pairs_are_zero_not_nan(fill, zero_terms):
    labels = torch.full((2, 4, 4), fill, dtype=torch.uint8)
    aff = torch.rand(2, len(OFFSETS), 4, 4, requires_grad=True)
    total, parts = affinity_loss(aff, labels, OFFSETS)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(aff.grad).all()
    for k in zero_terms:
        assert parts[k] == 0 and parts[f"n_{k}"] == 0
    if fill == 255:
        assert total == 0 and (aff.grad == 0).all()


def test_loss_rejects_mismatched_shapes():
    labels = torch.zeros(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="O=3"):
        affinity_loss(torch.rand(2, 5, 4, 4), labels, OFFSETS[:3])
    with pytest.raises(ValueError, match="grid"):
        affinity_loss(torch.rand(2, 3, 4, 5), labels, OFFSETS[:3])


# ---- the model --------------------------------------------------------------------------
def test_choose_taps():
    assert choose_taps({"conv4": 512, "conv5": 1024, "conv6": 4096, "out": 4096}) == [
        "conv4",
        "conv5",
        "conv6",
    ]
    assert choose_taps({"conv4": 512, "conv5": 512, "out": 512}) == ["conv4", "conv5", "out"]
    taps = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "out": 512}
    assert choose_taps(taps) == ["layer2", "layer3", "layer4"]
    assert choose_taps({"out": 7}) == ["out"]


def test_match_size_crops_or_resizes():
    x = torch.randn(1, 2, 9, 7)
    assert torch.equal(match_size(x, (8, 6)), x[..., :8, :6])
    assert match_size(x, (9, 7)) is x
    assert match_size(x, (12, 10)).shape == (1, 2, 12, 10)
    assert match_size(torch.randn(1, 2, 16, 12), (8, 6)).shape == (1, 2, 8, 6)


MODELS = {
    "resnet38_tiny": lambda: AffinityNet(build_backbone("resnet38_tiny"), width=1 / 16),
    "resnet38_tiny_psa_widths": lambda: AffinityNet(
        build_backbone("resnet38_tiny"), head_channels=(64, 128, 256)
    ),
    "vgg16": lambda: AffinityNet(build_backbone("vgg16")),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("size", [(64, 48), (60, 44)])
def test_forward_nan_backward(name, size):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x = torch.randn(2, 3, *size)
    feats = model(x)
    h, w = math.ceil(size[0] / 8), math.ceil(size[1] / 8)
    assert feats.shape == (2, model.out_channels, h, w)
    assert torch.isfinite(feats).all()
    offsets = pair_offsets(5)
    aff, valid = model.affinities(feats, offsets)
    assert aff.shape == (2, len(offsets), h, w) and valid.shape == (len(offsets), h, w)
    assert ((aff >= 0) & (aff <= 1)).all()
    labels = _random_labels(1, shape=(2, h, w))
    loss, _ = affinity_loss(aff, labels, offsets)
    loss.backward()
    assert torch.isfinite(loss)
    for group, params in model.param_groups().items():
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all(), group
    assert all(p.grad.abs().sum() > 0 for p in model.head_parameters())
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training and m.weight.grad is None for m in bns)  # frozen BN unchanged


def test_head_widths():
    tiny = MODELS["resnet38_tiny"]()
    assert model_widths(tiny) == [(32, 4), (64, 8), (256, 16)] and tiny.out_channels == 28
    psa = MODELS["resnet38_tiny_psa_widths"]()
    assert model_widths(psa) == [(32, 64), (64, 128), (256, 256)] and psa.out_channels == 448
    vgg = MODELS["vgg16"]()
    assert vgg.taps == ["conv4", "conv5", "out"]
    assert model_widths(vgg) == [(512, 64), (512, 128), (512, 256)] and vgg.out_channels == 448
    with pytest.raises(ValueError, match="one positive width per tap"):
        AffinityNet(build_backbone("resnet38_tiny"), head_channels=(8, 8))


def model_widths(model):
    return [(c.in_channels, c.out_channels) for c in model.tap_convs]


def test_param_groups_partition_and_backbone_origin():
    for from_cls in (True, False):
        model = AffinityNet(build_backbone("vgg16"), backbone_from_classifier=from_cls)
        groups = model.param_groups()
        ids = [id(p) for ps in groups.values() for p in ps]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert sorted(ids) == sorted(id(p) for p in trainable)
        new = {id(p) for p in groups["new_weight"] + groups["new_bias"]}
        head = {id(p) for p in model.head_parameters()}
        extra = {id(p) for p in model.backbone.extra.parameters()}
        assert new == (head if from_cls else head | extra)


def _classifier(**backbone_kwargs):
    return MCISClassifier(build_backbone("resnet38_tiny", **backbone_kwargs), num_classes=3)


def test_load_backbone_from_classifier():
    torch.manual_seed(0)
    state = _classifier().state_dict()
    for wrapped in (state, {f"module.{k}": v for k, v in state.items()}, {"model": state}):
        torch.manual_seed(1)
        model = MODELS["resnet38_tiny"]()
        head_before = [p.clone() for p in model.head_parameters()]
        assert not torch.equal(model.backbone.conv1a.weight, state["backbone.conv1a.weight"])
        model.load_backbone_from_classifier(wrapped)
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, state[f"backbone.{k}"]), k
        assert all(
            torch.equal(a, b) for a, b in zip(head_before, model.head_parameters(), strict=True)
        )


def test_load_backbone_from_classifier_errors():
    model = MODELS["resnet38_tiny"]()
    state = _classifier().state_dict()
    with pytest.raises(ValueError, match="no backbone"):
        model.load_backbone_from_classifier({"phi.weight": state["phi.weight"]})
    partial = {k: v for k, v in state.items() if k != "backbone.b6.conv_branch2a.weight"}
    with pytest.raises(ValueError, match=r"missing: b6\.conv_branch2a\.weight"):
        model.load_backbone_from_classifier(partial)
    wider = _classifier(width=1 / 8).state_dict()
    with pytest.raises(ValueError, match=r"shape: b2\.bn_branch2a\.bias \(8,\) vs \(4,\)"):
        model.load_backbone_from_classifier(wider)
    extra = dict(state, **{"backbone.b9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected: b9\.weight"):
        model.load_backbone_from_classifier(extra)


def test_torchvision_backbone_taps_are_probed():
    """Backbones without ``feature_channels`` get their tap widths from a meta-device pass."""
    model = AffinityNet(build_backbone("torchvision:resnet18"))
    assert model.taps == ["layer2", "layer3", "layer4"]
    assert model_widths(model) == [(128, 64), (256, 128), (512, 256)]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 48)).shape == (1, 448, 8, 6)
