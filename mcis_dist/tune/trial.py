"""One trial: its config, Tune's function trainable and what the trials share.

Each trial is one Ray Train run of the stage (the shared runner, ``mcis_dist.runtime.trainer``)
on the base config + the trial's values, validated after every epoch on the validation split's
masks (``mcis_dist.train.validate``: ``val_miou``); ``EpochReports`` (a ``TuneReportCallback``)
hands the workers' epoch-end metrics to Tune. Train V2's pattern: a Tune *function trainable*
(``run_trial``, a top-level function so that Tune can pickle it) builds the ``TorchTrainer``; it
reserves no CPU itself (``TRIAL_RESOURCES``). An affinity sweep first makes what all its trials
share once (``prepare_affinity``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from mcis_dist.affinity import train as affinity_train
from mcis_dist.cams.stage import compute_cams
from mcis_dist.config import ExperimentConfig, config_from_dict, write_run_config
from mcis_dist.masks.modes import MODES
from mcis_dist.masks.stage import make_labels
from mcis_dist.pipeline import training_complete
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.paths import endpoint_url, labels_url
from mcis_dist.runtime.trainer import fit
from mcis_dist.storage import open_storage
from mcis_dist.train import classifier
from mcis_dist.train.classifier import run_url, train_classifier
from mcis_dist.tune.sweep import SWEEP_STAGES, set_key

# A trial's function only builds a TorchTrainer and waits: it reserves no CPU, so a trial's
# workers fit where they alone would (Tune needs some non-zero resource: 1 byte of memory).
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}


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
        set_key(data, key, value)
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


def trial_dirname(trial) -> str:
    return trial.trial_id


def prepare_affinity(base: ExperimentConfig, url: str, log) -> dict:
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
