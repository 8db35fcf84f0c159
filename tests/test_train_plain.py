"""The co-attention classifier trains in a plain torch loop on pairs from the loader (no Ray):
the model, the losses, the authors' parameter groups and both loader backends together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcis_dist.config import DataConfig, load_config
from mcis_dist.data.loader import PairLoader
from mcis_dist.losses import mcis_loss
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.build import build_model
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import LocalStorage
from mcis_dist.train.classifier import (
    LossView,
    _after_epoch,
    _before_epoch,
    classifier_loss,
    gate_warning,
)

LR_MULT = {"pretrained_weight": 1, "pretrained_bias": 2, "new_weight": 10, "new_bias": 20}


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    opts = BuildOptions(shard_size_mb=0.1, workers=1, progress=False)
    build_dataset(
        "synthetic",
        LocalStorage(out),
        opts,
        ["train"],
        {"spec": SyntheticSpec(num_train=96, num_val=4)},
        log=lambda *_: None,
    )
    return out / "train"


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_classifier_trains_on_pairs_in_a_plain_loop(train_split, backend, one_thread):
    torch.manual_seed(0)
    cfg = DataConfig(
        train_url=str(train_split),
        backend=backend,
        batch_size=4,
        num_workers=1,
        mp_context="fork",
        crop_size=64,
        resize_long=[64, 96],
        pool_size=32,
    )
    loader = PairLoader(cfg, rank=0, world_size=1, device="cpu")
    model = MCISClassifier(build_backbone("resnet38_tiny"), num_classes=8)
    groups = model.param_groups()
    base_lr = 0.01
    optimizer = torch.optim.SGD(
        [
            {
                "params": ps,
                "lr": base_lr * LR_MULT[name],
                "weight_decay": 0 if "bias" in name else 5e-4,
            }
            for name, ps in groups.items()
            if ps
        ],
        momentum=0.9,
    )
    assert sum(len(p) for p in groups.values()) == sum(
        1 for p in model.parameters() if p.requires_grad
    )
    history = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        model.train()
        for batch in loader:
            out = model(batch["image_m"], batch["image_n"], batch["pair_type"])
            terms = mcis_loss(out, batch["labels_m"], batch["labels_n"], epoch=epoch)
            optimizer.zero_grad()
            terms["total"].backward()
            optimizer.step()
            assert torch.isfinite(terms["total"])
            history.append({k: float(v.detach()) for k, v in terms.items()})
    n = len(loader)
    first = np.mean([h["single"] + h["coattention"] for h in history[:n]])
    last = np.mean([h["single"] + h["coattention"] for h in history[-n:]])
    assert last < first - 0.05, (first, last)
    # the contrastive term joins the total from epoch 2 on (authors' schedule)
    early = history[n - 1]
    assert early["total"] == pytest.approx(early["single"] + early["coattention"], rel=1e-5)
    late = history[-1]
    assert late["total"] == pytest.approx(
        late["single"] + late["coattention"] + late["contrastive"], rel=1e-5
    )


def test_gate_warning_only_when_the_contrastive_term_is_on_and_the_gate_closed():
    on = {"contrastive_from_epoch": 2, "contrastive_weight": 1.0}
    line = gate_warning([0.001, 0.0014], 2, **on)
    assert line.startswith("warning: the contrastive gate B (Eq. 6) stayed closed")
    assert "(mean 0.0012 < 0.01)" in line and "Eq. 9 is training phi_co" in line
    assert "model.phi_co_bias / train.contrastive_classes" in line
    assert gate_warning([0.001], 1, **on) is None  # before the contrastive term starts
    assert gate_warning([0.001], 5, contrastive_from_epoch=0, contrastive_weight=0.0) is None
    assert gate_warning([0.005, 0.02], 3, **on) is None  # mean 0.0125: open enough
    assert gate_warning([], 3, **on) is None  # no diagnostics
    assert gate_warning([0.2], 3, threshold=0.5, **on) is not None


def test_classifier_loss_passes_the_gate_switches_and_warns_per_epoch(one_thread):
    """The trainer's loss with model.phi_co_bias and train.contrastive_classes=pair is Eq. 10 with
    those options; each step's gate mean is kept for the epoch's check, which prints the warning
    (rank 0) and reports gate_dead."""
    cfg = load_config(
        None,
        [
            "model.phi_co_bias=true",
            "train.contrastive_classes=pair",
            "train.contrastive_from_epoch=1",
            "train.epochs=3",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4)
    assert model.phi_co.bias is not None
    view, gate_values = LossView(model), []
    loss, start = classifier_loss(cfg, gate_values), _before_epoch(cfg, view, gate_values)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image_m": torch.randn(2, 3, 32, 32, generator=g),
        "image_n": torch.randn(2, 3, 32, 32, generator=g),
        "labels_m": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]),
        "labels_n": torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0]]),
        "pair_type": torch.zeros(2, dtype=torch.long),
    }
    start(1)
    terms, images = loss(view, batch, 1)
    want = mcis_loss(
        view.last,
        batch["labels_m"],
        batch["labels_n"],
        epoch=1,
        contrastive_from_epoch=1,
        contrastive_classes="pair",
    )
    assert images == 4
    for key in ("contrastive_m", "contrastive_n", "total"):
        torch.testing.assert_close(terms[key], want[key])
    assert gate_values == [pytest.approx(float(terms["attn_gate_mean"]))]
    lines = []
    check = _after_epoch(cfg, gate_values, rank=0, log=lines.append)
    metrics = check(1)  # a fresh W_B: the gate is open (~0.5)
    assert metrics["gate_dead"] == 0.0 and 0.05 < metrics["attn_gate_epoch_mean"] < 0.95
    assert lines == []
    gate_values[:] = [0.001, 0.002]
    assert check(2) == {"attn_gate_epoch_mean": pytest.approx(0.0015), "gate_dead": 1.0}
    assert len(lines) == 1
    assert lines[0].startswith("[train-cls] epoch 3/3 warning: the contrastive gate B (Eq. 6)")
    assert _after_epoch(cfg, gate_values, rank=1, log=lines.append)(2)["gate_dead"] == 1.0
    assert len(lines) == 1  # only rank 0 logs
    start(2)
    assert gate_values == [] and _after_epoch(cfg, gate_values, rank=0)(2) == {}
