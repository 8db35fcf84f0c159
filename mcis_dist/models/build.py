"""The networks of an experiment, built from its config: the co-attention classifier (with its
backbone and weights) and AffinityNet. No Ray, no data: every stage builds its model here."""

from __future__ import annotations

from mcis_dist.config import ExperimentConfig
from mcis_dist.models import weights
from mcis_dist.models.affinitynet import AffinityNet
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier

__all__ = ["WHEEL_WEIGHTS", "backbone_kwargs", "build_affinity_net", "build_model"]

#: backbones whose builder takes ``pretrained`` (ImageNet weights shipped with their package)
WHEEL_WEIGHTS = ("efficientnet_lite0",)


def backbone_kwargs(cfg: ExperimentConfig) -> dict[str, bool | float | str | None]:
    """Builder arguments from ``model.freeze_bn`` / ``model.backbone_dropout`` (ResNet-38
    family only, checked by the schema) and ``model.pretrained`` (backbones that ship their
    ImageNet weights); unset options keep the backbone's defaults."""
    kwargs: dict[str, bool | float | str | None] = {}
    if cfg.model.freeze_bn is not None:
        kwargs["frozen_bn"] = cfg.model.freeze_bn
    if cfg.model.backbone_dropout is not None:
        kwargs["dropout_b6"], kwargs["dropout_b7"] = cfg.model.backbone_dropout
    if cfg.model.backbone in WHEEL_WEIGHTS:  # its builder loads the weights (and freezes BN):
        kwargs["pretrained"] = cfg.model.pretrained  # its package's ImageNet file,
        kwargs["weights"] = cfg.model.weights  # or this file instead when set
    return kwargs


def build_model(cfg: ExperimentConfig, num_classes: int) -> MCISClassifier:
    backbone = build_backbone(cfg.model.backbone, **backbone_kwargs(cfg))
    if cfg.model.weights:
        if cfg.model.backbone == "vgg16":
            weights.load_torchvision_vgg16(backbone, cfg.model.weights)
        elif cfg.model.backbone in WHEEL_WEIGHTS:
            pass  # already loaded by its builder (backbone_kwargs)
        else:
            weights.load_state_dict_file(backbone, cfg.model.weights)
    return MCISClassifier(
        backbone,
        num_classes=num_classes,
        domains=cfg.model.domains,
        shared_phi=cfg.model.shared_phi,
        phi_co_bias=cfg.model.phi_co_bias,
        chunk_size=cfg.model.chunk_size,
        affinity=cfg.model.affinity,
        temperature=cfg.model.temperature,
        learn_temperature=cfg.model.learn_temperature,
        w_p_init=cfg.model.w_p_init,
        freeze_backbone=cfg.model.freeze_backbone,
    )


def build_affinity_net(cfg: ExperimentConfig) -> AffinityNet:
    """AffinityNet on ``affinity.backbone`` (default: the classifier's ``model.backbone``), with
    the head widths scaled by ``affinity.head_width``; weights are loaded by the caller."""
    name = cfg.affinity.backbone or cfg.model.backbone
    same = name == cfg.model.backbone  # the classifier's BatchNorm / dropout choices carry over
    backbone = build_backbone(name, **(backbone_kwargs(cfg) if same else {}))
    return AffinityNet(
        backbone,
        width=cfg.affinity.head_width,
        backbone_from_classifier=cfg.affinity.init_from_classifier,
    )
