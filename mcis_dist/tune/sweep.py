"""The sweep file: what a sweep tunes, and how it is read and checked.

A sweep file (``configs/tune/*.yaml``) names a base experiment config, overrides of it, the stage
to tune (``SWEEP_STAGES``; ``cls``: the classifier; ``affinity``: AffinityNet and the random walk
of the pseudo masks) and a search space of dotted experiment keys, each with one distribution of
``KINDS``. ``load_sweep`` reads and checks it (every value a trial may get must pass the
experiment schema); ``search_space`` turns the space into Tune's ``param_space``.
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from mcis_dist.config import (
    YAML_EXPONENT,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    describe_schema,
    load_config,
)

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


def _leaf_keys() -> dict[str, str]:
    return {key: kind for key, kind, _default, _desc in describe_schema(ExperimentConfig)}


def tunable_keys(stage: SweepStage) -> list[str]:
    return [k for k in _leaf_keys() if k.startswith(stage.tunable) and not _fixed(k)]


def _fixed(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in FIXED or last.endswith(("_url", "_urls", "checkpoint")) or key == "name"


def set_key(data: dict, key: str, value: Any) -> None:
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
            set_key(trial, key, value)
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
    epochs = section_of(base, stage.section).epochs
    g, rf = sched["grace_period"], sched["reduction_factor"]
    if not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= epochs:
        raise ConfigError(
            f"{where}: scheduler.grace_period={g!r}: expected an integer in "
            f"[1, {stage.section}.epochs={epochs}]"
        )
    if not isinstance(rf, int | float) or isinstance(rf, bool) or rf <= 1:
        raise ConfigError(f"{where}: scheduler.reduction_factor={rf!r}: expected a number > 1")
    return sweep, base


def section_of(cfg: ExperimentConfig, dotted: str):
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
