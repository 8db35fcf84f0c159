"""Optimiser and learning-rate schedule of the co-attention classifier.

The authors' VOC code: SGD with Nesterov momentum 0.9, weight decay 5e-4 and
none on biases, base lr 1e-3 scaled per group: pretrained weights ×1, pretrained biases ×2, new
layers' weights ×10 and biases ×20; the lr drops ×0.1 at epochs 5 and 10 ("step"). The LID
config (paper §4.4) uses poly decay (1 - iter/max_iter)^0.9 instead ("poly").

The schedule is a pure function of the global iteration (:func:`lr_factor`), so the scheduler's
state is just its step count: it round-trips through ``state_dict()`` (plain numbers only, safe
for ``torch.load(weights_only=True)``) and a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mcis_dist.config import TrainConfig
from mcis_dist.models.params import GROUP_NAMES

__all__ = ["GROUP_NAMES", "build_optimizer", "lr_factor", "make_scheduler", "sgd_kernel"]

#: ``MCISClassifier.param_groups()`` keys, in the order of ``TrainConfig.lr_mult``.


def _named_groups(model: nn.Module, lr_mult: list[float]) -> list[tuple[str, float, list]]:
    """(name, lr multiplier, parameters) of every group, empty groups included."""
    split = getattr(model, "param_groups", None)
    if callable(split):
        groups = split()
        unknown = set(groups) - set(GROUP_NAMES)
        if unknown:
            raise ValueError(
                f"param_groups() gave unknown groups {sorted(unknown)}; valid: {GROUP_NAMES}"
            )
        return [(n, m, list(groups.get(n, []))) for n, m in zip(GROUP_NAMES, lr_mult, strict=True)]
    # a model without the split: everything counts as one pretrained group (×1), but biases
    # still go without weight decay, so weights and biases are two groups
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    return [("weight", 1.0, weights), ("bias", 1.0, biases)]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over the lr groups of the authors' VOC code (see the module docstring).

    One group per non-empty entry of ``model.param_groups()`` (``MCISClassifier``): lr =
    ``cfg.lr * mult`` with ``mult`` from ``cfg.lr_mult`` [pretrained weight, pretrained bias,
    new weight, new bias], weight decay ``cfg.weight_decay`` on weights and 0 on biases.
    Every group keeps ``group["name"]`` and ``group["lr_mult"]`` for the schedule and logs.
    A model without ``param_groups()`` gets groups "weight" and "bias", both ×1.

    torch's fused SGD (``fused=True``, chosen when every parameter is on CUDA) replaces the
    authors' apex optimiser; elsewhere the multi-tensor ``foreach`` path is used.
    """
    if len(cfg.lr_mult) != len(GROUP_NAMES):
        raise ValueError(f"lr_mult needs 4 values {GROUP_NAMES}, got {cfg.lr_mult}")
    groups: list[dict[str, Any]] = []
    for name, mult, params in _named_groups(model, cfg.lr_mult):
        if params:
            decay = 0.0 if name.endswith("bias") else cfg.weight_decay
            group = {"params": params, "name": name, "lr_mult": float(mult)}
            groups.append({**group, "lr": cfg.lr * mult, "weight_decay": decay})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in two lr groups")
            seen.add(id(p))
    kernel = sgd_kernel({p.device.type for g in groups for p in g["params"]})
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernel
    )


def sgd_kernel(device_types: set[str]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is on CUDA (torch's fused SGD, the apex
    replacement; apex is not on PyPI), else ``{"foreach": True}`` (multi-tensor, any device)."""
    return {"fused": True} if device_types == {"cuda"} else {"foreach": True}


def _count(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum (numpy ints too), or a ValueError naming it."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return number


def lr_factor(step: int, *, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """Multiplier of every group's lr at global iteration ``step`` (0-based, whole run).

    * "step" (VOC, authors' code): ``gamma ** #{e in step_epochs : e <= step // iters_per_epoch}``,
      i.e. ×0.1 from the first iteration of epochs 5 and 10;
    * "poly" (LID, paper §4.4): ``(1 - step / max_iter) ** poly_power`` with
      ``max_iter = epochs * iters_per_epoch``, 0 from ``max_iter`` on;
    * ``warmup_iters > 0`` multiplies by ``min(1, (step + 1) / warmup_iters)``.
    """
    iters_per_epoch = _count(iters_per_epoch, "iters_per_epoch", 1)
    step = _count(step, "step", 0)
    if cfg.schedule == "step":
        epoch = step // iters_per_epoch
        factor = cfg.gamma ** sum(1 for e in cfg.step_epochs if e <= epoch)
    elif cfg.schedule == "poly":
        max_iter = cfg.epochs * iters_per_epoch
        factor = max(0.0, 1.0 - step / max_iter) ** cfg.poly_power
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: 'step', 'poly'")
    if cfg.warmup_iters > 0:
        factor *= min(1.0, (step + 1) / cfg.warmup_iters)
    return float(factor)


class _IterationLR(LambdaLR):
    """LambdaLR whose ``load_state_dict`` also puts the restored step's lr into the groups, so
    resuming is exact whether the optimizer state is loaded before or after the scheduler."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        step = self.last_epoch
        lrs = [b * fn(step) for b, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int
) -> LambdaLR:
    """Per-iteration scheduler: call ``step()`` after every ``optimizer.step()``.

    Group lr at iteration ``i`` = ``cfg.lr * group["lr_mult"] * lr_factor(i)`` (the base lr of
    each group is the one :func:`build_optimizer` gave it). ``state_dict()`` holds only numbers.
    """
    lr_factor(0, cfg=cfg, iters_per_epoch=iters_per_epoch)  # validate before building

    def factor(step: int) -> float:  # a plain function: LambdaLR stores no state for it
        return lr_factor(step, cfg=cfg, iters_per_epoch=iters_per_epoch)

    return _IterationLR(optimizer, factor)
