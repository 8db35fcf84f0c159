"""Parameter groups for the learning-rate multipliers of psa and MCIS (Sec. 4.1's training
settings): weights and biases of the pretrained backbone, and of the layers added on top."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

#: the groups, in the order of ``lr_mult`` in the configs (x1, x2, x10, x20 by default)
GROUP_NAMES = ("pretrained_weight", "pretrained_bias", "new_weight", "new_bias")


def lr_groups(
    named: Iterable[tuple[str, nn.Parameter]], new: set[int]
) -> dict[str, list[nn.Parameter]]:
    """The trainable ones of ``named`` by group: ``new`` holds the ``id`` of every new
    parameter; biases and 0-d parameters (a learnt temperature) go with the biases (no weight
    decay); BatchNorm scales count as weights. Frozen parameters are left out."""
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in GROUP_NAMES}
    for name, p in named:
        if p.requires_grad:
            kind = "bias" if name.endswith("bias") or p.dim() == 0 else "weight"
            groups[f"{'new' if id(p) in new else 'pretrained'}_{kind}"].append(p)
    return groups
