"""``mcis affinity``: confident labels from the CAMs, then AffinityNet on Ray Train (paper §4.4).

1. ``make_labels`` (``mcis_dist.masks.stage``) turns every CAM into a confident label map (0
   background, k+1 class k, 255 unsure) on a pool of Ray actors, as label shards in
   ``<affinity.out_url>/labels`` (resumable, skipped when complete).
2. AffinityNet trains on crops of the images joined with those labels (``JointLoader``) with the
   three-term loss bg_pos/4 + fg_pos/4 + neg/2 over the pairs within ``affinity.radius`` at
   stride 8, through the training machinery every stage shares (``mcis_dist.runtime.trainer``:
   optimiser groups, poly schedule, AMP, DDP, checkpoints to ``<affinity.out_url>/run``, exact
   resume, ``max_failures``). Its backbone starts from the classifier checkpoint's backbone
   (``affinity.init_from_classifier``; no ImageNet weights are needed).
"""

from __future__ import annotations

import torch

from mcis_dist.affinity.labels import downsample_labels
from mcis_dist.affinity.loss import affinity_loss, pair_offsets
from mcis_dist.config import ExperimentConfig
from mcis_dist.data.joint import JointLoader
from mcis_dist.formats.cams import read_cam_manifest
from mcis_dist.formats.labels import read_label_manifest
from mcis_dist.masks.stage import make_labels
from mcis_dist.models.affinitynet import AffinityNet
from mcis_dist.models.build import build_affinity_net
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.paths import absolute_paths, affinity_run_url, endpoint_url, labels_url
from mcis_dist.runtime.sharded import StageError
from mcis_dist.runtime.trainer import Built, Stage, TrainingError, fit
from mcis_dist.train.validate import affinity_validator

__all__ = ["affinity_stage", "train_affinity", "affinity_step_loss"]


def affinity_step_loss(net_or_ddp, images: torch.Tensor, labels: torch.Tensor, offsets):
    """(terms, images): the embedding of the crops, their affinities on ``offsets`` and the
    three-term loss against the stride-8 labels."""
    feats = net_or_ddp(images).float()  # (B, D, h, w)
    aff, _valid = AffinityNet.affinities(feats, offsets)  # (B, O, h, w); 0 off the grid
    small = downsample_labels(labels, 8)  # (B, h, w)
    small = small[..., : feats.shape[-2], : feats.shape[-1]]
    total, parts = affinity_loss(aff, small, offsets)
    terms = {"total": total}
    terms.update({k: torch.as_tensor(v, dtype=torch.float32) for k, v in parts.items()})
    return terms, images.shape[0]


def affinity_stage(cfg: ExperimentConfig, rank: int, world: int, device) -> Built:
    """AffinityNet's pieces on one Ray Train worker."""

    loader = JointLoader(
        _image_url(cfg),
        labels_url(cfg),
        cfg.affinity.data,
        mean=cfg.data.mean,
        std=cfg.data.std,
        rank=rank,
        world_size=world,
        device=device,
        endpoint_url=endpoint_url(cfg),
    )
    net = build_affinity_net(cfg)
    if cfg.affinity.init_from_classifier:
        state, where = ckpt.classifier_checkpoint(cfg, cfg.cams.checkpoint)
        try:
            net.load_backbone_from_classifier(state)
        except ValueError as e:
            raise TrainingError(f"AffinityNet backbone from {where}: {e}") from None
    net = net.to(device)
    offsets = pair_offsets(cfg.affinity.radius)

    def loss(wrapped, batch, epoch):
        return affinity_step_loss(wrapped, batch["image"], batch["label"], offsets)

    def loader_metrics() -> dict:
        stats = loader.stats() if callable(loader.stats) else loader.stats
        return {f"loader_{k}": v for k, v in stats.items() if isinstance(v, int | float)}

    validate = None
    if cfg.affinity.train.val_every_epochs:  # random walk of affinity.val_cams_url, scored
        validate = affinity_validator(cfg, net, rank, world, device)
    return Built(
        model=net, loader=loader, loss=loss, loader_metrics=loader_metrics, validate=validate
    )


def _image_url(cfg: ExperimentConfig) -> str:

    manifest, _ = read_label_manifest(labels_url(cfg), endpoint_url(cfg))
    return manifest["source"]["url"]


def check_affinity(cfg: ExperimentConfig) -> None:
    _image_url(cfg)  # the labels exist and name their images
    if cfg.affinity.train.val_every_epochs:
        if cfg.affinity.val_cams_url is None:
            raise TrainingError(
                "affinity.train.val_every_epochs needs affinity.val_cams_url: the CAMs of a "
                "split with masks, e.g. `mcis cams cams.split_url=<shards>/val "
                "cams.out_url=<folder>`"
            )
        try:
            read_cam_manifest(cfg.affinity.val_cams_url, endpoint_url(cfg))
        except StageError as e:
            raise TrainingError(f"affinity.val_cams_url: {e}") from None


def train_affinity(cfg: ExperimentConfig, log=print):
    """Confident labels (skipped when complete), then AffinityNet training (resumes)."""

    cfg = absolute_paths(cfg)
    make_labels(cfg, log=log)
    return fit(cfg, STAGE, "affinity.train", log)


def run_url(cfg: ExperimentConfig) -> str:
    return affinity_run_url(cfg)


STAGE = Stage(
    "affinity",
    lambda cfg: cfg.affinity.train,
    run_url,
    affinity_stage,
    check_affinity,
    terms=("bg_pos", "fg_pos", "neg"),
)
