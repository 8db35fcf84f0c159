"""Frozen BatchNorm for backbones fine-tuned from ImageNet weights with small batches."""

from __future__ import annotations

from torch import nn


def batchnorms(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class FrozenBatchNormMixin:
    """``freeze_bn()`` puts every BatchNorm in eval mode (running statistics, no updates) and
    stops its gradients; it stays in force across ``train()``, which switches everything else to
    training mode and puts the BatchNorm layers straight back into eval mode. Mix in before
    ``nn.Module``; the subclass sets ``self.frozen_bn = False`` in ``__init__``."""

    frozen_bn: bool = False

    def freeze_bn(self) -> None:
        self.frozen_bn = True
        for m in batchnorms(self):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            for m in batchnorms(self):
                m.eval()
        return self
