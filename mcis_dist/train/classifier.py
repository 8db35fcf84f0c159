"""``mcis train-cls``: the co-attention classifier on Ray Train.

Read top to bottom: ``train_one_epoch`` is plain PyTorch; ``train_loop_per_worker`` is what each
Ray Train worker runs (build, restore, loop, checkpoint — the Ray calls are ``get_context``,
``prepare_model``, ``get_checkpoint`` and ``report``); ``train_classifier`` is the driver, which
only validates and assembles ``ScalingConfig``/``RunConfig`` from the experiment config.

Fault tolerance is Ray's: ``max_failures`` restarts the worker group from the newest checkpoint
when a worker dies, and re-running the same command (same ``name``, same ``run_root``) after the
driver died resumes the run from its storage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mcis_dist.config import ExperimentConfig, config_from_dict, dump_config
from mcis_dist.data.loader import PairLoader
from mcis_dist.losses import LossWeights, mcis_loss
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.train import checkpoint as ckpt
from mcis_dist.train.metrics import MetricsCallback
from mcis_dist.train.optim import build_optimizer, make_scheduler

RUN_SUBDIR = "cls"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under ``nonfinite: stop``, a bad setup)."""


# ------------------------------------------------------------------------------- building blocks
def build_model(cfg: ExperimentConfig, num_classes: int) -> MCISClassifier:
    backbone = build_backbone(cfg.model.backbone)
    if cfg.model.weights:
        from mcis_dist.models import weights

        if cfg.model.backbone == "vgg16":
            weights.load_torchvision_vgg16(backbone, cfg.model.weights)
        else:
            weights.load_state_dict_file(backbone, cfg.model.weights)
    return MCISClassifier(
        backbone, num_classes=num_classes, domains=cfg.model.domains,
        shared_phi=cfg.model.shared_phi, chunk_size=cfg.model.chunk_size,
    )  # fmt: skip


def build_pcm(cfg: ExperimentConfig, backbone) -> torch.nn.Module | None:
    """SEAM's PCM on the backbone's conv4/conv5 taps (ResNet-38 family), when train.seam."""
    if not cfg.train.seam:
        return None
    from mcis_dist.models.seam import PixelCorrelationModule

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
    return LossWeights(single=t.loss_single, coattention=t.loss_coattention,
                       contrastive=t.loss_contrastive)  # fmt: skip


def amp_context(cfg: ExperimentConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _view(model) -> LossView:
    return model.module if hasattr(model, "module") else model


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank iff ``flag`` is true on every rank (so all skip or stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, epoch, state, on_step):
    """One epoch of Eq. 10 on pairs; ``on_step(step_metrics)`` after every optimiser step."""
    device = loader.device
    weights = loss_weights(cfg)
    _view(model).active = active_outputs(cfg, epoch)
    model.train()
    wait_start = time.perf_counter()
    for batch in loader:
        data_s = time.perf_counter() - wait_start
        memory = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        xm = batch["image_m"].to(memory_format=memory)
        xn = batch["image_n"].to(memory_format=memory)
        multi = cfg.model.domains > 1
        self_types = None  # a self-pair is target–target (0) or extra–extra (1)
        if cfg.train.self_pair_terms:
            self_types = tuple((batch[f"domain_{s}"] > 0).long() if multi else None for s in "mn")
        with amp_context(cfg, device):
            model(xm, xn, batch["pair_type"] if multi else None, self_pairs=self_types)
        out = _view(model).last
        out = dataclasses.replace(out, **{f.name: getattr(out, f.name).float()
                                          for f in dataclasses.fields(out)})  # fmt: skip
        terms = mcis_loss(
            out, batch["labels_m"], batch["labels_n"],
            epoch=epoch, weights=weights, contrastive_from_epoch=cfg.train.contrastive_from_epoch,
            reduction=cfg.train.loss_reduction,
        )  # fmt: skip
        if cfg.train.self_pair_terms:
            from mcis_dist.losses import self_pair_loss

            own = [batch["labels_m"]] * 3 + [batch["labels_n"]] * 3  # one per view, m then n
            extra = sum(
                self_pair_loss(dataclasses.replace(o, **{f.name: getattr(o, f.name).float()
                                                         for f in dataclasses.fields(o)}),
                               y, reduction=cfg.train.loss_reduction)["total"]
                for o, y in zip(_view(model).self_pairs, own, strict=True)
            )  # fmt: skip
            terms["self_pairs"] = extra
            terms["total"] = terms["total"] + extra
        if cfg.train.seam:
            from mcis_dist.models.seam import seam_losses

            cam1, rv1, cam2, rv2 = (x.float() for x in _view(model).seam)
            seam = seam_losses(cam1, rv1, cam2, rv2, batch["labels_m"])
            terms["seam_er"], terms["seam_ecr"] = seam["er"], seam["ecr"]
            terms["total"] = terms["total"] + cfg.train.seam_weight * seam["total"]
        loss = terms["total"]
        finite = _all_ranks_agree(bool(torch.isfinite(loss)), device)
        if not finite:
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            if cfg.train.nonfinite == "stop":
                raise TrainingError(
                    f"non-finite loss at epoch {epoch}, step {state['step']} ({values}); "
                    "the last good checkpoint is kept"
                )
            optimizer.zero_grad(set_to_none=True)
            state["skipped"] += 1
        else:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        state["step"] += 1
        on_step({k: float(v.detach()) for k, v in terms.items()}
                | {"lr": optimizer.param_groups[0]["lr"], "data_s": data_s,
                   "images": 2 * batch["image_m"].shape[0]})  # fmt: skip
        wait_start = time.perf_counter()


def _gather(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
        self.pcm = pcm  # SEAM's pixel correlation module (REFERENCE §5), when train.seam
        self.active = OUTPUTS
        self.last = None
        self.seam = None

    def forward(self, xm, xn, pair_type=None, self_pairs: tuple | None = None):
        self.last = self.net(xm, xn, pair_type)
        outputs = tuple(getattr(self.last, name) for name in self.active)
        self.self_pairs = []
        if self_pairs is not None:  # authors' extra terms: (I, flip I), (I, 0.75x I), (I, 2x I)
            from mcis_dist.losses import self_pair_views

            for x, same_domain in zip((xm, xn), self_pairs, strict=True):  # an image's own type
                for view in self_pair_views(x):
                    out = self.net(x, view, same_domain)
                    self.self_pairs.append(out)
                    outputs += (out.single_m, out.single_n, out.coatt_m, out.coatt_n)
        if self.pcm is not None:  # SEAM on image m: itself and a 0.3x view, CAMs and PCM maps
            from mcis_dist.models.seam import seam_cams, seam_view

            self.seam = (*seam_cams(self.net.phi, self.net.backbone, self.pcm, xm),
                         *seam_cams(self.net.phi, self.net.backbone, self.pcm, seam_view(xm)))  # fmt: skip
            outputs += self.seam
        return outputs


def active_outputs(cfg: ExperimentConfig, epoch: int) -> tuple[str, ...]:
    t = cfg.train
    on = {"single": t.loss_single > 0, "coatt": t.loss_coattention > 0,
          "contrast": t.loss_contrastive > 0 and epoch >= t.contrastive_from_epoch}  # fmt: skip
    return tuple(o for o in OUTPUTS if on[o.rsplit("_", 1)[0]])


# ---------------------------------------------------------------------------- the Ray Train worker
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["experiment"], ExperimentConfig, source="<train-cls config>")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DDP also broadcasts)

    loader = PairLoader(cfg.data, rank=rank, world_size=world, device=device)
    model = build_model(cfg, num_classes=len(loader.manifest["classes"]))
    pcm = build_pcm(cfg, model.backbone)
    optimizer = build_optimizer(_Trainable(model, pcm), cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, iters_per_epoch=len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    state = {"epoch": 0, "step": 0, "skipped": 0}

    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            saved = ckpt.load(d)
        ckpt.load_model_state(model, saved["model"], where=f"checkpoint {restored.path}")
        if pcm is not None:
            ckpt.load_model_state(pcm, saved["pcm"], where=f"checkpoint {restored.path} (PCM)")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state.update(saved["state"])
        if len(saved["loaders"]) != world:
            raise TrainingError(
                f"checkpoint was written by {len(saved['loaders'])} workers, this run has {world}"
            )
        loader.load_state_dict(saved["loaders"][rank])
    if device.type == "cuda" and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    ):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # GPU only; frozen BN: no
    net = model
    # Epochs whose loss leaves some outputs out have parameters without gradients (LossView).
    partial = any(active_outputs(cfg, e) != OUTPUTS for e in range(cfg.train.epochs))
    model = ray.train.torch.prepare_model(
        LossView(net, pcm), parallel_strategy_kwargs={"find_unused_parameters": partial}
    )

    if restored is not None:  # last, so nothing after it draws random numbers before training
        ckpt.set_rng_state(saved["rng"][rank])
    every = cfg.train.checkpoint_every_steps
    window: list[dict] = []

    last: dict = {}

    def report(with_checkpoint: bool, epoch_end: bool) -> None:
        metrics = {**last, **_summarise(window, state, loader)}  # the latest loss if no new step
        metrics["epoch_end"] = epoch_end
        last.update({k: v for k, v in metrics.items() if k in ("total", "single", "coattention",
                                                                 "contrastive", "lr")})  # fmt: skip
        window.clear()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        loaders, rngs = _gather(loader.state_dict()), _gather(ckpt.rng_state())
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt.save(tmp, {
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "pcm": pcm.state_dict() if pcm is not None else {},
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "state": dict(state), "loaders": loaders, "rng": rngs,
                    "config": dump_config(cfg),
                })  # fmt: skip
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def on_step(m: dict) -> None:
        window.append(m)
        if every and state["step"] % every == 0:
            report(with_checkpoint=True, epoch_end=False)
        elif state["step"] % cfg.train.report_every_steps == 0:
            report(with_checkpoint=False, epoch_end=False)

    for epoch in range(state["epoch"], cfg.train.epochs):
        loader.set_epoch(epoch)
        train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, epoch, state, on_step)
        state["epoch"] = epoch + 1
        report(with_checkpoint=True, epoch_end=True)


def _summarise(window: list[dict], state: dict, loader: PairLoader) -> dict:
    out = {"epoch": state["epoch"], "step": state["step"], "skipped_steps": state["skipped"]}
    if window:
        for k in window[0]:
            if k not in ("images", "data_s"):
                out[k] = sum(w[k] for w in window) / len(window)
        out["images"] = sum(w["images"] for w in window)
        out["data_wait_s"] = sum(w["data_s"] for w in window)
    stats = loader.stats
    out.update({f"loader_{k}": stats[k] for k in ("bad_decode", "bad_record", "shard_errors")})
    if torch.cuda.is_available():
        out["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ------------------------------------------------------------------------------------ the driver
def run_url(cfg: ExperimentConfig) -> str:
    """Where this stage's outputs live: ``<run_root>/<name>/cls``."""
    root = cfg.run_root.rstrip("/")
    if not root.startswith("s3://"):
        root = str(Path(root).expanduser().absolute())
    return f"{root}/{cfg.name}/{RUN_SUBDIR}"


def endpoint_url(cfg: ExperimentConfig) -> str | None:
    """The S3 endpoint for the run's storage (the shards' or the loader's, else the env's)."""
    return cfg.shards.endpoint_url or cfg.data.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")


def _storage(cfg: ExperimentConfig):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    root = run_url(cfg).rsplit("/", 1)[0]
    if not root.startswith("s3://"):
        return root, None
    from pyarrow import fs

    endpoint = endpoint_url(cfg)
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host, "scheme": scheme or "https"}
    return root[len("s3://") :], fs.S3FileSystem(**kwargs)


def ensure_ray() -> bool:
    """Use the cluster in RAY_ADDRESS (or the one ``ray job submit`` runs in); otherwise start an
    embedded local Ray bound to 127.0.0.1 that sends no usage statistics. True if it started
    (and so owns) an embedded Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    return True


def check_resources(cfg: ExperimentConfig) -> None:
    import ray

    have = ray.cluster_resources()
    t = cfg.train
    need_cpu = t.num_workers * t.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        raise TrainingError(
            f"train.num_workers={t.num_workers} × train.cpus_per_worker={t.cpus_per_worker} needs "
            f"{need_cpu} CPUs; the cluster has {have.get('CPU', 0):g}"
        )
    if t.use_gpu and have.get("GPU", 0) < t.num_workers:
        raise TrainingError(
            f"train.num_workers={t.num_workers} with use_gpu needs {t.num_workers} GPUs; "
            f"the cluster has {have.get('GPU', 0):g}"
        )
    if t.amp == "fp16" and not t.use_gpu:
        raise TrainingError("train.amp=fp16 needs GPUs (use bf16 or none on the CPU)")
    if t.seam and cfg.model.backbone not in ("resnet38", "resnet38_tiny"):
        raise TrainingError(
            f"train.seam needs conv4/conv5 taps: model.backbone resnet38 or resnet38_tiny, "
            f"not {cfg.model.backbone!r}"
        )


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose local paths (shards, weights, run root) are absolute; URLs stay as they are."""

    def fix(value: str | None) -> str | None:
        if value is None or "://" in value:
            return value
        return str(Path(value).expanduser().absolute())

    cfg = cfg.model_copy(deep=True)
    cfg.data.train_url = fix(cfg.data.train_url)
    cfg.data.extra_urls = [fix(u) for u in cfg.data.extra_urls]
    cfg.shards.url = fix(cfg.shards.url)
    cfg.model.weights = fix(cfg.model.weights)
    cfg.run_root = fix(cfg.run_root)
    return cfg


def train_classifier(cfg: ExperimentConfig, log=print):
    """Validate, then run (or resume) the training; returns Ray's ``Result``."""
    cfg = absolute_paths(cfg)  # Ray workers run in another working directory

    from mcis_dist.data.loader import open_manifest

    for url in [cfg.data.train_url, *cfg.data.extra_urls]:  # fails fast on missing shards
        open_manifest(url, cfg.data.endpoint_url)
    storage_path, filesystem = _storage(cfg)
    started = ensure_ray()
    try:
        return _fit(cfg, storage_path, filesystem, log)
    finally:
        if started:  # an embedded Ray this call started ends with it
            import ray

            ray.shutdown()


def _fit(cfg: ExperimentConfig, storage_path: str, filesystem, log):
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    check_resources(cfg)
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": json.loads(cfg.model_dump_json())},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=RUN_SUBDIR, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[MetricsCallback(run_url(cfg), endpoint_url(cfg), t.epochs)],
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress line suffices
        ),
    )  # fmt: skip
    log(f"train-cls: {t.num_workers} workers, {t.epochs} epochs, run storage {storage_path}")
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the workers' errors: surface the first one plainly
        raise TrainingError(f"training failed: {_worker_error(e)}") from e
    if result.error is not None:
        raise TrainingError(f"training failed: {_worker_error(result.error)}")
    return result


def _worker_error(e: BaseException) -> str:
    """The line of a wrapped worker error that says what went wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "TrainingError: " in ln:
            return ln.split("TrainingError: ", 1)[1]
    errors = [ln for ln in lines if "Error: " in ln and not ln.startswith("File ")]
    return errors[-1] if errors else (lines[0] if lines else type(e).__name__)
