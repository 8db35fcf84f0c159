"""Quieter Ray worker logs for the embedded local Ray (``mcis demo``, ``mcis pipeline``).

Ray forwards every worker's INFO lines to the driver's console. Ours (the progress lines) are
worth reading; a few of Ray's own are not at that level: Ray Train logs each ``report()`` call
in full, its placement-group cleaner warns every second that the state API is unavailable (it
needs the dashboard, which the embedded Ray leaves off), and botocore announces where it found
credentials in every process. :func:`quiet_worker_logs` runs in each worker process (Ray's
``worker_process_setup_hook``) and raises those loggers to WARNING / ERROR; nothing else changes.
Import-light on purpose: it runs in every Ray worker process.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec

__all__ = ["HOOK", "quiet_worker_logs"]

HOOK = "mcis_dist.runtime.raylog.quiet_worker_logs"

_LEVELS = {
    "botocore.credentials": logging.WARNING,
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def quiet_worker_logs() -> None:
    for name, level in _LEVELS.items():
        logging.getLogger(name).setLevel(level)
    # Ray Train's worker context names its logger by file path, not by module.

    spec = find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
