"""Optimiser groups and lr schedules of ``mcis_dist.runtime.optim`` (authors' VOC code, §4.4)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from torch import nn

from mcis_dist.config import TrainConfig
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.runtime.optim import (
    GROUP_NAMES,
    build_optimizer,
    lr_factor,
    make_scheduler,
    sgd_kernel,
)

LR, WD = 1e-3, 5e-4
MULT = dict(zip(GROUP_NAMES, [1.0, 2.0, 10.0, 20.0], strict=True))


class VGGLike(nn.Module):
    """A small backbone that follows the contract with pretrained ``features`` and new ``extra``
    layers (as VGG16), and a frozen first conv."""

    out_channels, output_stride = 8, 8

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 4, 1))
        self.extra = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.features[0].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.features(x))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.features.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.extra.parameters() if p.requires_grad]


def _mcis(backbone: nn.Module | None = None) -> MCISClassifier:
    torch.manual_seed(0)
    return MCISClassifier(backbone or build_backbone("resnet38_tiny"), num_classes=5)


def _by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _check_partition(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_mcis_groups_partition_with_lr_and_decay():
    model = _mcis()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen, "resnet38_tiny should freeze its BatchNorm"
    opt = build_optimizer(model, TrainConfig())
    _check_partition(model, opt)
    groups = _by_name(opt)
    # ResNet-38 convs have no bias and its BatchNorm is frozen: the empty group is skipped
    assert model.param_groups()["pretrained_bias"] == []
    assert list(groups) == ["pretrained_weight", "new_weight", "new_bias"]
    for name, g in groups.items():
        assert g["lr"] == pytest.approx(LR * MULT[name]) and g["lr_mult"] == MULT[name]
        assert g["weight_decay"] == (0.0 if name.endswith("bias") else WD)
        assert g["momentum"] == 0.9 and g["nesterov"] is True
        assert g["foreach"] is True and not g["fused"]  # CPU parameters
    assert _ids(groups["new_weight"]["params"]) == _ids(
        [model.w_p, model.phi.weight, model.w_b.weight, model.phi_coatt.weight]
    )
    assert _ids(groups["new_bias"]["params"]) == {id(model.phi.bias)}
    backbone = _ids(p for p in model.backbone.parameters() if p.requires_grad)
    assert _ids(groups["pretrained_weight"]["params"]) == backbone
    assert not _ids(frozen) & _ids(p for g in opt.param_groups for p in g["params"])


def test_vgg_like_new_layers_land_in_new_groups():
    model = _mcis(VGGLike())
    cfg = TrainConfig(lr=0.01, lr_mult=[1.0, 3.0, 7.0, 11.0], weight_decay=1e-4, nesterov=False)
    opt = build_optimizer(model, cfg)
    _check_partition(model, opt)
    groups = _by_name(opt)
    extra, feats = model.backbone.extra, model.backbone.features
    assert _ids([extra[0].weight, extra[2].weight]) <= _ids(groups["new_weight"]["params"])
    assert _ids(groups["new_bias"]["params"]) == _ids(
        [extra[0].bias, extra[2].bias, model.phi.bias]
    )
    assert _ids(groups["pretrained_weight"]["params"]) == {id(feats[2].weight)}
    assert _ids(groups["pretrained_bias"]["params"]) == {id(feats[2].bias)}
    for name, mult in zip(GROUP_NAMES, cfg.lr_mult, strict=True):
        assert groups[name]["lr"] == pytest.approx(0.01 * mult)
        assert groups[name]["weight_decay"] == (0.0 if name.endswith("bias") else 1e-4)
        assert groups[name]["nesterov"] is False


def test_plain_module_and_empty_groups():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    opt = build_optimizer(model, TrainConfig())
    _check_partition(model, opt)
    groups = _by_name(opt)
    assert _ids(groups["bias"]["params"]) == _ids([model[0].bias, model[1].bias])
    assert groups["bias"]["weight_decay"] == 0.0 and groups["weight"]["weight_decay"] == WD
    assert groups["weight"]["lr"] == groups["bias"]["lr"] == LR
    only_weights = build_optimizer(nn.Linear(4, 3, bias=False), TrainConfig())
    assert [g["name"] for g in only_weights.param_groups] == ["weight"]  # empty group skipped


def test_fused_sgd_only_when_all_parameters_are_on_cuda():
    assert sgd_kernel({"cuda"}) == {"fused": True}
    assert sgd_kernel({"cpu"}) == sgd_kernel({"cuda", "cpu"}) == {"foreach": True}


def test_step_schedule_boundaries():
    cfg, ipe = TrainConfig(step_epochs=[5, 10], gamma=0.1), 7
    want = {0: 1.0, 5 * ipe - 1: 1.0, 5 * ipe: 0.1, 10 * ipe - 1: 0.1, 10 * ipe: 0.01, 10**6: 0.01}
    for step, factor in want.items():
        assert lr_factor(step, cfg=cfg, iters_per_epoch=ipe) == pytest.approx(factor, rel=1e-12)
    model = _mcis(VGGLike())
    opt = build_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, ipe)
    for it in range(10 * ipe + 1):  # the lr each iteration trains with
        if it in want:
            for g in opt.param_groups:
                assert g["lr"] == pytest.approx(LR * g["lr_mult"] * want[it], rel=1e-12), it
        opt.step()
        sched.step()


def test_poly_schedule_matches_formula():
    cfg, ipe = TrainConfig(schedule="poly", epochs=15, poly_power=0.9), 13
    max_iter = 15 * ipe
    rng = random.Random(0)
    for step in [0, 1, max_iter - 1] + rng.sample(range(max_iter), 50):
        want = (1 - step / max_iter) ** 0.9
        assert lr_factor(step, cfg=cfg, iters_per_epoch=ipe) == pytest.approx(want, rel=1e-12)
    assert lr_factor(0, cfg=cfg, iters_per_epoch=ipe) == 1.0
    assert lr_factor(max_iter, cfg=cfg, iters_per_epoch=ipe) == 0.0
    assert lr_factor(max_iter + 5, cfg=cfg, iters_per_epoch=ipe) == 0.0


@pytest.mark.parametrize("schedule", ["step", "poly"])
def test_warmup_is_linear_then_the_schedule(schedule):
    warm, plain = TrainConfig(schedule=schedule, warmup_iters=10), TrainConfig(schedule=schedule)
    factors = [lr_factor(i, cfg=warm, iters_per_epoch=3) for i in range(40)]
    for step, got in enumerate(factors):
        want = lr_factor(step, cfg=plain, iters_per_epoch=3) * min(1.0, (step + 1) / 10)
        assert got == pytest.approx(want, rel=1e-12)
    assert factors[0] == pytest.approx(0.1)  # first iteration: 1/10 of the lr
    assert factors[9] == lr_factor(9, cfg=plain, iters_per_epoch=3)  # warm-up over


def _train(model, opt, sched, steps, start=0):
    """Deterministic fake gradients; returns the lr of every group at every iteration."""
    lrs = []
    for it in range(start, start + steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            p.grad = torch.full_like(p, ((it * 7 + i) % 5 - 2) * 0.1)
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("optimizer_first", [True, False])
@pytest.mark.parametrize("schedule", ["step", "poly"])
def test_scheduler_resume_is_exact(schedule, optimizer_first):
    cfg = TrainConfig(schedule=schedule, epochs=4, step_epochs=[1, 2], warmup_iters=3)
    ipe, total, cut = 4, 16, 6
    reference = _mcis(VGGLike())
    ref_opt = build_optimizer(reference, cfg)
    full = _train(reference, ref_opt, make_scheduler(ref_opt, cfg, ipe), total)
    assert len({row[0] for row in full}) >= 5, "the schedule should change the lr"

    model = _mcis(VGGLike())
    opt = build_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, ipe)
    first = _train(model, opt, sched, cut)
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.save(state, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # checkpoints load with weights_only

    model2 = _mcis(VGGLike())
    model2.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(model2, cfg)
    if optimizer_first:
        opt2.load_state_dict(ckpt["opt"])
        sched2 = make_scheduler(opt2, cfg, ipe)
        sched2.load_state_dict(ckpt["sched"])
    else:
        sched2 = make_scheduler(opt2, cfg, ipe)
        sched2.load_state_dict(ckpt["sched"])
        opt2.load_state_dict(ckpt["opt"])
    assert sched2.last_epoch == cut
    rest = _train(model2, opt2, sched2, total - cut, start=cut)
    assert first + rest == full  # identical lrs at every iteration, every group

    for a, b in zip(reference.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)  # momentum buffers resumed too


def test_bad_arguments():
    cfg = TrainConfig()
    for ipe in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="iters_per_epoch"):
            lr_factor(0, cfg=cfg, iters_per_epoch=ipe)
    for step in (-1, 1.0, "3"):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            lr_factor(step, cfg=cfg, iters_per_epoch=4)
    assert lr_factor(np.int64(70), cfg=cfg, iters_per_epoch=np.int64(7)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="lr_mult needs 4"):
        build_optimizer(_mcis(), TrainConfig(lr_mult=[1.0, 2.0, 10.0]))
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), cfg)
    model = nn.Linear(2, 2)
    model.param_groups = lambda: {"new_weight": [model.weight], "head": [model.bias]}
    with pytest.raises(ValueError, match="unknown groups"):
        build_optimizer(model, cfg)
    model.param_groups = lambda: {"new_weight": [model.weight], "new_bias": [model.weight]}
    with pytest.raises(ValueError, match="two lr groups"):
        build_optimizer(model, cfg)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    with pytest.raises(ValueError, match="iters_per_epoch must be an int >= 1, got 0"):
        make_scheduler(opt, cfg, 0)
