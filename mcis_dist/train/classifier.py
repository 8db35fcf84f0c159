"""``mcis train-cls``: the co-attention classifier on Ray Train.

The classifier plugs into the training machinery every trained stage shares
(``mcis_dist.runtime.trainer``: optimiser, schedule, AMP, DDP, checkpoints, exact resume, metrics,
fault tolerance) with ``classifier_stage``: its model (plus SEAM's PCM), its pair loader, and its
loss (Eq. 10, with the authors' self-pair terms and SEAM's as options). After each epoch it
warns when the contrastive gate B of Eq. 6 stayed closed (``gate_warning``).

Fault tolerance is Ray's: ``max_failures`` restarts the worker group from the newest checkpoint
when a worker dies, and re-running the same command (same ``name``, same ``run_root``) after the
driver died resumes the run from its storage.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import torch

from mcis_dist.config import ExperimentConfig
from mcis_dist.data.loader import LoaderError, PairLoader, open_manifest
from mcis_dist.data.pairs import pair_metrics
from mcis_dist.losses import LossWeights, mcis_loss, self_pair_loss, self_pair_views
from mcis_dist.models.build import build_model
from mcis_dist.models.diagnostics import label_free
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.models.seam import PixelCorrelationModule, seam_cams, seam_losses, seam_view
from mcis_dist.runtime.paths import absolute_paths, endpoint_url, stage_url
from mcis_dist.runtime.trainer import Built, Stage, TrainingError, fit, gather, run_epoch
from mcis_dist.train.validate import classifier_validator

RUN_SUBDIR = "cls"
GATE_CLOSED = 0.01  # an epoch's mean gate B (Eq. 6) below this: the gate counts as closed


# ------------------------------------------------------------------------------- building blocks
def build_pcm(cfg: ExperimentConfig, backbone) -> torch.nn.Module | None:
    """SEAM's PCM on the backbone's conv4/conv5 taps (ResNet-38 family), when train.seam."""
    if not cfg.train.seam:
        return None

    channels = getattr(backbone, "feature_channels", {})
    if not {"conv4", "conv5"} <= set(channels):
        raise TrainingError(
            f"train.seam needs a backbone with conv4/conv5 taps (resnet38, resnet38_tiny); "
            f"model.backbone={cfg.model.backbone!r} has {sorted(channels) or 'none'}"
        )
    return PixelCorrelationModule(low_channels=channels["conv4"], high_channels=channels["conv5"])


class _Trainable(torch.nn.Module):
    """The classifier plus the PCM, for the optimizer: the PCM's parameters are new (x10/x20)."""

    def __init__(self, net: MCISClassifier, pcm: torch.nn.Module | None):
        super().__init__()
        self.net, self.pcm = net, pcm

    def param_groups(self) -> dict[str, list]:
        groups = self.net.param_groups()
        if self.pcm is not None:
            for name, p in self.pcm.named_parameters():
                groups["new_bias" if name.endswith("bias") else "new_weight"].append(p)
        return groups


def loss_weights(cfg: ExperimentConfig) -> LossWeights:
    t = cfg.train
    return LossWeights(
        single=t.loss_single, coattention=t.loss_coattention, contrastive=t.loss_contrastive
    )


def _view(model) -> LossView:
    return model.module if hasattr(model, "module") else model


OUTPUTS = ("single_m", "single_n", "coatt_m", "coatt_n", "contrast_m", "contrast_n")


class LossView(torch.nn.Module):
    """What DDP wraps: the classifier, returning only the outputs the loss uses this epoch.

    DDP expects a gradient for every parameter reachable from the forward outputs. Before the
    contrastive loss starts (authors' schedule) or with a term weighted 0, some outputs are not
    in the loss; returning them would leave DDP waiting for gradients that never come. The full
    output stays available as ``last`` for reporting every term.
    """

    def __init__(self, net: MCISClassifier, pcm: torch.nn.Module | None = None):
        super().__init__()
        self.net = net
        self.pcm = pcm  # SEAM's pixel correlation module (paper §4.4), when train.seam
        self.active = OUTPUTS
        self.last = None
        self.seam = None

    def forward(
        self,
        xm,
        xn,
        pair_type=None,
        self_pairs: tuple | None = None,
        self_scales: tuple[float, ...] = (0.75, 2.0),
    ):
        self.last = self.net(xm, xn, pair_type)
        self.main_pair = self.net.last_pair  # the first pair, for the attention diagnostics
        outputs = tuple(getattr(self.last, name) for name in self.active)
        self.self_pairs = []
        if self_pairs is not None:  # authors' extra terms: (I, flip I), (I, 0.75x I), (I, 2x I)
            for x, same_domain in zip((xm, xn), self_pairs, strict=True):  # an image's own type
                for view in self_pair_views(x, self_scales):
                    out = self.net(x, view, same_domain)
                    self.self_pairs.append(out)
                    outputs += (out.single_m, out.single_n, out.coatt_m, out.coatt_n)
        if self.pcm is not None:  # SEAM on image m: itself and a 0.3x view, CAMs and PCM maps
            self.seam = (
                *seam_cams(self.net.phi, self.net.backbone, self.pcm, xm),
                *seam_cams(self.net.phi, self.net.backbone, self.pcm, seam_view(xm)),
            )
            outputs += self.seam
        return outputs


def active_outputs(cfg: ExperimentConfig, epoch: int) -> tuple[str, ...]:
    t = cfg.train
    on = {
        "single": t.loss_single > 0,
        "coatt": t.loss_coattention > 0,
        "contrast": t.loss_contrastive > 0 and epoch >= t.contrastive_from_epoch,
    }
    return tuple(o for o in OUTPUTS if on[o.rsplit("_", 1)[0]])


def _float(out):
    return dataclasses.replace(
        out, **{f.name: getattr(out, f.name).float() for f in dataclasses.fields(out)}
    )


def classifier_loss(cfg: ExperimentConfig, gate_values: list[float] | None = None):
    """``loss(wrapped, batch, epoch)`` of Eq. 10 (+ self-pair and SEAM terms when configured);
    each step's ``attn_gate_mean`` is appended to ``gate_values`` when given (diagnostics on)."""
    weights = loss_weights(cfg)

    def loss(wrapped, batch, epoch):
        view = _view(wrapped)
        memory = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        xm = batch["image_m"].to(memory_format=memory)
        xn = batch["image_n"].to(memory_format=memory)
        multi = cfg.model.domains > 1
        self_types = None  # a self-pair is target–target (0) or extra–extra (1)
        if cfg.train.self_pair_terms:
            self_types = tuple((batch[f"domain_{s}"] > 0).long() if multi else None for s in "mn")
        wrapped(
            xm,
            xn,
            batch["pair_type"] if multi else None,
            self_pairs=self_types,
            self_scales=tuple(cfg.train.self_pair_scales),
        )
        terms = mcis_loss(
            _float(view.last),
            batch["labels_m"],
            batch["labels_n"],
            epoch=epoch,
            weights=weights,
            contrastive_from_epoch=cfg.train.contrastive_from_epoch,
            reduction=cfg.train.loss_reduction,
            contrastive_classes=cfg.train.contrastive_classes,
        )
        if cfg.train.diagnostics:  # attention diagnostics of the batch's first pair
            fm, fn, gate, pt = view.main_pair
            with torch.autocast(fm.device.type, enabled=False):
                diag = label_free(view.net, fm.float(), fn.float(), gate, pt)
            terms.update({f"attn_{k}": v for k, v in diag.items()})
            if gate_values is not None and "gate_mean" in diag:
                gate_values.append(float(diag["gate_mean"]))
        if cfg.train.self_pair_terms:
            views = 1 + len(cfg.train.self_pair_scales)  # the flip, then each rescaled copy
            own = [batch["labels_m"]] * views + [batch["labels_n"]] * views  # m's, then n's
            extra = sum(
                self_pair_loss(_float(o), y, reduction=cfg.train.loss_reduction)["total"]
                for o, y in zip(view.self_pairs, own, strict=True)
            )
            terms["self_pairs"] = extra
            terms["total"] = terms["total"] + extra
        if cfg.train.seam:
            cam1, rv1, cam2, rv2 = (x.float() for x in view.seam)
            seam = seam_losses(cam1, rv1, cam2, rv2, batch["labels_m"])
            terms["seam_er"], terms["seam_ecr"] = seam["er"], seam["ecr"]
            terms["total"] = terms["total"] + cfg.train.seam_weight * seam["total"]
        return terms, 2 * batch["image_m"].shape[0]

    return loss


def _before_epoch(cfg: ExperimentConfig, view: LossView, gate_values: list | None = None):
    def set_active(epoch: int) -> None:
        view.active = active_outputs(cfg, epoch)
        if gate_values is not None:
            gate_values.clear()  # this epoch's steps only

    return set_active


def gate_warning(
    values: Sequence[float],
    epoch: int,
    *,
    contrastive_from_epoch: int,
    contrastive_weight: float,
    threshold: float = GATE_CLOSED,
) -> str | None:
    """The warning for an epoch whose contrastive gate B = sigmoid(W_B F^{m∩n}) (Eq. 6) stayed
    closed: the contrastive term (Eq. 9) is on (``contrastive_weight`` > 0 and ``epoch`` (0-based)
    >= ``contrastive_from_epoch``) and the mean of the epoch's per-step ``attn_gate_mean``
    ``values`` is below ``threshold``. None otherwise, and when there are no values."""
    if contrastive_weight <= 0 or epoch < contrastive_from_epoch or not values:
        return None
    mean = sum(values) / len(values)
    if not mean < threshold:
        return None
    return (
        f"warning: the contrastive gate B (Eq. 6) stayed closed this epoch (mean {mean:.4f} < "
        f"{threshold:g}): Eq. 9 is training phi_co on the image's own features; see "
        "model.phi_co_bias / train.contrastive_classes"
    )


def _worker_print(line: str) -> None:
    """Print one line from a Ray Train worker: there ``print()`` also goes through Ray Train's
    logger and shows twice on the console; the process's own stdout shows it once."""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def _after_epoch(
    cfg: ExperimentConfig,
    gate_values: list[float],
    rank: int,
    log: Callable[[str], None] = _worker_print,
):
    """After each epoch: the epoch's mean gate B over every rank's steps (``attn_gate_epoch_mean``)
    and ``gate_dead`` (1.0 when ``gate_warning`` fires, whose line rank 0 logs)."""

    def check(epoch: int) -> dict:
        values = [v for part in gather(list(gate_values)) for v in part]  # every rank's steps
        if not values:  # diagnostics off
            return {}
        line = gate_warning(
            values,
            epoch,
            contrastive_from_epoch=cfg.train.contrastive_from_epoch,
            contrastive_weight=cfg.train.loss_contrastive,
        )
        if line is not None and rank == 0:  # beside the progress lines
            log(f"[{STAGE.label}] epoch {epoch + 1}/{cfg.train.epochs} {line}")
        return {
            "attn_gate_epoch_mean": sum(values) / len(values),
            "gate_dead": float(line is not None),
        }

    return check


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, epoch, state, on_step):
    """One epoch of Eq. 10 on pairs outside Ray (``model``: a ``LossView``, maybe DDP-wrapped)."""
    built = Built(
        model=_view(model),
        loader=loader,
        loss=classifier_loss(cfg),
        before_epoch=_before_epoch(cfg, _view(model)),
    )
    run_epoch(model, built, optimizer, scheduler, scaler, cfg.train, epoch, state, on_step)


# --------------------------------------------------------------------------------- the stage
def classifier_stage(cfg: ExperimentConfig, rank: int, world: int, device) -> Built:
    """The classifier's pieces on one Ray Train worker."""
    loader = PairLoader(cfg.data, rank=rank, world_size=world, device=device)
    model = build_model(cfg, num_classes=len(loader.manifest["classes"]))
    pcm = build_pcm(cfg, model.backbone)
    view = LossView(model, pcm)
    gate_values: list[float] = []  # this epoch's attn_gate_mean, one per step (this rank)
    # Epochs whose loss leaves some outputs out have parameters without gradients (LossView).
    partial = any(active_outputs(cfg, e) != OUTPUTS for e in range(cfg.train.epochs))

    def loader_metrics() -> dict:  # this epoch so far; the epoch-end report has all of it
        stats = loader.stats
        out = {f"loader_{k}": stats[k] for k in ("bad_decode", "bad_record", "shard_errors")}
        return out | pair_metrics(stats)

    validate = None
    if cfg.train.val_every_epochs:  # CAM mIoU on seg.val_url (mcis_dist.train.validate)
        validate = classifier_validator(
            cfg, model, rank, world, device, num_classes=len(loader.manifest["classes"])
        )
    return Built(
        model=model,
        loader=loader,
        loss=classifier_loss(cfg, gate_values),
        forward=view,
        extra={"pcm": pcm} if pcm is not None else {},
        optimised=_Trainable(model, pcm),
        find_unused_parameters=partial,
        before_epoch=_before_epoch(cfg, view, gate_values),
        loader_metrics=loader_metrics,
        validate=validate,
        after_epoch=_after_epoch(cfg, gate_values, rank),
    )


def check_classifier(cfg: ExperimentConfig) -> None:
    if cfg.train.seam and cfg.model.backbone not in ("resnet38", "resnet38_tiny"):
        raise TrainingError(
            f"train.seam needs conv4/conv5 taps: model.backbone resnet38 or resnet38_tiny, "
            f"not {cfg.model.backbone!r}"
        )
    if cfg.train.val_every_epochs:  # the validation split must exist before workers start
        try:
            open_manifest(cfg.seg.val_url, endpoint_url(cfg), check_shards=False)
        except LoaderError as e:
            raise TrainingError(
                f"train.val_every_epochs needs a split with masks at seg.val_url: {e}"
            ) from None


# ------------------------------------------------------------------------------------ the driver
def run_url(cfg: ExperimentConfig) -> str:
    """Where this stage's outputs live: ``<run_root>/<name>/cls``."""
    return stage_url(cfg, RUN_SUBDIR)


STAGE = Stage(
    "cls",
    lambda cfg: cfg.train,
    run_url,
    classifier_stage,
    check_classifier,
    terms=("single", "coattention", "contrastive"),
    label="train-cls",
)


def train_classifier(cfg: ExperimentConfig, log=print):
    """Validate, then run (or resume) the training; returns Ray's ``Result``."""
    cfg = absolute_paths(cfg)  # Ray workers run in another working directory

    for url in [cfg.data.train_url, *cfg.data.extra_urls]:  # fails fast on missing shards
        open_manifest(url, endpoint_url(cfg))
    return fit(cfg, STAGE, "train", log)
