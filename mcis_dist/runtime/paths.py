"""Where a run reads and writes: absolute URLs, stage folders and the one S3 endpoint.

Every stage resolves these here, so that no stage reads with one endpoint and writes with
another. The S3 endpoint of a run is, in this order, the first one set of:

1. ``shards.endpoint_url`` (the config's, where the shards were built);
2. ``data.endpoint_url`` (the loader's);
3. the environment's ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``;

and none means AWS itself. Local paths are made absolute before a stage starts, because Ray
workers and actors run in another working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcis_dist.config import ExperimentConfig

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

__all__ = [
    "absolute_paths",
    "absolute_url",
    "affinity_run_url",
    "classifier_run_url",
    "endpoint_url",
    "labels_url",
    "seg_run_url",
    "stage_url",
]


def endpoint_url(cfg: ExperimentConfig) -> str | None:
    """The run's S3 endpoint, in the order the module docstring gives (None: AWS)."""
    for value in (cfg.shards.endpoint_url, cfg.data.endpoint_url):
        if value:
            return value
    return next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)


def absolute_url(url: str | None) -> str | None:
    """``url`` unchanged if it has a scheme (``s3://``), else an absolute local path."""
    if url is None or "://" in url:
        return url
    return str(Path(url).expanduser().absolute())


def stage_url(cfg: ExperimentConfig, subdir: str) -> str:
    """``<run_root>/<name>/<subdir>``, absolute: a stage's folder in the experiment's run."""
    return f"{absolute_url(cfg.run_root.rstrip('/'))}/{cfg.name}/{subdir}"


def classifier_run_url(cfg: ExperimentConfig) -> str:
    """The classifier's Ray Train run (checkpoints, metrics): ``<run_root>/<name>/cls``."""
    return stage_url(cfg, "cls")


def affinity_run_url(cfg: ExperimentConfig) -> str:
    """AffinityNet's Ray Train run: ``<affinity.out_url>/run``."""
    return f"{cfg.affinity.out_url.rstrip('/')}/run"


def labels_url(cfg: ExperimentConfig) -> str:
    """AffinityNet's confident-label shards: ``<affinity.out_url>/labels``."""
    return f"{cfg.affinity.out_url.rstrip('/')}/labels"


def seg_run_url(cfg: ExperimentConfig) -> str:
    """The segmentation network's Ray Train run: ``<seg.out_url>/run``."""
    return f"{cfg.seg.out_url.rstrip('/')}/run"


#: every config field that holds a path or URL, by section
_PATH_FIELDS = (
    ("data", ("train_url",)),
    ("shards", ("url",)),
    ("model", ("weights",)),
    ("cams", ("split_url", "out_url", "checkpoint")),
    ("affinity", ("cams_url", "out_url", "val_cams_url")),
    ("masks", ("cams_url", "out_url", "checkpoint")),
    ("seg", ("masks_url", "val_url", "out_url", "weights")),
)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose local paths (shards, weights, run root, stage folders) are absolute; URLs
    stay as they are."""
    cfg = cfg.model_copy(deep=True)
    cfg.run_root = absolute_url(cfg.run_root)
    cfg.data.extra_urls = [absolute_url(u) for u in cfg.data.extra_urls]
    for section, names in _PATH_FIELDS:
        part = getattr(cfg, section)
        for n in names:
            setattr(part, n, absolute_url(getattr(part, n)))
    return cfg
