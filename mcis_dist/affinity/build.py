"""Building the AffinityNet of an experiment, and where its runs and checkpoints live."""

from __future__ import annotations

from mcis_dist.config import ExperimentConfig
from mcis_dist.models.affinitynet import AffinityNet
from mcis_dist.models.backbones import build_backbone

RUN_SUBDIR = "run"  # <affinity.out_url>/run/checkpoint_*/checkpoint.pt (Ray Train's layout)
LABELS_SUBDIR = "labels"  # <affinity.out_url>/labels/: the confident-label shards


def build_affinity_net(cfg: ExperimentConfig) -> AffinityNet:
    """AffinityNet on ``affinity.backbone`` (default: the classifier's ``model.backbone``), with
    the head widths scaled by ``affinity.head_width``; weights are loaded by the caller."""
    from mcis_dist.train.classifier import backbone_kwargs

    name = cfg.affinity.backbone or cfg.model.backbone
    same = name == cfg.model.backbone  # the classifier's BatchNorm / dropout choices carry over
    backbone = build_backbone(name, **(backbone_kwargs(cfg) if same else {}))
    return AffinityNet(backbone, width=cfg.affinity.head_width,
                       backbone_from_classifier=cfg.affinity.init_from_classifier)  # fmt: skip


def affinity_run_url(cfg: ExperimentConfig) -> str:
    return f"{cfg.affinity.out_url.rstrip('/')}/{RUN_SUBDIR}"


def labels_url(cfg: ExperimentConfig) -> str:
    return f"{cfg.affinity.out_url.rstrip('/')}/{LABELS_SUBDIR}"
