"""DeepLab segmentation networks on torchvision ResNets: DeepLab-V3 (ASPP) and DeepLab-LargeFOV.

The segmentation stage trains one of these on the pseudo masks (paper §3.3, §4.4):

* :func:`deeplabv3` -- torchvision's DeepLab-V3 head (``DeepLabHead``: ASPP with rates
  (12, 24, 36) at output stride 8, (6, 12, 18) at 16, image pooling, 3x3 conv, 1x1 classifier).
* :func:`largefov` -- DeepLab-LargeFOV as in the authors' VOC code: res4 dilation 2, res5
  dilation 4 (output stride 8); head 3x3 conv dilation 12 -> 1024, 1x1 -> 1024 (each ReLU +
  dropout 0.5), 1x1 -> classes.

Both return a :class:`Segmenter`: ``backbone`` (torchvision ResNet trunk, ``conv1`` ...
``layer4``, same state-dict keys as torchvision's classifier without ``fc``) and ``head``;
``forward`` maps a normalised (B, 3, H, W) batch to (B, C, H, W) logits at the input size
(bilinear upsampling), C = classes including background. A plain tensor comes out, so the model
can be scripted, traced and exported to ONNX.

The dilated trunk follows torchvision's ``replace_stride_with_dilation``: a dilated layer loses
its stride, its first block keeps the previous dilation and the others take the new one.
torchvision only supports this for Bottleneck ResNets (50/101); for the BasicBlock ResNets
(18/34, the demo's light backbone) the same change is made to the built layers' convolutions.

Weights are data (STYLE rule 2): constructors never read files; :func:`load_resnet_weights`
puts a torchvision-format ImageNet file into the backbone and :func:`build_segmenter` does both
from ``cfg.seg``. BatchNorm stays trainable (DeepLab fine-tunes it; the distributed runner
converts it to SyncBatchNorm on GPUs). Note that DeepLab-V3's image-pooling branch has a
BatchNorm over a 1x1 map, so training needs at least 2 images per rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from mcis_dist.models.params import lr_groups
from mcis_dist.models.weights import WeightsError, _listing, _torch_load

__all__ = [
    "ARCHS",
    "BACKBONES",
    "Segmenter",
    "build_segmenter",
    "deeplabv3",
    "largefov",
    "load_resnet_weights",
    "resnet_trunk",
]

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
ARCHS = ("deeplabv3", "largefov")
OUTPUT_STRIDES = (8, 16)
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # DeepLab-V3 paper, Table 2 / §4.3


# --------------------------------------------------------------------------------------------
# trunk


def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """``replace_stride_with_dilation`` for a layer of BasicBlocks, in place: no stride; the
    first block's 3x3 convs keep ``previous`` dilation, the other blocks' take ``dilation``."""
    for i, block in enumerate(layer):
        d = previous if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:  # the 1x1 projection of the first block
            block.downsample[0].stride = (1, 1)


def resnet_trunk(name: str = "resnet101", output_stride: int = 8) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet trunk (``conv1`` ... ``layer4``, no pooling or
    ``fc``) with dilated layers for ``output_stride``: 8 dilates layer3 (2) and layer4 (4), 16
    only layer4 (2). Returns the trunk (its ``forward`` gives ``{"out": (B, Cb, H/os, W/os)}``)
    and its output width Cb (512 for resnet18/34, 2048 for resnet50/101)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown segmentation backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    replace = [False, output_stride == 8, True]  # layer2, layer3, layer4
    builder = getattr(tv_resnet, name)
    if name in ("resnet18", "resnet34"):  # BasicBlock: torchvision refuses dilation
        net = builder(weights=None)
        dilation = 1
        for layer, dilate in zip((net.layer2, net.layer3, net.layer4), replace, strict=True):
            if dilate:
                previous, dilation = dilation, dilation * 2
                _dilate_basic_layer(layer, previous, dilation)
    else:
        net = builder(weights=None, replace_stride_with_dilation=replace)
    channels = net.fc.in_features  # 512 * block.expansion
    return IntermediateLayerGetter(net, return_layers={"layer4": "out"}), channels


# --------------------------------------------------------------------------------------------
# model


class LargeFOVHead(nn.Sequential):
    """DeepLab-LargeFOV's head: fc6 = 3x3 conv dilation 12, fc7 = 1x1 (each -> ``channels``,
    ReLU, dropout 0.5), fc8 = 1x1 -> classes (init N(0, 0.01), as DeepLab's classifier)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 1024,
        dilation: int = 12,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 1),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(channels, num_classes, 1),  # fc8
        )
        for m in (self[0], self[3]):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.normal_(self[6].weight, std=0.01)
        nn.init.zeros_(self[6].bias)


class Segmenter(nn.Module):
    """A backbone trunk and a head; logits (B, C, H, W) upsampled to the input size.

    Args:
        backbone: maps (B, 3, H, W) to ``{"out": (B, Cb, h, w)}`` (see :func:`resnet_trunk`).
        head: maps (B, Cb, h, w) to (B, C, h, w) logits.
        num_classes: C, background included.
        arch, backbone_name, output_stride: recorded for checkpoints, exports and logs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        num_classes: int,
        arch: str = "",
        backbone_name: str = "",
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.arch = arch
        self.backbone_name = backbone_name
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        feats = self.backbone(x)["out"]  # (B, Cb, H/os, W/os)
        logits = self.head(feats)  # (B, C, H/os, W/os)
        return F.interpolate(
            logits, size=size, mode="bilinear", align_corners=False
        )  # (B, C, H, W)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters for the lr multipliers (``build_optimizer``): backbone weights
        and biases ("pretrained_*") and head weights and biases ("new_*"). BatchNorm scales
        count as weights. Frozen parameters are left out."""
        named = [*self.backbone.named_parameters(), *self.head.named_parameters()]
        return lr_groups(named, {id(p) for p in self.head.parameters()})


def _check_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive int (background included), got {num_classes!r}"
        )


def deeplabv3(
    backbone: str = "resnet101", *, num_classes: int, output_stride: int = 8
) -> Segmenter:
    """DeepLab-V3 (Chen et al. 2017): torchvision's ``DeepLabHead`` on a dilated ResNet.

    Args:
        backbone: resnet18, resnet34, resnet50 or resnet101 (randomly initialised).
        num_classes: output channels C, background included.
        output_stride: 8 (ASPP rates 12/24/36, torchvision's choice) or 16 (rates 6/12/18).
    """
    _check_classes(num_classes)
    trunk, channels = resnet_trunk(backbone, output_stride)
    head = DeepLabHead(channels, num_classes, atrous_rates=ASPP_RATES[output_stride])
    return Segmenter(
        trunk,
        head,
        num_classes=num_classes,
        arch="deeplabv3",
        backbone_name=backbone,
        output_stride=output_stride,
    )


def largefov(
    backbone: str = "resnet101", *, num_classes: int, head_channels: int = 1024
) -> Segmenter:
    """DeepLab-LargeFOV on a ResNet (paper §3.3): res4 (layer3) dilation 2, res5 (layer4)
    dilation 4, output stride 8; head 3x3 dilation 12 -> ``head_channels`` -> ``head_channels``
    -> C; bilinear upsampling (x8) to the input size.

    Args:
        backbone: resnet18, resnet34, resnet50 or resnet101 (randomly initialised).
        num_classes: output channels C, background included.
        head_channels: width of fc6/fc7 (1024 in the paper).
    """
    _check_classes(num_classes)
    trunk, channels = resnet_trunk(backbone, output_stride=8)
    head = LargeFOVHead(channels, num_classes, channels=head_channels)
    return Segmenter(
        trunk,
        head,
        num_classes=num_classes,
        arch="largefov",
        backbone_name=backbone,
        output_stride=8,
    )


# --------------------------------------------------------------------------------------------
# weights and config


def load_resnet_weights(model: Segmenter, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a torchvision-format ResNet state dict (``conv1.weight``, ``layer1.0.conv1.weight``
    ...; ``fc.*`` ignored) into ``model.backbone``. Read with ``torch.load(weights_only=True)``.

    Missing, unexpected and mis-shaped keys raise :class:`WeightsError` (a ValueError) naming
    them; BatchNorm ``num_batches_tracked`` counters absent from older torchvision files are
    tolerated. Returns ``{"loaded": [...], "ignored": [...]}``.
    """
    backbone = model.backbone
    sd = _torch_load(path)
    ignored = sorted(k for k in sd if k.split(".")[0] == "fc")
    body = {k: v for k, v in sd.items() if k.split(".")[0] != "fc"}
    own = backbone.state_dict()
    missing = sorted(k for k in set(own) - set(body) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(body) - set(own))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sorted(body.items())
        if k in own and own[k].shape != v.shape
    ]
    name = getattr(model, "backbone_name", "") or type(backbone).__name__
    problems = []
    if missing:
        problems.append(f"missing keys [{_listing(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_listing(unexpected)}]")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches [{'; '.join(shapes[:20])}]")
    if problems:
        raise WeightsError(f"{path} does not match the {name} backbone: " + "; ".join(problems))
    backbone.load_state_dict(body, strict=False)
    return {"loaded": sorted(body), "ignored": ignored}


def build_segmenter(cfg: Any, num_classes: int) -> Segmenter:
    """The segmentation network of ``cfg.seg`` (an ExperimentConfig, or a SegConfig itself):
    ``arch``, ``backbone``, ``output_stride`` (largefov: always 8) and, when set, ``weights``
    loaded into the backbone with :func:`load_resnet_weights`. ``num_classes`` includes the
    background."""
    seg = getattr(cfg, "seg", cfg)
    if seg.arch == "deeplabv3":
        model = deeplabv3(seg.backbone, num_classes=num_classes, output_stride=seg.output_stride)
    elif seg.arch == "largefov":
        if seg.output_stride != 8:
            raise ValueError(
                f"seg.arch=largefov has output stride 8 (res4 dilation 2, res5 dilation 4), "
                f"got seg.output_stride={seg.output_stride}; valid: 8"
            )
        model = largefov(seg.backbone, num_classes=num_classes)
    else:
        raise ValueError(f"unknown seg.arch {seg.arch!r}; valid: {', '.join(ARCHS)}")
    if seg.weights:
        load_resnet_weights(model, seg.weights)
    return model
