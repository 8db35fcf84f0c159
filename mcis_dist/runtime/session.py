"""The one way every entry point gets its Ray: the cluster it runs in, or an embedded local one."""

from __future__ import annotations

import os

import ray

from mcis_dist.runtime.raylog import HOOK

__all__ = ["ensure_ray", "ray_session"]


def ensure_ray(dashboard: bool = False) -> bool:
    """Use the cluster in RAY_ADDRESS (or the one ``ray job submit`` runs in); otherwise start an
    embedded local Ray bound to 127.0.0.1 that sends no usage statistics. True if it started
    (and so owns) an embedded Ray.

    ``dashboard`` gives an embedded Ray its dashboard (on 127.0.0.1, any free port): ``mcis tune``
    needs it, because Train V2's placement-group cleaner asks the State API whether a run's
    controller died, and a trial that ASHA stops kills its controller; without the dashboard
    its workers' CPUs stay reserved and the next trials wait forever."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    web = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0}
    ray.init(
        **(web if dashboard else {"include_dashboard": False}),
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": HOOK},
    )
    return True


class ray_session:  # noqa: N801 - used like a function: ``with ray_session(): ...``
    """``with ray_session():`` -- :func:`ensure_ray` on entry; on exit, shut down the embedded
    Ray this block started (a cluster, or a Ray someone else started, is left running)."""

    def __init__(self, dashboard: bool = False):
        self.dashboard = dashboard
        self.started = False

    def __enter__(self) -> bool:
        self.started = ensure_ray(self.dashboard)
        return self.started

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()
