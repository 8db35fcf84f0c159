"""The driver: run (or resume) a sweep with Tune's ASHA scheduler and write its results.

The sweep folder (default ``<run_root>/<name>/tune/<sweep name>``) holds ``sweep.yaml`` (the
resolved sweep), Tune's experiment (``tune/``), the trials' runs (``trials/<trial id>/``),
``val_cams/`` (affinity sweeps: the val split's CAMs, made once), ``results.csv``,
``results.md`` and ``best_config.yaml``. ASHA stops the weak trials at its rungs;
``max_concurrent_trials`` is what the cluster's CPUs (GPUs) hold of one trial's workers.
Started again, a sweep resumes (``Tuner.restore``: finished trials are kept, unfinished ones go
on from their runs' checkpoints); a finished one just rewrites its table. A trial that crashes is
recorded as failed with its error, and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from mcis_dist.config import ExperimentConfig
from mcis_dist.formats.shards import MANIFEST_NAME
from mcis_dist.runtime.paths import absolute_paths, absolute_url, endpoint_url
from mcis_dist.runtime.session import ray_session
from mcis_dist.runtime.sharded import StageError
from mcis_dist.runtime.trainer import check_resources, run_storage
from mcis_dist.shards.build import build_dataset, build_options
from mcis_dist.shards.synthetic import synthetic_spec
from mcis_dist.storage import open_storage
from mcis_dist.tune.results import SweepResult, result_rows, write_results
from mcis_dist.tune.sweep import SWEEP_STAGES, Sweep, search_space, section_of
from mcis_dist.tune.trial import TRIAL_RESOURCES, prepare_affinity, run_trial, trial_dirname


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
        runner = section_of(base, stage.section)
        check_resources(runner, stage.section)  # a trial that cannot fit would wait forever
        context = {"stage": sweep.stage, "sweep_url": url, "metric": sweep.metric}
        if stage.runner == "affinity":
            context.update(prepare_affinity(base, url, log))
            base.cams.checkpoint = context["checkpoint"]
        context["base"] = json.loads(base.model_dump_json())
        grid = _tune(sweep, base, url, folder, context, runner, retry_failed, log)
    rows = result_rows(grid, sweep, runner.epochs)
    return write_results(sweep, base, url, folder, rows, log)


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
            trial_dirname_creator=trial_dirname,
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
