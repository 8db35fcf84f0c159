"""AffinityNet (Ahn & Kwak, CVPR 2018; the psa code): a stride-8 embedding whose pairwise
affinities a_ij = exp(-mean_c |f_i - f_j|) drive the random walk that turns CAMs into pseudo
masks (paper §4.4; ARCHITECTURE: CAMs -> AffinityNet -> random walk).

Head (psa's ResNet-38 head)::

    conv4 (512)  -> 1x1 conv -> 64  + ELU ┐
    conv5 (1024) -> 1x1 conv -> 128 + ELU ├ concat 448 -> 1x1 conv 448 -> 448 + ELU -> f
    conv6 (4096) -> 1x1 conv -> 256 + ELU ┘

Generalised to any backbone of :mod:`mcis_dist.models.backbones`: the head reads the last three
named taps of ``backbone.feature_channels`` (``out`` only fills in when fewer than three named
taps exist: VGG-16 gives ``conv4, conv5, out``; the torchvision ResNets ``layer2 .. layer4``),
with widths ``head_channels`` (64, 128, 256 by default, times ``width``). Taps whose sizes
differ are brought to the stride-``output_stride`` size of the input (see :func:`match_size`).

Pairs are given as offsets ``(dy, dx)``: pair (i, j) joins position i = (y, x) and
j = (y + dy, x + dx) of the same stride-8 grid. :func:`pair_affinities` returns one map per
offset, indexed by i; pairs whose j falls outside the grid get affinity 0 and ``valid=False``.

Weights: the affinity net starts from the trained MCIS classifier's backbone
(:meth:`AffinityNet.load_backbone_from_classifier`), the way psa starts from ImageNet weights:
the classifier's backbone is the best initialisation we have, and for VGG-16 it is the only one
whose three extra convs are trained. The head is new (lr x10 weights, x20 biases).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcis_dist.models.params import lr_groups

__all__ = [
    "AffinityNet",
    "DEFAULT_HEAD_CHANNELS",
    "choose_taps",
    "match_size",
    "pair_affinities",
    "probe_tap_channels",
    "shift_map",
]

#: psa's head widths for the conv4 / conv5 / conv6 taps of ResNet-38 (448 in all)
DEFAULT_HEAD_CHANNELS = (64, 128, 256)


def choose_taps(feature_channels: Mapping[str, int], n: int = 3) -> list[str]:
    """The ``n`` deepest taps of a backbone, in order: named taps first, ``out`` only as filler.

    ``out`` is the final map, which ResNets also expose under a name (``conv6``, ``layer4``);
    it is only taken when fewer than ``n`` named taps exist (VGG-16: conv4, conv5, out).
    """
    named = [t for t in feature_channels if t != "out"]
    taps = named[-n:]
    if len(taps) < n and "out" in feature_channels:
        taps.append("out")
    if not taps:
        raise ValueError(f"backbone has no feature taps: {dict(feature_channels)}")
    return taps


def probe_tap_channels(backbone: nn.Module, size: int = 64) -> dict[str, int]:
    """Channels of each ``forward_features`` tap, for backbones without ``feature_channels``
    (the torchvision wrappers): one pass on the meta device, so shapes only and no arithmetic.
    """

    class _Taps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = backbone

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return self.b.forward_features(x)

    state = {
        f"b.{n}": torch.empty_like(t, device="meta")
        for n, t in itertools.chain(backbone.named_parameters(), backbone.named_buffers())
    }
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            x = torch.empty(1, 3, size, size, device="meta")
            feats = torch.func.functional_call(_Taps(), state, (x,))
    finally:
        backbone.train(was_training)
    return {name: int(t.shape[1]) for name, t in feats.items()}


def match_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a tap (B, C, h', w') to (B, C, *size).

    Equal: unchanged. At least as large and less than twice as large in both dimensions (a
    pixel or two more from padding): cropped to the top-left ``size`` (cell k keeps covering
    input pixels 8k .. 8k+7). Anything else (smaller, or a finer stride): bilinear resize.
    """
    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if th <= h < 2 * th and tw <= w < 2 * tw:
        return x[..., :th, :tw]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def shift_map(x: Tensor, dy: int, dx: int, fill: float | int = 0) -> Tensor:
    """The neighbour at offset (dy, dx) of every position: out[..., y, x] = x[..., y+dy, x+dx],
    ``fill`` where (y+dy, x+dx) lies outside the grid. Any dtype; differentiable in x.

    (..., h, w) -> (..., h, w).
    """
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
    ysrc, xsrc = slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx))
    out[..., ys, xs] = x[..., ysrc, xsrc]
    return out


def pair_affinities(feats: Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """a_ij = exp(-mean_c |f_i - f_j|) for j = i + offset (psa).

    Args:
        feats: (B, D, h, w) embedding.
        offsets: O pairs ``(dy, dx)``.
    Returns:
        ``(aff, valid)``: aff (B, O, h, w), aff[:, o, y, x] is the affinity of (y, x) with
        (y + dy_o, x + dx_o), 0 where that neighbour is outside the grid; valid (O, h, w) bool,
        True where it is inside.
    """
    b, _, h, w = feats.shape
    maps, valid = [], torch.zeros(len(offsets), h, w, dtype=torch.bool, device=feats.device)
    for o, (dy, dx) in enumerate(offsets):
        y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        if y1 <= y0 or x1 <= x0:  # the neighbour is never inside the grid
            maps.append(feats.new_zeros(b, h, w))
            continue
        fi = feats[:, :, y0:y1, x0:x1]  # (B, D, h_o, w_o)
        fj = feats[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx]  # (B, D, h_o, w_o)
        a = torch.exp(-(fi - fj).abs().mean(dim=1))  # (B, h_o, w_o)
        maps.append(F.pad(a, (x0, w - x1, y0, h - y1)))  # (B, h, w), 0 outside
        valid[o, y0:y1, x0:x1] = True
    if not maps:
        return feats.new_zeros(b, 0, h, w), valid
    return torch.stack(maps, dim=1), valid  # (B, O, h, w), (O, h, w)


class AffinityNet(nn.Module):
    """Backbone + psa's affinity head: (B, 3, H, W) -> embedding (B, D, H/s, W/s), s = 8.

    Args:
        backbone: a module of the backbone contract with ``forward_features`` and
            ``feature_channels`` (or pass ``tap_channels``).
        tap_channels: taps to read -> their channels, in order shallow to deep; default: the
            last three taps of ``backbone.feature_channels`` (:func:`choose_taps`).
        head_channels: width of each tap's 1x1 conv; default (64, 128, 256) times ``width``
            (the last ``n`` of them when there are ``n < 3`` taps). Required for more than 3.
        width: multiplier of the default head widths, rounded to multiples of 4 (the 1/16-wide
            test ResNet-38 takes 1/16: 4, 8, 16); ignored when ``head_channels`` is given.
        out_channels: D, width of the final 1x1 conv; default the sum of ``head_channels``
            (448 for psa).
        head_bias: biases in the head's convs (psa: none).
        backbone_from_classifier: the backbone's weights all come from the trained classifier
            (:meth:`load_backbone_from_classifier`), so every backbone parameter counts as
            pretrained in :meth:`param_groups`, including those the backbone itself calls new
            (VGG-16's extra convs). False: the backbone's own ``new_parameters()`` are new.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        tap_channels: Mapping[str, int] | None = None,
        head_channels: Sequence[int] | None = None,
        width: float = 1.0,
        out_channels: int | None = None,
        head_bias: bool = False,
        backbone_from_classifier: bool = True,
    ) -> None:
        super().__init__()
        if not callable(getattr(backbone, "forward_features", None)):
            raise ValueError(f"{type(backbone).__name__} needs forward_features(x) -> dict")
        if tap_channels is None:
            channels = getattr(backbone, "feature_channels", None)
            if not isinstance(channels, Mapping):
                channels = probe_tap_channels(backbone)
            tap_channels = {t: int(channels[t]) for t in choose_taps(channels)}
        tap_channels = dict(tap_channels)
        if not tap_channels:
            raise ValueError("tap_channels must name at least one tap")
        n = len(tap_channels)
        if head_channels is None:
            if n > len(DEFAULT_HEAD_CHANNELS):
                raise ValueError(f"{n} taps {list(tap_channels)} need explicit head_channels")
            if width <= 0:
                raise ValueError(f"width must be > 0, got {width}")
            head_channels = [max(4, 4 * round(c * width / 4)) for c in DEFAULT_HEAD_CHANNELS[-n:]]
        head_channels = [int(c) for c in head_channels]
        if len(head_channels) != n or min(head_channels) < 1:
            raise ValueError(
                f"head_channels {head_channels} must give one positive width per tap {list(tap_channels)}"
            )
        self.backbone = backbone
        self.taps = list(tap_channels)
        self.output_stride: int = int(getattr(backbone, "output_stride", 8))
        self.backbone_from_classifier = backbone_from_classifier
        self.tap_convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 1, bias=head_bias)
            for cin, cout in zip(tap_channels.values(), head_channels, strict=True)
        )
        self.out_channels: int = int(out_channels or sum(head_channels))
        self.fuse = nn.Conv2d(sum(head_channels), self.out_channels, 1, bias=head_bias)
        self.reset_head()

    def reset_head(self) -> None:
        """psa's initialisation: Kaiming-normal tap convs, Xavier-uniform fuse conv with gain 4
        (a wide spread of |f_i - f_j| from the start), zero biases."""
        for conv in self.tap_convs:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4.0)
        for conv in [*self.tap_convs, self.fuse]:
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) ImageNet-normalised RGB -> (B, D, ceil(H/8), ceil(W/8)) embedding."""
        feats = self.backbone.forward_features(x)
        missing = [t for t in self.taps if t not in feats]
        if missing:
            raise KeyError(f"backbone taps {missing} missing; forward_features gave {list(feats)}")
        s = self.output_stride
        size = (math.ceil(x.shape[-2] / s), math.ceil(x.shape[-1] / s))
        parts = [
            match_size(F.elu(conv(feats[t])), size)  # (B, c_t, h, w)
            for t, conv in zip(self.taps, self.tap_convs, strict=True)
        ]
        return F.elu(self.fuse(torch.cat(parts, dim=1)))  # (B, D, h, w)

    @staticmethod
    def affinities(feats: Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """``(aff (B, O, h, w), valid (O, h, w))`` of :func:`pair_affinities`."""
        return pair_affinities(feats, offsets)

    # ---- weights ------------------------------------------------------------------------
    def load_backbone_from_classifier(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy the ``backbone.*`` weights of an MCIS classifier state dict into this backbone.

        Accepts ``MCISClassifier.state_dict()`` (also with DDP's ``module.`` prefix) or a
        classifier checkpoint dict holding it under ``"model"``. Every key of this backbone
        must be there with the same shape, and no other ``backbone.*`` key may be; otherwise a
        ValueError names the missing, unexpected and mis-shaped keys.
        """
        if isinstance(state_dict.get("model"), Mapping):
            state_dict = state_dict["model"]
        prefixes = ("backbone.", "module.backbone.")
        sub = {k[len(p) :]: v for k, v in state_dict.items() for p in prefixes if k.startswith(p)}
        if not sub:
            sample = ", ".join(list(state_dict)[:5])
            raise ValueError(
                f"no backbone.* keys in the classifier state dict (keys: {sample or 'none'})"
            )
        own = self.backbone.state_dict()
        missing = sorted(set(own) - set(sub))
        unexpected = sorted(set(sub) - set(own))
        shapes = sorted(
            f"{k} {tuple(sub[k].shape)} vs {tuple(own[k].shape)}"
            for k in set(own) & set(sub)
            if tuple(sub[k].shape) != tuple(own[k].shape)
        )
        problems = [
            f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        if problems:
            raise ValueError(
                "classifier backbone does not match the affinity backbone ("
                + "; ".join(problems)
                + ")"
            )
        self.backbone.load_state_dict(sub)

    # ---- parameters ---------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        """The tap convs and the fuse conv."""
        return [p for m in (self.tap_convs, self.fuse) for p in m.parameters()]

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters trained from scratch (lr x10 / x20): the head, plus the backbone's own
        ``new_parameters()`` unless ``backbone_from_classifier``."""
        own = self.head_parameters()
        extra = getattr(self.backbone, "new_parameters", None)
        if self.backbone_from_classifier or not callable(extra):
            return own
        return own + list(extra())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters for psa's lr multipliers: pretrained weights (x1) and biases
        (x2), new weights (x10) and biases (x20). Frozen ones (BatchNorm, frozen stages) are
        left out. Same keys as ``MCISClassifier.param_groups``."""
        return lr_groups(self.named_parameters(), {id(p) for p in self.new_parameters()})
