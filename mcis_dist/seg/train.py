"""``mcis seg``: the segmentation network trained on the pseudo masks (paper §3.2-§3.3, §4.4).

DeepLab (``seg.arch``: V3 with ASPP for LID, LargeFOV for the VOC route; ``build_segmenter``)
trains on crops of the images joined with their pseudo masks (``JointLoader`` over
``seg.masks_url`` and the image split its manifest names), with the pixel-wise cross-entropy

    L = −1/|Ω| Σ_{p ∈ Ω} log softmax(f(x))_{p, y_p},   Ω = {p : y_p ≠ 255}

through the training machinery every stage shares (``mcis_dist.runtime.trainer``: lr groups, poly
schedule, AMP, DDP, checkpoints to ``<seg.out_url>/run``, exact resume, ``max_failures``).
``seg.global_batch`` (LID: 48 over 4 GPUs) is split evenly across the workers.

:func:`load_segmenter` is how evaluation and prediction get the trained network back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml

from mcis_dist.config import ExperimentConfig, config_from_dict, write_run_config
from mcis_dist.data.joint import JointLoader
from mcis_dist.data.loader import LoaderError, open_manifest
from mcis_dist.formats.labels import IGNORE, read_label_manifest
from mcis_dist.models.deeplab import build_segmenter
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.paths import absolute_paths, absolute_url, endpoint_url
from mcis_dist.runtime.sharded import StageError
from mcis_dist.runtime.trainer import Built, Stage, TrainingError, fit
from mcis_dist.storage import StorageError, open_storage

__all__ = [
    "check_seg",
    "load_segmenter",
    "run_url",
    "seg_data_config",
    "seg_stage",
    "seg_step_loss",
    "train_seg",
]


# ------------------------------------------------------------------------------------ the loss
def seg_step_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """(terms, images): cross-entropy of the logits against the labels, 255 left out.

    A batch without a single labelled pixel gives a zero loss (with a graph, so every DDP rank
    still all-reduces), not the NaN of an empty mean."""
    logits = model(images)  # (B, C, H, W)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    loss = total / (labels != IGNORE).sum().clamp(min=1)
    return {"total": loss, "ce": loss}, images.shape[0]


# ----------------------------------------------------------------------------------- the stage
def seg_data_config(cfg: ExperimentConfig, world: int):
    """``seg.data``, with the per-rank batch ``seg.global_batch // world`` when a global batch
    is set (it must divide evenly)."""
    data = cfg.seg.data
    if cfg.seg.global_batch is None:
        return data
    if cfg.seg.global_batch % world:
        raise TrainingError(
            f"seg.global_batch={cfg.seg.global_batch} does not split evenly over "
            f"seg.train.num_workers={world} workers; make it a multiple of {world}"
        )
    return data.model_copy(update={"batch_size": cfg.seg.global_batch // world})


def _masks(cfg: ExperimentConfig) -> tuple[dict, str]:
    """(manifest, where) of the pseudo-mask folder."""

    try:
        manifest, storage = read_label_manifest(cfg.seg.masks_url, endpoint_url(cfg))
    except StageError as e:
        raise TrainingError(f"seg.masks_url: {e}") from None
    return manifest, storage.describe()


def seg_stage(cfg: ExperimentConfig, rank: int, world: int, device) -> Built:
    """DeepLab's pieces on one Ray Train worker."""

    manifest, _ = _masks(cfg)
    loader = JointLoader(
        manifest["source"]["url"],
        cfg.seg.masks_url,
        seg_data_config(cfg, world),
        mean=cfg.data.mean,
        std=cfg.data.std,
        rank=rank,
        world_size=world,
        device=device,
        endpoint_url=endpoint_url(cfg),
    )
    try:
        model = build_segmenter(cfg, num_classes=len(loader.classes) + 1).to(device)
    except ValueError as e:  # a bad arch/backbone combination, weights for another backbone
        raise TrainingError(f"seg model: {e}") from None
    memory = torch.channels_last if cfg.seg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)

    def loss(wrapped, batch, epoch):
        return seg_step_loss(wrapped, batch["image"].to(memory_format=memory), batch["label"])

    def loader_metrics() -> dict:
        stats = loader.stats()
        return {f"loader_{k}": v for k, v in stats.items() if isinstance(v, int | float)}

    return Built(model=model, loader=loader, loss=loss, loader_metrics=loader_metrics)


def check_seg(cfg: ExperimentConfig) -> None:
    """Before any worker starts: the masks exist, their classes are the val split's (when there
    is one), and the global batch splits over the workers."""

    manifest, where = _masks(cfg)
    seg_data_config(cfg, cfg.seg.train.num_workers)
    val = open_storage(cfg.seg.val_url, endpoint_url=endpoint_url(cfg))
    try:
        if not val.exists("manifest.json"):
            return
        val_manifest, _ = open_manifest(cfg.seg.val_url, endpoint_url(cfg), check_shards=False)
    except (LoaderError, StorageError) as e:
        raise TrainingError(f"seg.val_url: {e}") from None
    if list(val_manifest["classes"]) != list(manifest["classes"]):
        raise TrainingError(
            f"the pseudo masks {where} have classes {manifest['classes']}, but the val split "
            f"{val.describe()} has {val_manifest['classes']}: they must be the same list, in "
            f"the same order"
        )


def run_url(cfg: ExperimentConfig) -> str:
    """Where checkpoints and metrics go: ``<seg.out_url>/run``."""
    return f"{cfg.seg.out_url.rstrip('/')}/run"


STAGE = Stage("seg", lambda cfg: cfg.seg.train, run_url, seg_stage, check_seg, terms=("ce",))


def train_seg(cfg: ExperimentConfig, log=print):
    """Train (or resume) the segmentation network; returns Ray's ``Result``."""

    cfg = absolute_paths(cfg)  # Ray workers run in another working directory
    check_seg(cfg)  # before the run folder is made
    run = open_storage(run_url(cfg), endpoint_url=endpoint_url(cfg))
    run.check_writable()
    write_run_config(cfg, run)
    return fit(cfg, STAGE, "seg.train", log)


# ------------------------------------------------------------------------------- the trained net
def _abs(url: str | None) -> str | None:

    return url if url is None else absolute_url(url)


def load_segmenter(cfg: ExperimentConfig, checkpoint: str | None = None):
    """(model in eval mode on the CPU, classes, where) of a trained segmentation network: the
    given checkpoint (folder or ``.pt``, local or s3://) or the newest ``checkpoint_*`` of
    :func:`run_url`. The network is built from ``cfg.seg`` (no pretrained weights: the
    checkpoint has them all); the classes come from the pseudo masks the checkpoint was trained
    on (its own config), else from ``seg.masks_url``."""

    endpoint = endpoint_url(cfg)
    url = _abs(checkpoint)
    if url is None:
        run = open_storage(_abs(run_url(cfg)), endpoint_url=endpoint)
        newest = ckpt.newest_checkpoint(run)
        if newest is None:
            raise StageError(
                f"no segmentation checkpoint under {run.describe()}: run `mcis seg` with this "
                f"config first, or name one with --checkpoint"
            )
        url = run.describe(newest)
    saved, where = ckpt.load_from(url, endpoint_url=endpoint)
    if not isinstance(saved, dict) or "model" not in saved:
        raise StageError(f"{where} is not a checkpoint (it has no 'model' entry)")
    if saved.get("stage", "seg") != "seg":
        raise StageError(f"{where} is a {saved['stage']!r} checkpoint, not a segmentation one")
    trained = _checkpoint_config(saved)
    classes = _classes(cfg, trained, where)
    build_cfg = cfg.model_copy(deep=True)
    build_cfg.seg.weights = None
    try:
        model = build_segmenter(build_cfg, num_classes=len(classes) + 1)
    except ValueError as e:  # a bad arch/backbone combination
        raise StageError(f"seg model: {e}") from None
    try:
        ckpt.load_model_state(model, saved["model"], where=f"checkpoint {where}")
    except ckpt.CheckpointError as e:
        mine = {k: getattr(cfg.seg, k) for k in ("arch", "backbone")}
        theirs = {k: trained.seg.model_dump().get(k) for k in mine} if trained else "unknown"
        raise StageError(
            f"{e} (this config's seg: {mine}; the checkpoint's: {theirs}; "
            f"{len(classes)} classes + background)"
        ) from None
    return model.eval(), classes, where


def _checkpoint_config(saved: dict) -> ExperimentConfig | None:
    """The experiment config a checkpoint was trained with (None if it has none)."""

    text = saved.get("config")
    if not text:
        return None
    try:
        return config_from_dict(yaml.safe_load(text), ExperimentConfig, source="<checkpoint>")
    except Exception:  # an older or foreign config: fall back to this one's masks
        return None


def _classes(cfg: ExperimentConfig, trained: ExperimentConfig | None, where: str) -> list[str]:

    tried = []
    for c in (trained, cfg):
        if c is None or c.seg.masks_url in tried:
            continue
        tried.append(c.seg.masks_url)
        try:
            manifest, _ = read_label_manifest(_abs(c.seg.masks_url), endpoint_url(cfg))
        except Exception:  # noqa: S112 - not reachable from here: try the next
            continue
        return list(manifest["classes"])
    raise StageError(
        f"the classes of {where} are unknown: none of the pseudo-mask folders {tried} (the "
        f"checkpoint's seg.masks_url, this config's) has a readable manifest.json"
    )
