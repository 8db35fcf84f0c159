"""``mcis tune``: a Ray Tune sweep over a trained stage's settings, ASHA early stopping.

A sweep file names a base experiment config, overrides of it, the stage to tune and a search
space of dotted experiment keys; each trial is one Ray Train run of the stage on the base config
+ the trial's values, validated after every epoch, and ASHA stops the weak trials. The modules,
each importing only the ones above it in this list:

- ``sweep``: the sweep file (``Sweep``, ``SWEEP_STAGES``, ``load_sweep``, ``search_space``);
- ``trial``: one trial (``trial_config``, ``run_trial``: Tune's function trainable);
- ``results``: the trials' table and the best trial's config (``SweepResult``);
- ``run``: the driver (``run_sweep``: run or resume a sweep, write its results).
"""

from __future__ import annotations

from mcis_dist.tune.results import SweepResult, best_config, format_table, result_rows
from mcis_dist.tune.run import concurrency, run_sweep, sweep_url
from mcis_dist.tune.sweep import KINDS, SWEEP_STAGES, Sweep, SweepStage, load_sweep, search_space
from mcis_dist.tune.trial import EpochReports, run_trial, trial_config

__all__ = [
    "KINDS",
    "SWEEP_STAGES",
    "EpochReports",
    "Sweep",
    "SweepResult",
    "SweepStage",
    "best_config",
    "concurrency",
    "format_table",
    "load_sweep",
    "result_rows",
    "run_sweep",
    "run_trial",
    "search_space",
    "sweep_url",
    "trial_config",
]
