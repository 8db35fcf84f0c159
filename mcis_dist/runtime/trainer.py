"""The training machinery every trained stage shares: classifier, AffinityNet, DeepLab.

A stage plugs in a :class:`Stage`: how to build its model and loader on a worker, and its loss.
Everything else is here, once: SGD with the lr groups and the schedule (``optim``), AMP (bf16
autocast, or fp16 with ``GradScaler`` on GPUs), DDP via ``prepare_model``, non-finite losses
(stop naming the step, or skip it on every rank together), metrics every N steps, checkpoints
(model, optimizer, schedule, scaler, every rank's loader position and RNG states, the config)
to local or S3 run storage, exact resume, and Ray's ``max_failures`` restarts.

Read top to bottom: ``run_epoch`` is plain PyTorch; ``train_loop_per_worker`` is what each Ray
Train worker runs; ``fit`` is the driver, which only assembles ``ScalingConfig``/``RunConfig``.
Each stage module defines its :class:`Stage` and passes it to :func:`fit`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pyarrow import fs
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mcis_dist.config import ExperimentConfig, config_from_dict, dump_config
from mcis_dist.models.batchnorm import batchnorms
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.metrics import MetricsCallback
from mcis_dist.runtime.optim import build_optimizer, make_scheduler
from mcis_dist.runtime.paths import absolute_url, endpoint_url
from mcis_dist.runtime.session import ray_session
from mcis_dist.storage import S3RetrySettings

__all__ = ["Built", "Stage", "TrainingError", "fit", "run_epoch", "train_loop_per_worker"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under ``nonfinite: stop``, a bad setup)."""


@dataclass
class Built:
    """A stage's pieces on one worker.

    ``model`` holds the weights saved as the checkpoint's ``"model"`` and gives the optimizer its
    lr groups (``param_groups()``); ``forward`` is what DDP wraps (default: ``model``);
    ``loss(wrapped, batch, epoch) -> (terms with "total", images in the batch)``; ``extra``
    modules are saved and restored by name next to the model (e.g. SEAM's PCM).
    ``validate(epoch) -> metrics`` (optional) scores the current model on a split with masks;
    every rank calls it after the epochs ``val_every_epochs`` names, and it returns the same
    numbers on every rank (raw counts summed across ranks), e.g. ``{"val_miou": ...}``.
    ``after_epoch(epoch) -> metrics`` (optional) runs on every rank after every epoch (before
    ``validate``); its metrics join that epoch's end-of-epoch report, the same on every rank."""

    model: torch.nn.Module
    loader: object  # len(), set_epoch, state_dict/load_state_dict, device, stats
    loss: Callable
    forward: torch.nn.Module | None = None
    extra: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimised: torch.nn.Module | None = None  # param_groups() source; default: model
    find_unused_parameters: bool = False
    before_epoch: Callable[[int], None] | None = None
    loader_metrics: Callable[[], dict] | None = None
    validate: Callable[[int], dict] | None = None
    after_epoch: Callable[[int], dict] | None = None


@dataclass
class Stage:
    name: str  # saved in its checkpoints ("cls", "affinity", "seg")
    runner: Callable[[ExperimentConfig], object]  # the RunnerConfig section
    run_url: Callable[[ExperimentConfig], str]  # where checkpoints and metrics go
    build: Callable[[ExperimentConfig, int, int, torch.device], Built]
    check: Callable[[ExperimentConfig], None] | None = None  # stage-specific setup checks
    terms: tuple[str, ...] = ()  # loss terms shown on the progress line
    label: str = ""  # the command, on the progress line (default: the name)


# ---------------------------------------------------------------------------------- plain torch
def amp_context(runner, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runner.amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank iff ``flag`` is true on every rank (so all skip or stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def gather(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_epoch(wrapped, built: Built, optimizer, scheduler, scaler, runner, epoch, state, on_step):
    """One epoch of ``built.loss``; ``on_step(step_metrics)`` after every optimiser step."""
    device = built.loader.device
    if built.before_epoch is not None:
        built.before_epoch(epoch)
    wrapped.train()
    wait_start = time.perf_counter()
    for batch in built.loader:
        data_s = time.perf_counter() - wait_start
        with amp_context(runner, device):
            terms, images = built.loss(wrapped, batch, epoch)
        loss = terms["total"]
        if not all_ranks_agree(bool(torch.isfinite(loss)), device):
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            if runner.nonfinite == "stop":
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
        on_step(
            {k: float(v.detach()) for k, v in terms.items()}
            | {"lr": optimizer.param_groups[0]["lr"], "data_s": data_s, "images": images}
        )
        wait_start = time.perf_counter()


def summarise(window: list[dict], state: dict, built: Built) -> dict:
    out = {"epoch": state["epoch"], "step": state["step"], "skipped_steps": state["skipped"]}
    if window:
        for k in window[0]:
            if k not in ("images", "data_s"):
                out[k] = sum(w[k] for w in window) / len(window)
        out["images"] = sum(w["images"] for w in window)
        out["data_wait_s"] = sum(w["data_s"] for w in window)
    if built.loader_metrics is not None:
        out.update(built.loader_metrics())
    if torch.cuda.is_available():
        out["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---------------------------------------------------------------------------- the Ray Train worker
def train_loop_per_worker(config: dict) -> None:

    started = time.perf_counter()  # the worker's own time, against the driver's (benchmarks)
    stage = config["stage"]  # a Stage: its functions are pickled by reference
    cfg = config_from_dict(config["experiment"], ExperimentConfig, source=f"<{stage.name} config>")
    runner = stage.runner(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(runner.torch_threads)
    torch.manual_seed(runner.seed)  # same initial weights everywhere (DDP also broadcasts)

    built = stage.build(cfg, rank, world, device)
    optimizer = build_optimizer(built.optimised or built.model, runner)
    scheduler = make_scheduler(optimizer, runner, iters_per_epoch=len(built.loader))
    scaler = torch.amp.GradScaler(device.type, enabled=runner.amp == "fp16")
    state = {"epoch": 0, "step": 0, "skipped": 0}

    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            saved = ckpt.load(d)
        where = f"checkpoint {restored.path}"
        ckpt.load_model_state(built.model, saved["model"], where=where)
        for name, module in built.extra.items():
            ckpt.load_model_state(module, saved["extra"][name], where=f"{where} ({name})")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state.update(saved["state"])
        if len(saved["loaders"]) != world:
            raise TrainingError(
                f"checkpoint was written by {len(saved['loaders'])} workers, this run has {world}"
            )
        built.loader.load_state_dict(saved["loaders"][rank])
    forward = built.forward or built.model
    if device.type == "cuda" and any(m.training for m in batchnorms(forward)):
        forward = torch.nn.SyncBatchNorm.convert_sync_batchnorm(forward)  # GPU only
    wrapped = ray.train.torch.prepare_model(
        forward, parallel_strategy_kwargs={"find_unused_parameters": built.find_unused_parameters}
    )
    if restored is not None:  # last, so nothing after it draws random numbers before training
        ckpt.set_rng_state(saved["rng"][rank])
    every = runner.checkpoint_every_steps
    window: list[dict] = []
    last: dict = {}

    def report(with_checkpoint: bool, epoch_end: bool, extra: dict | None = None) -> None:
        metrics = {**last, **summarise(window, state, built)}  # the latest loss if no new step
        metrics.update(extra or {})  # validation: this report only
        metrics["epoch_end"] = epoch_end
        metrics["worker_s"] = round(time.perf_counter() - started, 3)
        last.update(
            {
                k: v
                for k, v in metrics.items()
                if k == "lr"
                or k == "total"
                or (window and k in window[0] and k not in ("images", "data_s"))
            }
        )
        window.clear()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        loaders, rngs = gather(built.loader.state_dict()), gather(ckpt.rng_state())
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt.save(
                    tmp,
                    {
                        "model": built.model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "extra": {n: m.state_dict() for n, m in built.extra.items()},
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "state": dict(state),
                        "loaders": loaders,
                        "rng": rngs,
                        "stage": stage.name,
                        "config": dump_config(cfg),
                    },
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def on_step(m: dict) -> None:
        window.append(m)
        if every and state["step"] % every == 0:
            report(with_checkpoint=True, epoch_end=False)
        elif state["step"] % runner.report_every_steps == 0:
            report(with_checkpoint=False, epoch_end=False)

    val_every = runner.val_every_epochs
    if val_every and built.validate is None:
        raise TrainingError(
            f"val_every_epochs={val_every}: the {stage.name} stage has no "
            f"per-epoch validation (set it to 0)"
        )
    for epoch in range(state["epoch"], runner.epochs):
        built.loader.set_epoch(epoch)
        run_epoch(wrapped, built, optimizer, scheduler, scaler, runner, epoch, state, on_step)
        state["epoch"] = epoch + 1
        extra = built.after_epoch(epoch) if built.after_epoch is not None else {}
        if val_every and (state["epoch"] % val_every == 0 or state["epoch"] == runner.epochs):
            extra = {**extra, **built.validate(epoch)}
        report(with_checkpoint=True, epoch_end=True, extra=extra)


# ------------------------------------------------------------------------------------ the driver
def run_storage(url: str, cfg: ExperimentConfig):
    """(storage_path, run name, pyarrow filesystem or None) of a run folder URL for RunConfig."""
    url = absolute_url(url).rstrip("/")
    root, name = url.rsplit("/", 1)
    if not root.startswith("s3://"):
        return root, name, None

    endpoint = endpoint_url(cfg)
    retry = S3RetrySettings.from_env()  # the MCIS_S3_* settings, as for every other S3 client
    kwargs = {
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=retry.max_attempts),
        "connect_timeout": retry.connect_timeout,
        "request_timeout": retry.read_timeout,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme or "https")
    return root[len("s3://") :], name, fs.S3FileSystem(**kwargs)


def check_resources(runner, what: str) -> None:

    have = ray.cluster_resources()
    need_cpu = runner.num_workers * runner.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        raise TrainingError(
            f"{what}.num_workers={runner.num_workers} × {what}.cpus_per_worker="
            f"{runner.cpus_per_worker} needs {need_cpu} CPUs; the cluster has {have.get('CPU', 0):g}"
        )
    if runner.use_gpu and have.get("GPU", 0) < runner.num_workers:
        raise TrainingError(
            f"{what}.num_workers={runner.num_workers} with use_gpu needs {runner.num_workers} "
            f"GPUs; the cluster has {have.get('GPU', 0):g}"
        )
    if runner.amp == "fp16" and not runner.use_gpu:
        raise TrainingError(f"{what}.amp=fp16 needs GPUs (use bf16 or none on the CPU)")


def fit(cfg: ExperimentConfig, stage: Stage, what: str, log=print, callbacks=()):
    """Run (or resume) a stage's training on Ray Train; returns Ray's ``Result``.
    ``what`` names the config section in messages (``train``, ``affinity.train``);
    ``callbacks`` are more Ray Train ``UserCallback``s (``mcis tune``: reports to Tune)."""
    with ray_session():
        return _fit(cfg, stage, what, log, callbacks)


def _fit(cfg: ExperimentConfig, stage: Stage, what: str, log, callbacks=()):

    runner = stage.runner(cfg)
    check_resources(runner, what)
    if stage.check is not None:
        stage.check(cfg)
    url = absolute_url(stage.run_url(cfg))
    storage_path, name, filesystem = run_storage(url, cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": json.loads(cfg.model_dump_json()), "stage": stage},
        scaling_config=ScalingConfig(
            num_workers=runner.num_workers,
            use_gpu=runner.use_gpu,
            resources_per_worker={"CPU": runner.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=runner.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=runner.keep_checkpoints),
            callbacks=[
                MetricsCallback(
                    url,
                    endpoint_url(cfg),
                    runner.epochs,
                    label=stage.label or stage.name,
                    terms=stage.terms,
                ),
                *callbacks,
            ],
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress line suffices
        ),
    )
    log(f"{stage.name}: {runner.num_workers} workers, {runner.epochs} epochs, run storage {url}")
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the workers' errors: surface the first one plainly
        raise TrainingError(f"training failed: {worker_error(e)}") from e
    if result.error is not None:
        raise TrainingError(f"training failed: {worker_error(result.error)}")
    return result


def worker_error(e: BaseException) -> str:
    """The line of a wrapped worker error that says what went wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "TrainingError: " in ln:
            return ln.split("TrainingError: ", 1)[1]
    errors = [ln for ln in lines if "Error: " in ln and not ln.startswith("File ")]
    return errors[-1] if errors else (lines[0] if lines else type(e).__name__)
