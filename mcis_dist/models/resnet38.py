"""ResNet-38, the "wider or deeper" model A1, as the co-attention classifier's LID backbone.

Pre-activation residual network (psa's resnet38d; Wu, Shen & van den Hengel, "Wider or Deeper").
Layout, with the input at stride 1 and the output at stride 8::

    conv1a  3x3 conv 3 -> 64                               stride 1
    b2      64 -> 128, stride 2, + b2_1, b2_2              stride 2
    b3      128 -> 256, stride 2, + b3_1, b3_2             stride 4
    b4      256 -> 512, stride 2, + b4_1 .. b4_5           stride 8
    b5      512 -> 1024 (mid 512), dilation 1 then 2, + b5_1, b5_2 at dilation 2
    b6      bottleneck 1024 -> 2048, dilation 4, dropout 0.3
    b7      bottleneck 2048 -> 4096, dilation 4, dropout 0.5
    bn7     BatchNorm + ReLU

Module and parameter names follow the ImageNet weights' MXNet key names, so the converted
weights load by name: ``res4b5_branch2a_weight`` is ``b4_5.conv_branch2a.weight``,
``bn5a_branch2b1_gamma`` is ``b5.bn_branch2b1.weight`` (see :mod:`mcis_dist.models.weights`).

Taps (:meth:`ResNet38.forward_features`): ``conv4`` (512 ch) is BN+ReLU of b5's input, ``conv5``
(1024 ch) is BN+ReLU of b6's input, ``conv6`` (4096 ch) is the final map; ``out`` is ``conv6``.
All taps are at stride 8; spatial sizes round up: ``ceil(H / 8)``.

BatchNorm is frozen by default (eval mode and ``requires_grad=False``, also after
``model.train()``), as in every WSSS use of this network: batches are small and the ImageNet
statistics are better than per-batch ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcis_dist.models.batchnorm import FrozenBatchNormMixin

__all__ = ["ResNet38", "resnet38", "resnet38_tiny", "STAGES"]

#: Names accepted by ``freeze_stages``; a stage ``bN`` covers ``bN`` and ``bN_1``, ``bN_2``, ...
STAGES = ("conv1a", "b2", "b3", "b4", "b5", "b6", "b7", "bn7")


class ResBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-3x3 conv (stride, first_dilation), BN-ReLU-3x3 conv.

    The shortcut is the identity when shapes match, else a 1x1 conv on the pre-activated input.

    Args:
        in_ch: input channels.
        mid_ch: channels after the first 3x3 conv.
        out_ch: output channels.
        stride: stride of the first 3x3 conv and of the shortcut conv.
        first_dilation: dilation (and padding) of the first 3x3 conv.
        dilation: dilation (and padding) of the second 3x3 conv.
    """

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        first_dilation: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(
            in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(
            mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False
        )
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(output, BN+ReLU of the input)``; the second is a feature tap."""
        preact = F.relu(self.bn_branch2a(x))  # (B, Cin, H, W)
        shortcut = x if self.same_shape else self.conv_branch1(preact)  # (B, Cout, H/s, W/s)
        y = self.conv_branch2a(preact)  # (B, Cmid, H/s, W/s)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))  # (B, Cout, H/s, W/s)
        return shortcut + y, preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_preact(x)[0]


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck: 1x1 (out/4) -> 3x3 dilated (out/2) -> 1x1 (out), with dropout.

    Dropout (channel-wise, ``Dropout2d``) sits before the 3x3 and before the last 1x1 conv.

    Args:
        in_ch: input channels.
        out_ch: output channels (must be divisible by 4).
        stride: stride of the first 1x1 conv and of the shortcut conv.
        dilation: dilation (and padding) of the 3x3 conv.
        dropout: drop probability of both dropout layers.
    """

    def __init__(
        self, in_ch: int, out_ch: int, *, stride: int = 1, dilation: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if out_ch % 4:
            raise ValueError(f"bottleneck out_ch must be divisible by 4, got {out_ch}")
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(
            out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(output, BN+ReLU of the input)``; the second is a feature tap."""
        preact = F.relu(self.bn_branch2a(x))  # (B, Cin, H, W)
        shortcut = x if self.same_shape else self.conv_branch1(preact)  # (B, Cout, H, W)
        y = self.conv_branch2a(preact)  # (B, Cout/4, H, W)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))  # (B, Cout/2, ..)
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))  # (B, Cout, ..)
        return shortcut + y, preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_preact(x)[0]


class ResNet38(FrozenBatchNormMixin, nn.Module):
    """ResNet-38 (model A1) with output stride 8; see the module docstring for the layout.

    Follows the backbone contract of :mod:`mcis_dist.models.backbones`: ``out_channels``,
    ``output_stride``, ``forward(x) -> (B, C, ceil(H/8), ceil(W/8))`` and ``forward_features``.

    Args:
        width: channel multiplier (1.0 is the real network; 1/16 gives 4, 8, ..., 256 channels
            for the tiny test model). Scaled widths are rounded to a multiple of 4.
        depths: blocks in stages b2, b3, b4, b5 (the real network: 3, 3, 6, 3). b6 and b7 are
            always one bottleneck each.
        dropout_b6: dropout probability inside b6.
        dropout_b7: dropout probability inside b7.
        frozen_bn: freeze every BatchNorm (see :meth:`freeze_bn`).
        freeze_stages: stages whose parameters get ``requires_grad=False``, by name from
            :data:`STAGES` (the heads freeze ``("conv1a", "b2")``).
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        depths: Sequence[int] = (3, 3, 6, 3),
        dropout_b6: float = 0.3,
        dropout_b7: float = 0.5,
        frozen_bn: bool = True,
        freeze_stages: Sequence[str] = (),
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive block counts for b2..b5, got {depths}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = float(width)
        self.depths = depths

        def ch(n: int) -> int:
            return max(4, 4 * round(n * width / 4))

        self.conv1a = nn.Conv2d(3, ch(64), 3, padding=1, bias=False)
        # (stage, in, mid, out, stride, first_dilation, dilation of later convs)
        plan = [
            (2, ch(64), ch(128), ch(128), 2, 1, 1),
            (3, ch(128), ch(256), ch(256), 2, 1, 1),
            (4, ch(256), ch(512), ch(512), 2, 1, 1),
            (5, ch(512), ch(512), ch(1024), 1, 1, 2),
        ]
        for (stage, cin, mid, cout, stride, first_dil, dil), depth in zip(
            plan, depths, strict=True
        ):
            kw = {"stride": stride, "first_dilation": first_dil, "dilation": dil}
            self.add_module(f"b{stage}", ResBlock(cin, mid, cout, **kw))
            for i in range(1, depth):
                blk = ResBlock(cout, mid, cout, first_dilation=dil, dilation=dil)
                self.add_module(f"b{stage}_{i}", blk)
        self.b6 = BottleneckBlock(ch(1024), ch(2048), dilation=4, dropout=dropout_b6)
        self.b7 = BottleneckBlock(ch(2048), ch(4096), dilation=4, dropout=dropout_b7)
        self.bn7 = nn.BatchNorm2d(ch(4096))

        self.out_channels: int = ch(4096)
        self.output_stride: int = 8
        #: channels of each tap returned by :meth:`forward_features`
        self.feature_channels: dict[str, int] = {
            "conv4": ch(512),
            "conv5": ch(1024),
            "conv6": ch(4096),
            "out": ch(4096),
        }
        self.frozen_bn = False
        if frozen_bn:
            self.freeze_bn()
        self.freeze_stages(freeze_stages)

    def stage_modules(self, stage: str) -> list[nn.Module]:
        """The modules that make up one stage of :data:`STAGES`, e.g. ``b2, b2_1, b2_2``."""
        if stage not in STAGES:
            raise ValueError(f"unknown ResNet-38 stage {stage!r}; valid: {', '.join(STAGES)}")
        if stage in ("conv1a", "b6", "b7", "bn7"):
            return [getattr(self, stage)]
        depth = self.depths[int(stage[1]) - 2]
        return [getattr(self, stage)] + [getattr(self, f"{stage}_{i}") for i in range(1, depth)]

    def freeze_stages(self, stages: Sequence[str]) -> None:
        """Set ``requires_grad=False`` on every parameter of the named stages."""
        if isinstance(stages, str):
            stages = (stages,)
        for stage in stages:
            for module in self.stage_modules(stage):
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the taps ``conv4``, ``conv5``, ``conv6`` and ``out`` (= ``conv6``).

        ``x``: (B, 3, H, W), ImageNet-normalised RGB. Every tap is (B, C_tap, ceil(H/8),
        ceil(W/8)) with C_tap from :attr:`feature_channels`.
        """
        x = self.conv1a(x)  # (B, 64, H, W)
        for stage in ("b2", "b3", "b4"):
            for block in self.stage_modules(stage):
                x = block(x)  # b2: (B, 128, H/2, W/2); b3: (B, 256, H/4, ..); b4: (B, 512, H/8, ..)
        b5 = self.stage_modules("b5")
        x, conv4 = b5[0].forward_with_preact(x)  # conv4: (B, 512, H/8, W/8)
        for block in b5[1:]:
            x = block(x)  # (B, 1024, H/8, W/8)
        x, conv5 = self.b6.forward_with_preact(x)  # conv5: (B, 1024, H/8, W/8)
        x = self.b7(x)  # (B, 4096, H/8, W/8)
        conv6 = F.relu(self.bn7(x))  # (B, 4096, H/8, W/8)
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6, "out": conv6}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels, ceil(H/8), ceil(W/8))."""
        return self.forward_features(x)["out"]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that come from the ImageNet weights: all of them here."""
        return [p for p in self.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters without pretrained values: none in ResNet-38."""
        return []


def resnet38(**kwargs) -> ResNet38:
    """The full ResNet-38 (model A1): width 1, depths (3, 3, 6, 3); about 104 M parameters."""
    return ResNet38(**kwargs)


def resnet38_tiny(
    *, width: float = 1 / 16, depths: Sequence[int] = (1, 1, 1, 2), **kwargs
) -> ResNet38:
    """A small ResNet-38 for tests and the CPU demo: same code, taps and stride, 1/16 width.

    Channels 4, 8, 16, 32, 64, 128, 256 (conv1a .. b7); one block per stage except b5, which
    keeps one dilation-2 block so every block kind runs.
    """
    return ResNet38(width=width, depths=depths, **kwargs)
