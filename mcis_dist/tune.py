"""``mcis tune``: a Ray Tune sweep over a trained stage's settings, ASHA early stopping.

A sweep file (``configs/tune/*.yaml``) names a base experiment config, overrides of it, the stage
to tune (``cls``: the classifier; ``affinity``: AffinityNet and the random walk of the pseudo
masks) and a search space of dotted experiment keys. Each trial is one Ray Train run of the
stage (the shared runner, ``mcis_dist.runtime.trainer``) on the base config + the trial's values,
validated after every epoch on the validation split's masks (``mcis_dist.train.validate``:
``val_miou``); a ``TuneReportCallback`` hands the workers' epoch-end metrics to Tune, whose ASHA
scheduler stops the weak trials at its rungs. Train V2's pattern: a Tune *function trainable*
(``run_trial``) builds the ``TorchTrainer``; it reserves no CPU itself, and
``max_concurrent_trials`` is what the cluster's CPUs (GPUs) hold of one trial's workers.

The sweep folder (default ``<run_root>/<name>/tune/<sweep name>``) holds ``sweep.yaml`` (the
resolved sweep), Tune's experiment (``tune/``), the trials' runs (``trials/<trial id>/``),
``val_cams/`` (affinity sweeps: the val split's CAMs, made once), ``results.csv``,
``results.md`` and ``best_config.yaml`` (a full experiment config for ``mcis pipeline``).
Started again, a sweep resumes (``Tuner.restore``: finished trials are kept, unfinished ones go
on from their runs' checkpoints); a finished one just rewrites its table. A trial that crashes is
recorded as failed with its error, and the sweep goes on.
"""

from __future__ import annotations

import copy
import csv
import difflib
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.tune
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from mcis_dist.affinity import train as affinity_train
from mcis_dist.cams.stage import compute_cams
from mcis_dist.config import (
    YAML_EXPONENT,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    describe_schema,
    dump_config,
    load_config,
    write_run_config,
)
from mcis_dist.formats.shards import MANIFEST_NAME
from mcis_dist.masks.modes import MODES
from mcis_dist.masks.stage import make_labels
from mcis_dist.pipeline import training_complete
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.paths import absolute_paths, absolute_url, endpoint_url, labels_url
from mcis_dist.runtime.session import ray_session
from mcis_dist.runtime.sharded import StageError
from mcis_dist.runtime.trainer import check_resources, fit, run_storage, worker_error
from mcis_dist.shards.build import build_dataset, build_options
from mcis_dist.shards.synthetic import synthetic_spec
from mcis_dist.storage import open_storage
from mcis_dist.train import classifier
from mcis_dist.train.classifier import run_url, train_classifier

__all__ = ["SWEEP_STAGES", "Sweep", "load_sweep", "search_space", "run_sweep", "run_trial"]

# A trial's function only builds a TorchTrainer and waits: it reserves no CPU, so a trial's
# workers fit where they alone would (Tune needs some non-zero resource: 1 byte of memory).
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class SweepStage:
    runner: str  # the stage in mcis_dist.runtime.trainer.STAGES
    section: str  # its RunnerConfig section
    tunable: tuple[str, ...]  # key prefixes a sweep of it may set
    metrics: tuple[str, ...]  # what its validation reports


SWEEP_STAGES = {
    "cls": SweepStage(
        "cls",
        "train",
        ("train.", "data.", "model.", "cams.bg_threshold", "cams.flip", "cams.out_stride"),
        ("val_miou", "val_pixel_accuracy"),
    ),
    "affinity": SweepStage(
        "affinity",
        "affinity.train",
        (
            "affinity.",
            "masks.beta",
            "masks.steps",
            "masks.radius",
            "masks.background",
            "masks.bg_threshold",
            "masks.bg_power",
            "masks.ignore_margin",
        ),
        ("val_miou", "val_miou_ignore_as_bg", "val_pixel_accuracy"),
    ),
}
# Settings a trial cannot vary: resources (the concurrency), ASHA's max_t, the validation.
FIXED = (
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "epochs",
    "val_every_epochs",
    "num_actors",
    "cpus_per_actor",
    "max_failures",
)
SWEEP_KEYS = (
    "base",
    "overrides",
    "stage",
    "name",
    "out",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "seed",
    "scheduler",
    "space",
)
SCHEDULER_KEYS = ("grace_period", "reduction_factor")


@dataclass
class Sweep:
    file: str
    base: str  # the experiment config (resolved path)
    overrides: list[str]  # of the experiment, "a.b=value"
    stage: str
    name: str
    space: dict[str, dict]  # key -> {kind: args}, parsed
    out: str | None = None
    metric: str = "val_miou"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int = 0
    seed: int = 0
    scheduler: dict = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})

    def spec(self) -> dict:
        """What the trials depend on: a resumed sweep must have the same."""
        keep = ("base", "overrides", "stage", "metric", "mode", "num_samples", "seed", "scheduler")
        return {**{k: getattr(self, k) for k in keep}, "space": self.space}


# ---------------------------------------------------------------------------- the sweep file
def _leaf_keys() -> dict[str, str]:
    return {key: kind for key, kind, _default, _desc in describe_schema(ExperimentConfig)}


def tunable_keys(stage: SweepStage) -> list[str]:
    return [k for k in _leaf_keys() if k.startswith(stage.tunable) and not _fixed(k)]


def _fixed(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in FIXED or last.endswith(("_url", "_urls", "checkpoint")) or key == "name"


def _set(data: dict, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[last] = value


def _number(v: Any, where: str) -> float:
    if isinstance(v, str) and YAML_EXPONENT.fullmatch(v.strip()):
        return float(v)  # YAML 1.1 reads 1e-3 as a string
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    return v


def _parse_dist(spec: Any, where: str, numeric: bool) -> dict:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(
            f"{where}: expected one of {{loguniform: [lo, hi]}}, {{uniform: [lo, "
            f"hi]}}, {{randint: [lo, hi]}}, {{choice: [a, b, ...]}}, {{grid: [a, "
            f"b, ...]}}; got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        if numeric:
            args = [
                float(a) if isinstance(a, str) and YAML_EXPONENT.fullmatch(a.strip()) else a
                for a in args
            ]
        return {kind: args}
    if len(args) != 2:
        raise ConfigError(f"{where}: {kind} takes [lo, hi], got {args!r}")
    lo, hi = (_number(a, f"{where}: {kind}") for a in args)
    if kind == "randint" and not all(isinstance(a, int) for a in (lo, hi)):
        raise ConfigError(f"{where}: randint takes integers [lo, hi] (both included), got {args}")
    if not (lo < hi or (kind == "randint" and lo == hi)):
        raise ConfigError(f"{where}: {kind} needs lo < hi, got {args}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < lo < hi, got {args}")
    return {kind: [lo, hi]}


def _check_values(space: dict[str, dict], base: ExperimentConfig, where: str) -> None:
    """Every value a trial may get (both bounds, every choice) passes the schema."""
    data = base.model_dump(mode="json")
    problems = []
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        for value in args:
            trial = copy.deepcopy(data)
            _set(trial, key, value)
            try:
                config_from_dict(trial, ExperimentConfig, source="")
            except ConfigError as e:
                why = "; ".join(p.lstrip(": ") for p in e.problems)
                problems.append(f"{where}: space.{key}: {kind} value {value!r} is rejected: {why}")
    if problems:
        raise ConfigError("\n".join(problems), problems)


def load_sweep(path: str | Path, overrides=()) -> tuple[Sweep, ExperimentConfig]:
    """Read and check a sweep file (+ ``key=value`` overrides: sweep keys such as
    ``num_samples=4``, ``scheduler.grace_period=2``, ``space.train.lr={choice: [0.01]}``; any
    other key, or ``overrides.KEY``, overrides the base experiment). Returns the sweep and the
    base experiment config."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: sweep file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: YAML syntax error: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sweep keys ({', '.join(SWEEP_KEYS)})")
    raw.setdefault("overrides", {})
    raw["overrides"] = dict(raw["overrides"] or {})
    raw["space"] = dict(raw.get("space") or {})
    for text in overrides:
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. num_samples=4")
        value = yaml.safe_load(value)
        head = key.split(".", 1)[0]
        if key.startswith("overrides."):
            raw["overrides"][key[len("overrides.") :]] = value
        elif key.startswith("space."):
            raw["space"][key[len("space.") :]] = value
        elif key.startswith("scheduler."):
            raw["scheduler"] = {**(raw.get("scheduler") or {}), key.split(".", 1)[1]: value}
        elif head in SWEEP_KEYS:
            raw[key] = value
        else:
            raw["overrides"][key] = value
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown sweep key(s) {unknown}; valid: {', '.join(SWEEP_KEYS)}"
        )
    for key in ("base", "stage"):
        if not raw.get(key):
            raise ConfigError(f"{where}: '{key}' is required")
    stage = SWEEP_STAGES.get(raw["stage"])
    if stage is None:
        raise ConfigError(
            f"{where}: stage {raw['stage']!r} cannot be swept; valid: {', '.join(SWEEP_STAGES)}"
        )
    base_path = Path(raw["base"])
    if not base_path.is_absolute():
        base_path = Path(path).parent / base_path
    if not base_path.is_file():
        raise ConfigError(
            f"{where}: base: {raw['base']} not found (relative to the sweep file: {base_path})"
        )
    ovr = [f"{k}={json.dumps(v)}" for k, v in raw["overrides"].items()]
    base = load_config(base_path, ovr, schema=ExperimentConfig)

    if not raw["space"]:
        raise ConfigError(f"{where}: 'space' is empty: name at least one key to tune")
    leaves, allowed = _leaf_keys(), tunable_keys(stage)
    space = {}
    for key, spec in raw["space"].items():
        if key not in leaves:
            close = difflib.get_close_matches(key, allowed or list(leaves), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"{where}: space: unknown config key '{key}' ({hint}valid keys of "
                f"a {raw['stage']} sweep: {', '.join(allowed)})"
            )
        if key not in allowed:
            raise ConfigError(
                f"{where}: space: '{key}' is not tunable in a {raw['stage']} sweep "
                f"(it tunes {', '.join(p + ('*' if p.endswith('.') else '') for p in stage.tunable)}"
                f" except {', '.join(FIXED)}, URLs and checkpoints; set fixed values "
                f"under 'overrides')"
            )
        numeric = leaves[key].split(" ")[0] in ("int", "float")
        space[key] = _parse_dist(spec, f"{where}: space.{key}", numeric)
    _check_values(space, base, where)

    sched = {"grace_period": 1, "reduction_factor": 2, **(raw.get("scheduler") or {})}
    bad = [k for k in sched if k not in SCHEDULER_KEYS]
    if bad:
        raise ConfigError(
            f"{where}: unknown scheduler key(s) {bad}; valid: {', '.join(SCHEDULER_KEYS)}"
        )
    sweep = Sweep(
        file=str(path),
        base=str(base_path.resolve()),
        overrides=ovr,
        stage=raw["stage"],
        name=str(raw.get("name") or Path(path).stem),
        space=space,
        out=raw.get("out"),
        scheduler=sched,
    )
    for key, kind, check in (
        ("metric", str, lambda v: v in stage.metrics),
        ("mode", str, lambda v: v in ("max", "min")),
        ("num_samples", int, lambda v: v >= 1),
        ("max_concurrent_trials", int, lambda v: v >= 0),
        ("seed", int, lambda v: v >= 0),
    ):
        if raw.get(key) is not None:
            value = raw[key]
            if not isinstance(value, kind) or isinstance(value, bool) or not check(value):
                valid = {"metric": f"one of {', '.join(stage.metrics)}", "mode": "max or min"}
                raise ConfigError(
                    f"{where}: {key}={value!r}: expected "
                    f"{valid.get(key, 'an integer >= 0 (num_samples >= 1)')}"
                )
            setattr(sweep, key, value)
    epochs = _section(base, stage.section).epochs
    g, rf = sched["grace_period"], sched["reduction_factor"]
    if not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= epochs:
        raise ConfigError(
            f"{where}: scheduler.grace_period={g!r}: expected an integer in "
            f"[1, {stage.section}.epochs={epochs}]"
        )
    if not isinstance(rf, int | float) or isinstance(rf, bool) or rf <= 1:
        raise ConfigError(f"{where}: scheduler.reduction_factor={rf!r}: expected a number > 1")
    return sweep, base


def _section(cfg: ExperimentConfig, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def search_space(sweep: Sweep) -> dict:
    """Tune's ``param_space``: one domain per dotted key."""

    out = {}
    for key, dist in sweep.space.items():
        kind, args = next(iter(dist.items()))
        out[key] = {
            "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),  # both ends included
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
        }[kind](args)
    return out


# ------------------------------------------------------------------------------- one trial
class EpochReports(TuneReportCallback):
    """Hands Tune the epoch-end reports that carry the objective (rank 0's metrics; every rank
    reports the same validation numbers), not the every-N-steps ones."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get("epoch_end") and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_config(context: dict, params: dict, trial_id: str) -> ExperimentConfig:
    """The base config (paths resolved) + the trial's values; its run under the sweep folder."""
    stage = SWEEP_STAGES[context["stage"]]
    data = copy.deepcopy(context["base"])
    for key, value in params.items():
        _set(data, key, value)
    root = f"{context['sweep_url']}/trials"
    data["run_root"], data["name"] = root, trial_id
    runner = data
    for part in stage.section.split("."):
        runner = runner[part]
    runner["val_every_epochs"] = runner.get("val_every_epochs") or 1  # ASHA's rungs: epochs
    if stage.runner == "affinity":
        data["affinity"]["out_url"] = f"{root}/{trial_id}/affinity"
        data["affinity"]["val_cams_url"] = context["val_cams"]
        data["cams"]["checkpoint"] = context["checkpoint"]  # the base experiment's classifier
    return config_from_dict(data, ExperimentConfig, source=f"<trial {trial_id}>")


def run_trial(params: dict, context: dict) -> None:
    """Tune's function trainable: one Ray Train run of the stage with the trial's values."""

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(context, params, trial_id)
    stage = SWEEP_STAGES[context["stage"]]
    trial = open_storage(f"{cfg.run_root}/{trial_id}")
    write_run_config(cfg, trial)
    if stage.runner == "affinity":
        _trial_labels(cfg, context)
    trained = {"cls": classifier.STAGE, "affinity": affinity_train.STAGE}[stage.runner]
    fit(cfg, trained, stage.section, callbacks=[EpochReports(context["metric"])])


def _trial_labels(cfg: ExperimentConfig, context: dict) -> None:
    """AffinityNet's confident labels: the base experiment's (linked) when the trial makes them
    the same way, else its own (``make_labels``, in the trial folder)."""

    own = labels_url(cfg)
    base = config_from_dict(context["base"], ExperimentConfig)
    same = MODES["confident"].settings(cfg) == MODES["confident"].settings(base)
    if same and "://" not in own:
        Path(own).parent.mkdir(parents=True, exist_ok=True)
        if not Path(own).exists():
            Path(own).symlink_to(context["labels"], target_is_directory=True)
        return
    make_labels(cfg)


# ------------------------------------------------------------------------------ the driver
@dataclass
class SweepResult:
    url: str  # the sweep folder
    rows: list[dict]  # one per trial, best first
    best: dict | None  # the best row (finished trials first), None when no trial has a result
    table: str  # the printed table


def sweep_url(sweep: Sweep, base: ExperimentConfig) -> str:

    if sweep.out:
        return absolute_url(sweep.out).rstrip("/")
    return f"{absolute_url(base.run_root).rstrip('/')}/{base.name}/tune/{sweep.name}"


def run_sweep(
    sweep: Sweep,
    base: ExperimentConfig,
    restart: bool = False,
    retry_failed: bool = False,
    log=print,
) -> SweepResult:
    """Run (or resume) the sweep; write and return its table and best config."""

    base = absolute_paths(base)
    stage = SWEEP_STAGES[sweep.stage]
    url = sweep_url(sweep, base)
    folder = open_storage(url, endpoint_url=endpoint_url(base))
    folder.check_writable()
    if restart:
        _discard(url)
    _ensure_shards(base, log)
    with ray_session(dashboard=True):  # see ensure_ray: ASHA-stopped trials
        runner = _section(base, stage.section)
        check_resources(runner, stage.section)  # a trial that cannot fit would wait forever
        context = {"stage": sweep.stage, "sweep_url": url, "metric": sweep.metric}
        if stage.runner == "affinity":
            context.update(_prepare_affinity(base, url, log))
            base.cams.checkpoint = context["checkpoint"]
        context["base"] = json.loads(base.model_dump_json())
        grid = _tune(sweep, base, url, folder, context, runner, retry_failed, log)
    rows = result_rows(grid, sweep, runner.epochs)
    return _write_results(sweep, base, url, folder, rows, log)


def concurrency(runner, requested: int = 0) -> int:
    """Trials at once: how many times one trial's workers fit the cluster (at least 1),
    capped by ``requested`` when given."""

    have = ray.cluster_resources()
    fits = [int(have.get("CPU", 0) // (runner.num_workers * runner.cpus_per_worker))]
    if runner.use_gpu:
        fits.append(int(have.get("GPU", 0) // runner.num_workers))
    cap = max(1, min(fits))
    return min(requested, cap) if requested else cap


def _tune(sweep, base, url, folder, context, runner, retry_failed, log):

    # A trial that ASHA stops leaves its Train controller blocked on the report queue nobody
    # reads any more (and its workers holding their CPUs): Tune kills such a trial's actor (and
    # with it the controller and workers) after this many seconds instead of 600.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "5")
    storage_path, name, fs = run_storage(f"{url}/tune", base)
    experiment = f"{url}/tune" if fs is None else f"{storage_path}/{name}"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), TRIAL_RESOURCES
    )
    space = search_space(sweep)
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        _check_same(folder, sweep)
        log(f"tune: resuming the sweep in {url} (finished trials are kept)")
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=retry_failed,
            param_space=space,
            storage_filesystem=fs,
        )
        return tuner.fit()
    n = concurrency(runner, sweep.max_concurrent_trials)
    folder.write_bytes("sweep.yaml", yaml.safe_dump(_plain(sweep.spec()), sort_keys=False).encode())
    log(
        f"tune: {sweep.name}: {sweep.num_samples} sample(s) of {len(space)} key(s) of the "
        f"{sweep.stage} stage, {n} trial(s) at once ({runner.num_workers} worker(s) each), "
        f"ASHA on {sweep.metric} ({sweep.mode}) over {runner.epochs} epochs; sweep folder {url}"
    )
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=runner.epochs,
        grace_period=sweep.scheduler["grace_period"],
        reduction_factor=sweep.scheduler["reduction_factor"],
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            trial_dirname_creator=_trial_dirname,
            # the cap lives in the generator (TuneConfig's is ignored with a search_alg)
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=n),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # record, go on
        ),
    )
    return tuner.fit()


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _plain(obj):
    return json.loads(json.dumps(obj))


def _check_same(folder, sweep: Sweep) -> None:
    if not folder.exists("sweep.yaml"):
        return
    saved, now = yaml.safe_load(folder.read_bytes("sweep.yaml")), _plain(sweep.spec())
    diff = [k for k in sorted({*saved, *now}) if saved.get(k) != now.get(k)]
    if diff:
        raise StageError(
            f"the sweep in {folder.describe()} was started with other settings ({', '.join(diff)}"
            f" differ from {folder.describe('sweep.yaml')}): run it with --restart to discard its "
            f"trials, or give this sweep another name (name=... or out=...)"
        )


def _discard(url: str) -> None:
    if "://" in url:
        raise StageError(
            f"--restart clears local sweep folders only: delete {url}/tune and "
            f"{url}/trials yourself"
        )
    for sub in ("tune", "trials"):
        shutil.rmtree(Path(url) / sub, ignore_errors=True)
    for name in ("sweep.yaml", "results.csv", "results.md", "best_config.yaml"):
        (Path(url) / name).unlink(missing_ok=True)


def _ensure_shards(base: ExperimentConfig, log) -> None:
    """The training and validation splits exist; the built-in dataset is built when missing."""

    need = {"data.train_url": base.data.train_url, "seg.val_url": base.seg.val_url}
    missing = {
        k: u
        for k, u in need.items()
        if not open_storage(u, endpoint_url=base.shards.endpoint_url).exists(MANIFEST_NAME)
    }
    if not missing:
        return
    own = base.shards.url.rstrip("/")
    if base.shards.source != "synthetic" or any(
        u.rstrip("/") not in (f"{own}/train", f"{own}/val") for u in missing.values()
    ):
        raise StageError(
            f"no shards at {', '.join(f'{k}={u}' for k, u in missing.items())}: build "
            f"them first with `mcis shards build`"
        )

    log(f"tune: building the built-in dataset's shards at {own}")
    build_dataset(
        "synthetic",
        open_storage(own, endpoint_url=base.shards.endpoint_url),
        build_options(base),
        source_args={"spec": synthetic_spec(base)},
        log=log,
    )


def _prepare_affinity(base: ExperimentConfig, url: str, log) -> dict:
    """What every AffinityNet trial shares, made once (each step skipped when complete): the
    base experiment's classifier, its CAMs and confident labels of the training images, and
    the CAMs of the validation split in the sweep folder."""

    endpoint = endpoint_url(base)
    checkpoint = base.cams.checkpoint
    if checkpoint is None:
        if not training_complete(run_url(base), base.train.epochs, endpoint):
            log(f"tune: training the base experiment's classifier first ({run_url(base)})")
            train_classifier(base, log=log)
        run = open_storage(run_url(base), endpoint_url=endpoint)
        checkpoint = run.describe(ckpt.newest_checkpoint(run))
    cfg = base.model_copy(deep=True)
    cfg.cams.checkpoint = checkpoint
    compute_cams(cfg, log=log)  # the training images' CAMs: AffinityNet's labels come from them
    make_labels(cfg, log=log)
    val = cfg.model_copy(deep=True)
    val.cams.split_url, val.cams.out_url = cfg.seg.val_url, f"{url}/val_cams"
    compute_cams(val, log=log)  # the validation images' CAMs: what the trials' walks start from
    return {"checkpoint": checkpoint, "val_cams": f"{url}/val_cams", "labels": labels_url(cfg)}


# ----------------------------------------------------------------------------- the table
def result_rows(grid, sweep: Sweep, epochs: int) -> list[dict]:
    """One row per trial: status, its values, the objective (last and best epoch), epochs,
    seconds and the error line of a failed trial; best first, failed last."""

    analysis = getattr(grid, "_experiment_analysis", None)
    trials = {t.trial_id: t for t in getattr(analysis, "trials", None) or []}
    rows = []
    for r in grid:
        m = r.metrics or {}
        trial = Path(str(r.path)).name if r.path else str(m.get("trial_id", "?"))
        df = r.metrics_dataframe
        history = []
        if df is not None and sweep.metric in df:
            history = [float(v) for v in df[sweep.metric].dropna()]
        value = m.get(sweep.metric)
        if r.error is not None:
            state = "failed"
        elif getattr(trials.get(trial), "status", "TERMINATED") != "TERMINATED":
            state = "interrupted"
        elif value is None:
            state = "no result"
        elif m.get("epoch", 0) >= epochs:
            state = "finished"
        else:
            state = f"stopped at epoch {m.get('epoch')} (ASHA)"
        pick = max if sweep.mode == "max" else min
        rows.append(
            {
                "trial": trial,
                "status": state,
                **{
                    k: (r.config or getattr(trials.get(trial), "config", {})).get(k)
                    for k in sweep.space
                },
                sweep.metric: value,
                f"best_{sweep.metric}": pick(history) if history else None,
                "epochs": m.get("epoch"),
                "seconds": _round(m.get("time_total_s"), 1),
                "error": worker_error(r.error) if r.error is not None else "",
            }
        )
    sign = -1 if sweep.mode == "max" else 1

    def order(row):
        v = row[sweep.metric]
        return (
            row["status"] == "failed",
            v is None,
            sign * v if v is not None else 0,
            row["trial"],
        )

    return sorted(rows, key=order)


def _round(v, digits):
    return round(float(v), digits) if isinstance(v, int | float) else v


def _cell(key: str, v, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in (metric, f"best_{metric}"):
        return f"{100 * v:.1f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict], sweep: Sweep, markdown: bool = False, width: int = 100) -> str:
    """The rows as aligned text (or markdown); error lines cut to ``width`` (CSV: whole)."""
    keys = list(rows[0]) if rows else ["trial", "status"]
    head = [f"{k} (%)" if k in (sweep.metric, f"best_{sweep.metric}") else k for k in keys]
    cells = [[_cell(k, row[k], sweep.metric) for k in keys] for row in rows]
    for r in cells:
        r[-1] = r[-1] if len(r[-1]) <= width else r[-1][: width - 3] + "..."
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def best_config(sweep: Sweep, base: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The base experiment + the best trial's values, under a new name (so ``mcis pipeline``
    trains it instead of finding the base experiment's finished runs)."""

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{base.name}-{sweep.name}-best")
    values = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    return load_config(sweep.base, [*sweep.overrides, *values, f"name={name}"])


def _write_results(sweep, base, url, folder, rows, log) -> SweepResult:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    folder.write_bytes("results.csv", buf.getvalue().encode())
    table = format_table(rows, sweep)
    scored = [r for r in rows if r[sweep.metric] is not None]
    best = next((r for r in scored if r["status"] == "finished"), scored[0] if scored else None)
    failed = sum(r["status"] == "failed" for r in rows)
    lines = [
        f"# Sweep {sweep.name}: {sweep.stage} stage, {sweep.metric} ({sweep.mode}) on the "
        f"validation split",
        "",
        f"Sweep file `{sweep.file}`, base `{sweep.base}`; {len(rows)} trials, {failed} failed.",
        "",
        format_table(rows, sweep, True),
        "",
    ]
    if best is not None:
        params = {k: best[k] for k in sweep.space}
        cfg = best_config(sweep, base, params)
        header = (
            f"# mcis tune: the best trial ({best['trial']}, {sweep.metric} "
            f"{100 * best[sweep.metric]:.1f}%) of the sweep {sweep.file}:\n"
            + "".join(f"#   {k}: {v}\n" for k, v in params.items())
            + "# Run it with: mcis pipeline --config <this file>\n"
        )
        folder.write_bytes("best_config.yaml", (header + dump_config(cfg)).encode())
        lines.append(
            f"Best: trial `{best['trial']}` "
            f"({', '.join(f'{k}={_cell(k, v, sweep.metric)}' for k, v in params.items())})"
            f": `best_config.yaml` (experiment `{cfg.name}`)."
        )
    folder.write_bytes("results.md", ("\n".join(lines) + "\n").encode())
    log(
        f"\ntune: {len(rows)} trials ({failed} failed); {sweep.metric} in % on the validation "
        f"split:\n{table}"
    )
    log(
        "tune: results.csv, results.md"
        + (", best_config.yaml" if best else "")
        + f" in {folder.describe()}"
    )
    return SweepResult(url, rows, best, table)
