"""VGG-16 at output stride 8 with three extra 3x3 convs: the VOC co-attention backbone.

Paper §3.3: "the last three fully-connected layers are replaced with three convolutional layers
with 512 channels and kernel size 3x3". The convolutional part keeps torchvision's VGG-16 layout
(``features.0`` .. ``features.28``), so a torchvision ImageNet state dict loads by name
(:func:`mcis_dist.models.weights.load_torchvision_vgg16`). Changes from torchvision::

    features.4, .9, .16   pool1-3: 2x2 max pool, stride 2, ceil_mode=True (torchvision: floor;
                          identical on even sizes, and rounds up like the other backbones)
    features.23           pool4: 3x3 max pool, stride 1, padding 1 (keeps the size)
    features.24, .26, .28 conv5_1-3: dilation 2, padding 2
    (features.30)         pool5: removed
    extra.0, .2, .4       NEW: three 3x3 conv 512 -> 512 (+ ReLU), padding 1

Output stride 8: ``forward(x)`` is (B, 512, ceil(H/8), ceil(W/8)). Only ``extra.*`` is new
(:meth:`VGG16.new_parameters`; the ×10 learning-rate group); everything in ``features`` comes
from ImageNet (:meth:`VGG16.pretrained_parameters`).

Taps (:meth:`VGG16.forward_features`): ``conv4`` = ReLU(conv4_3) (512 ch), ``conv5`` =
ReLU(conv5_3) (512 ch), ``out`` = the last extra conv's ReLU (512 ch), all at stride 8.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG16", "vgg16", "CONV_INDICES"]

#: torchvision ``features`` indices of the 13 VGG-16 convs (conv1_1 .. conv5_3).
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

# (in, out) of the 13 convs, in order; "M" marks a stride-2 pool, "P" the stride-1 pool4
_LAYOUT: tuple[tuple[int, int] | str, ...] = (
    (3, 64),
    (64, 64),
    "M",
    (64, 128),
    (128, 128),
    "M",
    (128, 256),
    (256, 256),
    (256, 256),
    "M",
    (256, 512),
    (512, 512),
    (512, 512),
    "P",
    (512, 512),
    (512, 512),
    (512, 512),
)
_CONV4_3_RELU = 22  # index of the ReLU after conv4_3 in ``features``


class VGG16(nn.Module):
    """VGG-16 convolutional trunk, output stride 8, plus ``num_extra_convs`` new 3x3 convs.

    Follows the backbone contract of :mod:`mcis_dist.models.backbones`.

    Args:
        num_extra_convs: new 3x3 conv + ReLU layers after conv5_3 (the paper: 3; 0 gives the
            plain dilated trunk).
        extra_channels: channels of the extra convs (the paper: 512).
        conv5_dilation: dilation of conv5_1..conv5_3 (2 keeps their receptive field after
            pool4 lost its stride).
    """

    def __init__(
        self, *, num_extra_convs: int = 3, extra_channels: int = 512, conv5_dilation: int = 2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        pools = 0
        for item in _LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                pools += 1
            elif item == "P":
                layers.append(nn.MaxPool2d(3, 1, padding=1))
                pools += 1
            else:
                cin, cout = item
                d = conv5_dilation if pools == 4 else 1
                layers += [nn.Conv2d(cin, cout, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)  # indices 0..29, as torchvision's up to pool5

        extra: list[nn.Module] = []
        cin = 512
        for _ in range(num_extra_convs):
            extra += [nn.Conv2d(cin, extra_channels, 3, padding=1), nn.ReLU(inplace=True)]
            cin = extra_channels
        self.extra = nn.Sequential(*extra)

        self.out_channels: int = cin
        self.output_stride: int = 8
        #: channels of each tap returned by :meth:`forward_features`
        self.feature_channels: dict[str, int] = {"conv4": 512, "conv5": 512, "out": cin}
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG scheme; pretrained weights overwrite ``features`` when loaded
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the taps ``conv4``, ``conv5`` and ``out``; each (B, C, ceil(H/8), ceil(W/8)).

        ``x``: (B, 3, H, W), ImageNet-normalised RGB.
        """
        conv4 = self.features[: _CONV4_3_RELU + 1](x)  # (B, 512, H/8, W/8)
        conv5 = self.features[_CONV4_3_RELU + 1 :](conv4)  # (B, 512, H/8, W/8)
        out = self.extra(conv5)  # (B, 512, H/8, W/8)
        return {"conv4": conv4, "conv5": conv5, "out": out}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels, ceil(H/8), ceil(W/8))."""
        return self.extra(self.features(x))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters loaded from ImageNet: the 13 convs of ``features``."""
        return [p for p in self.features.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters without pretrained values: the extra convs (``extra.*``)."""
        return [p for p in self.extra.parameters() if p.requires_grad]


def vgg16(**kwargs) -> VGG16:
    """VGG-16 for the VOC configs: dilated conv5, three extra 3x3 512 convs, stride 8."""
    return VGG16(**kwargs)
