"""DeepLab-V3 / LargeFOV segmenters (forward, NaN, backward, output stride, lr groups, weight
loading, config) and test-time inference (multi-scale, flip, CRF) on toy models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mcis_dist.config import load_config
from mcis_dist.models.deeplab import (
    Segmenter,
    build_segmenter,
    deeplabv3,
    largefov,
    load_resnet_weights,
    resnet_trunk,
)
from mcis_dist.runtime.optim import build_optimizer
from mcis_dist.seg.infer import predict_labels, predict_scores

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
MODELS = [("deeplabv3", 8), ("deeplabv3", 16), ("largefov", 8)]


def make(arch: str, output_stride: int, num_classes: int = 5) -> Segmenter:
    if arch == "deeplabv3":
        return deeplabv3("resnet18", num_classes=num_classes, output_stride=output_stride)
    return largefov("resnet18", num_classes=num_classes, head_channels=64)


# -- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "output_stride"), MODELS)
def test_forward_nan_backward(arch, output_stride):
    torch.manual_seed(0)
    model = make(arch, output_stride).train()
    x = torch.randn(2, 3, 65, 49)  # odd sizes: the output must still be the input size
    out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 5, 65, 49)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.randint(0, 5, (2, 65, 49))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # conv1 /2, maxpool /4, layer2 /8 -> (9, 7); output stride 16 also halves layer3 -> (5, 4)
    feats = model.backbone(x)["out"]
    assert feats.shape == ((2, 512, 9, 7) if output_stride == 8 else (2, 512, 5, 4))


def test_basicblock_dilation_mirrors_torchvision():
    trunk, channels = resnet_trunk("resnet34", output_stride=8)
    assert channels == 512
    l3, l4 = trunk.layer3, trunk.layer4
    assert l3[0].conv1.stride == (1, 1) and l3[0].downsample[0].stride == (1, 1)
    assert l3[0].conv1.dilation == (1, 1) and l3[1].conv1.dilation == (2, 2)  # first: previous
    assert l4[0].conv2.dilation == (2, 2) and l4[-1].conv2.padding == (4, 4)
    trunk16, _ = resnet_trunk("resnet18", output_stride=16)
    assert trunk16.layer3[0].conv1.stride == (2, 2)
    assert trunk16.layer4[1].conv1.dilation == (2, 2)


def test_bottleneck_trunk_and_head_rates():
    model = deeplabv3("resnet50", num_classes=3, output_stride=16)
    feats = model.backbone(torch.randn(1, 3, 64, 64))["out"]
    assert feats.shape == (1, 2048, 4, 4)
    rates = [m[0].dilation[0] for m in model.head[0].convs[1:4]]
    assert rates == [6, 12, 18]
    assert [m[0].dilation[0] for m in make("deeplabv3", 8).head[0].convs[1:4]] == [12, 24, 36]
    fov = largefov("resnet18", num_classes=4)
    assert fov.head[0].dilation == (12, 12) and fov.head[0].out_channels == 1024
    assert fov.head[6].out_channels == 4 and fov.output_stride == 8


def test_bad_arguments_name_valid_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101"):
        deeplabv3("resnet19", num_classes=3)
    with pytest.raises(ValueError, match="output_stride"):
        deeplabv3("resnet18", num_classes=3, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        largefov("resnet18", num_classes=0)


@pytest.mark.parametrize(("arch", "output_stride"), MODELS[::2])
def test_param_groups_partition_backbone_and_head(arch, output_stride):
    model = make(arch, output_stride)
    model.backbone.conv1.weight.requires_grad_(False)  # frozen: left out
    groups = model.param_groups()
    assert set(groups) == {"pretrained_weight", "pretrained_bias", "new_weight", "new_bias"}
    ids = [id(p) for ps in groups.values() for p in ps]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    backbone = {id(p) for p in model.backbone.parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups["pretrained_weight"] + groups["pretrained_bias"]} <= backbone
    assert {id(p) for p in groups["new_weight"] + groups["new_bias"]} == head
    assert all(p.dim() == 1 for p in groups["new_bias"] + groups["pretrained_bias"])
    cfg = load_config(DEMO, ["seg.backbone=resnet18"])
    opt = build_optimizer(model, cfg.seg.train)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    mult = cfg.seg.train.lr_mult
    assert lrs["new_weight"] == pytest.approx(cfg.seg.train.lr * mult[2])
    assert lrs["pretrained_weight"] == pytest.approx(cfg.seg.train.lr * mult[0])


# -- weights and config ----------------------------------------------------------------------


@pytest.fixture
def resnet18_file(tmp_path):
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    return path, sd


def test_load_resnet_weights_round_trip(resnet18_file):
    path, sd = resnet18_file
    for model in (make("deeplabv3", 8), make("largefov", 8)):
        head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
        summary = load_resnet_weights(model, path)
        assert summary["ignored"] == ["fc.bias", "fc.weight"]
        own = model.backbone.state_dict()
        assert set(own) == set(sd) - {"fc.weight", "fc.bias"}
        for k, v in own.items():
            assert torch.equal(v, sd[k]), k
        for k, v in model.head.state_dict().items():  # the head keeps its initialisation
            assert torch.equal(v, head_before[k]), k


def test_load_resnet_weights_names_bad_keys(resnet18_file, tmp_path):
    _, sd = resnet18_file
    model = make("deeplabv3", 8)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")  # older torchvision files lack the BN counters
    load_resnet_weights(model, tmp_path / "old.pth")
    bad = dict(sd)
    del bad["layer2.1.conv2.weight"]
    bad["layer5.0.conv1.weight"] = torch.zeros(1)
    bad["layer1.0.bn1.weight"] = torch.zeros(7)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load_resnet_weights(model, tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing keys [layer2.1.conv2.weight]" in msg
    assert "unexpected keys [layer5.0.conv1.weight]" in msg
    assert "layer1.0.bn1.weight: file (7,) vs model (64,)" in msg
    r50 = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(r50, tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="resnet18 backbone"):
        load_resnet_weights(model, tmp_path / "r50.pth")


def test_build_segmenter_from_config(resnet18_file):
    path, sd = resnet18_file
    cfg = load_config(DEMO, ["seg.backbone=resnet18"])
    model = build_segmenter(cfg, num_classes=9)
    assert (model.arch, model.backbone_name, model.output_stride) == ("deeplabv3", "resnet18", 8)
    assert model.head[-1].out_channels == 9
    cfg = load_config(DEMO, ["seg.backbone=resnet18", "seg.arch=largefov", f"seg.weights={path}"])
    model = build_segmenter(cfg.seg, num_classes=3)
    assert model.arch == "largefov"
    assert torch.equal(model.backbone.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
    cfg = load_config(DEMO, ["seg.backbone=resnet18", "seg.arch=largefov", "seg.output_stride=16"])
    with pytest.raises(ValueError, match="output_stride=16; valid: 8"):
        build_segmenter(cfg, num_classes=3)
    with pytest.raises(ValueError, match="valid: resnet18"):
        build_segmenter(load_config(DEMO, ["seg.backbone=vgg16"]), num_classes=3)


# -- inference -------------------------------------------------------------------------------


class Colour(nn.Module):
    """Logits from each pixel's colour alone (1x1 conv), plus an optional horizontal ramp that
    breaks flip equivariance."""

    def __init__(self, classes: int = 4, ramp: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, classes, 1)
        self.ramp = ramp

    def forward(self, x):
        logits = self.conv(x)  # (B, C, H, W)
        if self.ramp:
            w = x.shape[-1]
            ramp = torch.linspace(-self.ramp, self.ramp, w)  # (W,)
            logits = logits + ramp * torch.arange(logits.shape[1]).view(1, -1, 1, 1)
        return logits


def smooth_image(h: int = 40, w: int = 56) -> torch.Tensor:
    """Colours linear in x and y: bilinear resizing reproduces them away from the border."""
    y = torch.linspace(-1, 1, h).view(h, 1)
    x = torch.linspace(-1, 1, w).view(1, w)
    return torch.stack([x + 0 * y, y + 0 * x, 0.5 * x - y]).unsqueeze(0)  # (1, 3, H, W)


def test_multiscale_equals_single_scale_for_a_colour_model():
    model, img = Colour(), smooth_image()
    single = predict_scores(model, img)
    multi = predict_scores(model, img, scales=(0.5, 0.75, 1.0, 1.5))
    assert single.shape == multi.shape == (4, 40, 56)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, model(img)[0].detach().softmax(0))
    torch.testing.assert_close(multi[:, 4:-4, 4:-4], single[:, 4:-4, 4:-4], atol=1e-5, rtol=0)
    assert (multi - single).abs().max() < 0.1  # borders: only interpolation differences
    torch.testing.assert_close(multi.sum(0), torch.ones(40, 56))


def test_flip_averaging():
    img = torch.randn(1, 3, 17, 23)
    equivariant = Colour()
    torch.testing.assert_close(
        predict_scores(equivariant, img, flip=True), predict_scores(equivariant, img)
    )
    model = Colour(ramp=2.0)  # logits = conv(x) + ramp: the flipped view sees a mirrored ramp
    got = predict_scores(model, img, flip=True)
    conv = model.conv(img)[0].detach()
    ramp = torch.linspace(-2.0, 2.0, 23) * torch.arange(4).view(-1, 1, 1)
    want = ((conv + ramp).softmax(0) + (conv + ramp.flip(-1)).softmax(0)) / 2
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(0), torch.ones(17, 23))


def test_predict_restores_mode_and_resizes_low_resolution_logits():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, stride=4, padding=1), nn.Dropout(0.5)).train()
    img = torch.randn(1, 3, 33, 29)
    a = predict_scores(model, img, scales=(0.7, 1.3), flip=True)
    b = predict_scores(model, img, scales=(0.7, 1.3), flip=True)
    assert a.shape == (3, 33, 29) and model.training
    torch.testing.assert_close(a, b)  # eval mode: dropout off, so deterministic
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        predict_scores(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="positive"):
        predict_scores(model, img, scales=())


def test_predict_labels_with_and_without_crf():
    model, img = Colour(), torch.randn(1, 3, 12, 15)
    scores = predict_scores(model, img)
    labels = predict_labels(model, img)
    assert labels.dtype == np.int64 and labels.shape == (12, 15)
    np.testing.assert_array_equal(labels, scores.argmax(0).numpy())
    rgb = np.random.default_rng(0).integers(0, 256, (12, 15, 3), dtype=np.uint8)
    seen = {}

    def crf(image, probs):
        seen["rgb"], seen["probs"] = image, probs
        out = np.zeros_like(probs)
        out[2] = 1.0  # everything becomes class 2
        return out

    refined = predict_labels(model, img, scales=(1.0, 0.5), flip=True, crf=crf, rgb=rgb)
    assert (refined == 2).all() and refined.dtype == np.int64
    assert seen["rgb"] is rgb or np.array_equal(seen["rgb"], rgb)
    assert seen["probs"].shape == (4, 12, 15)
    np.testing.assert_allclose(seen["probs"].sum(0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="rgb"):
        predict_labels(model, img, crf=crf)
    with pytest.raises(ValueError, match=r"\(12, 15, 3\) uint8"):
        predict_labels(model, img, crf=crf, rgb=rgb[:5])


def test_predict_on_deeplab():
    model = make("deeplabv3", 16)
    probs = predict_scores(model, torch.randn(1, 3, 45, 38), scales=(0.75, 1.0), flip=True)
    assert probs.shape == (5, 45, 38) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(45, 38))
