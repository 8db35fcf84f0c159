"""Backbones: the contract (shapes, strides, taps), frozen BatchNorm, parameter counts and
groups, torchvision backbones by name, and the registry's errors."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torchvision
from torch import nn

from mcis_dist.models import (
    ResNet38,
    build_backbone,
    register_backbone,
    resnet38_tiny,
    split_parameters,
    validate_backbone,
)
from mcis_dist.models import backbones as bb
from mcis_dist.models.backbones import BACKBONES

# exact counts of this implementation (ResNet-38 has about 105 M parameters)
RESNET38_PARAMS = 105_070_912
VGG16_EXTRA_PARAMS = 3 * (512 * 512 * 9 + 512)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full_resnet38():
    return build_backbone("resnet38").eval()


@pytest.fixture(scope="module")
def full_vgg16():
    return build_backbone("vgg16").eval()


@pytest.fixture(scope="module")
def tv_resnet50():
    return build_backbone("torchvision:resnet50").eval()


FIXTURES = {
    "resnet38": "full_resnet38",
    "vgg16": "full_vgg16",
    "torchvision:resnet50": "tv_resnet50",
}


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# -- forward / NaN / backward over every backbone name -----------------------------------------

# (name, input batch, train backward?) -- full-size ones forward only at a small input
CASES = [
    ("resnet38_tiny", 2, True),
    ("resnet38", 1, False),
    ("vgg16", 1, False),
    ("torchvision:resnet50", 1, False),
    ("torchvision:resnet18", 1, True),
    ("torchvision:mobilenet_v2", 1, True),
]


def test_cases_cover_every_registered_name():
    assert {n for n, _, _ in CASES} >= set(BACKBONES)


@pytest.mark.parametrize(("name", "batch", "backward"), CASES, ids=[c[0] for c in CASES])
def test_forward_nan_backward(name, batch, backward, request):
    model = request.getfixturevalue(FIXTURES[name]) if name in FIXTURES else build_backbone(name)
    assert model.output_stride == 8
    h, w = 70, 54  # not multiples of 8: output rounds up
    x = torch.randn(batch, 3, h, w)
    model.train(backward)
    with torch.set_grad_enabled(backward):
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (batch, model.out_channels, math.ceil(h / 8), math.ceil(w / 8))
    assert torch.isfinite(out).all()
    assert "out" in feats and feats["out"].shape == out.shape
    if not backward:
        torch.testing.assert_close(feats["out"], out)  # eval: deterministic
        return
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, no_grad[:5]
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert sum(p.grad.abs().sum() for _, p in trainable) > 0


@pytest.mark.parametrize("name", ["resnet38_tiny", "vgg16", "torchvision:resnet18"])
def test_validate_backbone_accepts_builtins(name, request):
    model = request.getfixturevalue("full_vgg16") if name == "vgg16" else build_backbone(name)
    validate_backbone(model)


def test_validate_backbone_rejects_broken_contracts():
    with pytest.raises(TypeError, match="output_stride"):
        validate_backbone(nn.Conv2d(3, 8, 3))
    liar = resnet38_tiny()
    liar.output_stride = 16  # claims a stride it does not have
    with pytest.raises(ValueError, match="forward gave"):
        validate_backbone(liar)


# -- taps and strides -------------------------------------------------------------------------


def test_resnet38_taps(full_resnet38):
    with torch.no_grad():
        feats = full_resnet38.forward_features(torch.randn(1, 3, 64, 64))
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes == {
        "conv4": (1, 512, 8, 8),
        "conv5": (1, 1024, 8, 8),
        "conv6": (1, 4096, 8, 8),
        "out": (1, 4096, 8, 8),
    }
    assert (feats["conv4"] >= 0).all() and (feats["conv6"] >= 0).all()  # post-ReLU taps
    assert full_resnet38.out_channels == 4096


def test_resnet38_tiny_taps_follow_width():
    model = resnet38_tiny(depths=(1, 1, 1, 1))
    feats = model.forward_features(torch.randn(1, 3, 40, 33))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "conv4": (32, 5, 5),
        "conv5": (64, 5, 5),
        "conv6": (256, 5, 5),
        "out": (256, 5, 5),
    }
    assert model.feature_channels == {"conv4": 32, "conv5": 64, "conv6": 256, "out": 256}
    assert model.conv1a.out_channels == 4 and model.b7.conv_branch2b2.out_channels == 256


def test_resnet38_layout_matches_reference(full_resnet38):
    m = full_resnet38
    names = {n for n, _ in m.named_children()}
    blocks = {"b2": 3, "b3": 3, "b4": 6, "b5": 3}
    want = {"conv1a", "b6", "b7", "bn7"} | {
        s if i == 0 else f"{s}_{i}" for s, d in blocks.items() for i in range(d)
    }
    assert names == want
    assert [m.b2.conv_branch2a.stride, m.b3.conv_branch2a.stride, m.b4.conv_branch2a.stride] == [
        (2, 2)
    ] * 3
    assert m.b5.conv_branch2a.dilation == (1, 1) and m.b5.conv_branch2b1.dilation == (2, 2)
    assert m.b5_2.conv_branch2a.dilation == (2, 2)
    for blk, cin, cout in ((m.b6, 1024, 2048), (m.b7, 2048, 4096)):  # bottlenecks, dilation 4
        assert blk.conv_branch2a.weight.shape[:2] == (cout // 4, cin)
        assert blk.conv_branch2b1.weight.shape == (cout // 2, cout // 4, 3, 3)
        assert blk.conv_branch2b1.dilation == (4, 4)
        assert blk.conv_branch2b2.weight.shape[:2] == (cout, cout // 2)
    assert (m.b6.dropout_2b1.p, m.b7.dropout_2b2.p) == (0.3, 0.5)


def test_vgg16_taps_and_layout(full_vgg16):
    with torch.no_grad():
        feats = full_vgg16.forward_features(torch.randn(1, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "conv4": (1, 512, 32, 32),
        "conv5": (1, 512, 32, 32),
        "out": (1, 512, 32, 32),
    }
    f = full_vgg16.features
    assert len(f) == 30  # torchvision's features up to conv5_3's ReLU, pool5 removed
    assert f[23].stride == 1 and [f[i].dilation for i in (24, 26, 28)] == [(2, 2)] * 3
    assert [m.kernel_size for m in full_vgg16.extra if isinstance(m, nn.Conv2d)] == [(3, 3)] * 3


# -- frozen BatchNorm and frozen stages --------------------------------------------------------


def test_frozen_bn_stays_in_eval_and_gets_no_grad():
    model = resnet38_tiny()
    model.train()
    bns = _bns(model)
    assert bns and not any(bn.training for bn in bns)
    assert model.b6.dropout_2b1.training  # everything else does switch to training mode
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert all(p.grad is None for bn in bns for p in bn.parameters())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # statistics untouched


def test_unfrozen_bn_trains():
    model = resnet38_tiny(frozen_bn=False).train()
    before = model.bn7.running_mean.clone()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert model.bn7.training and model.bn7.weight.grad is not None
    assert not torch.equal(before, model.bn7.running_mean)


def test_freeze_stages():
    model = resnet38_tiny(depths=(3, 1, 1, 1), freeze_stages=("conv1a", "b2"))
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("conv1a", "b2", "b2_1", "b2_2"):
            assert not p.requires_grad, name
        elif ".bn_" not in name and not name.startswith("bn7."):
            assert p.requires_grad, name  # convs of later stages still train
    with pytest.raises(ValueError, match=r"unknown ResNet-38 stage 'b9'.*conv1a, b2"):
        resnet38_tiny(freeze_stages=("b9",))


# -- parameter counts and learning-rate groups --------------------------------------------------


def test_parameter_counts(full_resnet38, full_vgg16):
    n = sum(p.numel() for p in full_resnet38.parameters())
    assert n == RESNET38_PARAMS
    assert 104.3e6 * 0.99 <= n <= 106e6 * 1.01
    tv = torchvision.models.vgg16(weights=None)
    tv_convs = sum(p.numel() for p in tv.features.parameters())
    assert tv_convs == 14_714_688
    assert sum(p.numel() for p in full_vgg16.parameters()) == tv_convs + VGG16_EXTRA_PARAMS


def test_parameter_groups_partition(full_resnet38, full_vgg16):
    pre, new = split_parameters(full_vgg16)
    assert sum(p.numel() for p in new) == VGG16_EXTRA_PARAMS
    assert {id(p) for p in new} == {id(p) for p in full_vgg16.extra.parameters()}
    assert {id(p) for p in pre} == {id(p) for p in full_vgg16.features.parameters()}
    pre, new = split_parameters(full_resnet38)
    assert new == [] and len(pre) == sum(1 for p in full_resnet38.parameters() if p.requires_grad)
    frozen = resnet38_tiny(freeze_stages=("conv1a", "b2"))
    pre, new = split_parameters(frozen)
    assert all(p.requires_grad for p in pre) and "conv1a" not in {
        n for n, p in frozen.named_parameters() if any(p is q for q in pre)
    }
    tvb = build_backbone("torchvision:resnet18")
    pre, new = split_parameters(tvb)
    assert new == [] and len(pre) == len(list(tvb.parameters()))


def test_split_parameters_catches_overlap():
    class Bad(ResNet38):
        def new_parameters(self):
            return [self.conv1a.weight]  # also in pretrained_parameters()

    with pytest.raises(ValueError, match="partition"):
        split_parameters(Bad(width=1 / 16, depths=(1, 1, 1, 1)))


def test_tiny_is_fast_on_one_core():
    model = resnet38_tiny().train()
    x = torch.randn(4, 3, 128, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model(x).mean().backward()  # warm-up
        start = time.perf_counter()
        model(x).mean().backward()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 0.5, f"forward+backward took {elapsed:.2f} s"


# -- torchvision backbones ---------------------------------------------------------------------


def test_torchvision_resnet50_stride8(tv_resnet50):
    model = tv_resnet50
    assert (model.out_channels, model.output_stride) == (2048, 8)
    assert not hasattr(model, "fc") and not hasattr(model, "avgpool")
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "layer1": (256, 16, 16),
        "layer2": (512, 8, 8),
        "layer3": (1024, 8, 8),
        "layer4": (2048, 8, 8),
        "out": (2048, 8, 8),
    }


def _conv_config(modules):
    return [
        (m.stride, m.dilation, m.padding)
        for u in modules
        for m in u.modules()
        if isinstance(m, nn.Conv2d)
    ]


def test_dilation_surgery_matches_torchvision_replace_stride_with_dilation():
    """The generic surgery (used for BasicBlock ResNets, VGG, MobileNet...) reproduces
    torchvision's own dilation of a bottleneck ResNet, conv by conv."""
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[0, 1, 1])
    plain = torchvision.models.resnet50(weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    units = [u for n in names for u in bb._units(getattr(plain, n))]
    x, sizes = torch.zeros(1, 3, 64, 64), [64]
    with torch.no_grad():
        for u in units.copy():
            x = u.eval()(x)
            sizes.append(x.shape[2])
    assert bb._dilate(units, [a // b for a, b in zip(sizes, sizes[1:], strict=False)], 8)
    ref_units = [u for n in names for u in bb._units(getattr(ref, n))]
    assert _conv_config(units) == _conv_config(ref_units)


def test_torchvision_without_dilation_keeps_native_stride():
    basic = build_backbone("torchvision:resnet18")  # BasicBlock: dilated by surgery
    assert (basic.out_channels, basic.output_stride) == (512, 8)
    assert basic.layer4[1].conv1.dilation == (4, 4)
    native = build_backbone("torchvision:resnet18", output_stride=None)
    assert native.output_stride == 32
    convnext = build_backbone("torchvision:convnext_tiny")  # 2x2 patchify convs: cannot dilate
    assert (convnext.out_channels, convnext.output_stride) == (768, 32)


# -- names and errors -------------------------------------------------------------------------


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet39'.*resnet38.*vgg16.*torchv"):
        build_backbone("resnet39")
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet5'.*resnet50"):
        build_backbone("torchvision:resnet5")
    with pytest.raises(ValueError, match="no plain sequential feature extractor"):
        build_backbone("torchvision:vit_b_16")
    with pytest.raises(ValueError, match="weights are loaded apart"):
        build_backbone("torchvision:resnet18", weights="DEFAULT")


def test_register_user_backbone(monkeypatch):
    monkeypatch.setattr(bb, "BACKBONES", dict(bb.BACKBONES))
    register_backbone("mine", lambda **kw: resnet38_tiny(depths=(1, 1, 1, 1), **kw))
    model = build_backbone("mine", dropout_b7=0.0)
    assert isinstance(model, ResNet38) and model.b7.dropout_2b1.p == 0.0
    with pytest.raises(ValueError, match="taken"):
        register_backbone("resnet38", resnet38_tiny)
