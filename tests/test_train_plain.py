"""The co-attention classifier trains in a plain torch loop on pairs from the loader (no Ray):
the model, the losses, the authors' parameter groups and both loader backends together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcis_dist.config import DataConfig
from mcis_dist.data.loader import PairLoader
from mcis_dist.losses import mcis_loss
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import LocalStorage

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
