"""Shard-parallel stages on a pool of Ray actors: CAMs, pseudo masks, predictions.

A stage maps every input shard to one output shard. Each output shard is published atomically
(tar, then index, then a *part record* ``_parts/<name>.json``), and the stage's ``manifest.json``
is written last, from the part records, once every shard is done. So:

* **idempotent**: a re-run skips every shard whose part record carries the same *fingerprint*
  (a hash of the stage's settings, its model and the input shard's checksum) and redoes the rest;
  a finished stage (manifest present, same fingerprint) is skipped whole;
* **fault tolerant**: when an actor dies (its process killed, its node lost) the driver gets
  ``RayActorError`` for the shard it held, puts the shard back in the queue and starts a
  replacement actor, up to ``max_failures`` times; a half-written shard of the dead actor is a
  temporary file that never looks finished, and the redone shard replaces it whole;
* **no duplicates, nothing missing**: one output shard per input shard, named after it.

The stage supplies an actor class with ``run(job: dict) -> dict`` (the part record) and the
driver only schedules (``run_sharded``). The actor owns one model for its whole life (one actor
per GPU, or ``num_actors`` on CPUs), so the model is built and loaded once, not per shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from mcis_dist.errors import StageError
from mcis_dist.formats.manifest import MANIFEST_NAME, PARTS_DIR
from mcis_dist.storage import ENV_VARS as S3_ENV_VARS

__all__ = [
    "StageError",
    "Timer",
    "actor_options",
    "fingerprint",
    "clean_temporaries",
    "existing_parts",
    "part_name",
    "write_part",
    "plan_actors",
    "run_sharded",
    "stage_complete",
]


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (settings, model id, input checksum)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def part_name(output_name: str) -> str:
    return f"{PARTS_DIR}/{output_name.rsplit('.', 1)[0]}.json"


def existing_parts(storage) -> dict[str, dict]:
    """The part records already in an output folder, by output shard name."""
    parts = {}
    for name in storage.list(PARTS_DIR):
        if not name.endswith(".json"):
            continue
        try:
            record = json.loads(storage.read_bytes(f"{PARTS_DIR}/{name}"))
        except (ValueError, OSError):
            continue  # an unreadable record: that shard is simply redone
        parts[record.get("name", "")] = record
    return parts


def clean_temporaries(storage) -> int:
    """Remove the hidden ``.<name>.*.tmp`` files that writers killed mid-shard left in a local
    output folder (S3 writes are staged outside the bucket); call it when no writer is running."""
    root = getattr(storage, "root", None)
    if root is None or not root.is_dir():
        return 0
    stale = [p for p in root.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def write_part(storage, record: dict) -> None:
    """Publish a shard's part record (after its tar and index)."""
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    storage.write_bytes(part_name(record["name"]), blob)


def stage_complete(storage, stage_fingerprint: str) -> dict | None:
    """The stage's manifest if it exists and was written with this fingerprint."""
    if not storage.exists(MANIFEST_NAME):
        return None
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST_NAME))
    except ValueError:
        return None
    return manifest if manifest.get("fingerprint") == stage_fingerprint else None


def plan_actors(num_actors: int, use_gpu: bool, cpus_per_actor: int, jobs: int) -> int:
    """How many actors to start: the configured number, else one per GPU (``use_gpu``) or as
    many as the cluster's CPUs allow; never more than there are shards to do."""

    have = ray.cluster_resources()
    if use_gpu:
        gpus = int(have.get("GPU", 0))
        if gpus < 1:
            raise StageError("use_gpu is set but the Ray cluster has no GPU")
        fit = gpus
    else:
        fit = int(have.get("CPU", 0) // cpus_per_actor)
        if fit < 1:
            raise StageError(
                f"cpus_per_actor={cpus_per_actor} does not fit the cluster's "
                f"{have.get('CPU', 0):g} CPUs"
            )
    n = num_actors or fit
    return max(1, min(n, jobs))


def run_sharded(
    jobs: Sequence[dict],
    make_actor: Callable[[], object],
    num_actors: int,
    *,
    max_failures: int = 3,
    progress: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
    what: str = "shard",
) -> list[dict]:
    """Run ``actor.run(job)`` for every job over ``num_actors`` actors; return the records in
    job order. A dead actor's job is redone by a replacement actor (at most ``max_failures``
    replacements); an exception raised inside ``run`` is a bug or a bad input that the stage
    could not skip, and fails the stage with the shard named."""

    pending = deque(range(len(jobs)))
    idle = [make_actor() for _ in range(min(num_actors, len(jobs)))]
    inflight: dict = {}
    records: dict[int, dict] = {}
    failures = 0
    try:
        while pending or inflight:
            while idle and pending:
                actor, i = idle.pop(), pending.popleft()
                inflight[actor.run.remote(jobs[i])] = (actor, i)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, i = inflight.pop(ready[0])
            try:
                records[i] = ray.get(ready[0])
            except RayActorError as e:
                failures += 1
                cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if failures > max_failures:
                    raise StageError(
                        f"{failures} actors lost (max_failures={max_failures}); last while "
                        f"doing {what} {jobs[i].get('name', i)}: {cause}"
                    ) from None
                log(
                    f"actor lost while doing {what} {jobs[i].get('name', i)}; redoing it on a "
                    f"new actor ({failures}/{max_failures})"
                )
                pending.appendleft(i)
                idle.append(make_actor())
            except RayTaskError as e:
                raise StageError(f"{what} {jobs[i].get('name', i)}: {_cause(e)}") from None
            else:
                idle.append(actor)
                if progress is not None:
                    progress(records[i])
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)
    return [records[i] for i in range(len(jobs))]


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def actor_options(use_gpu: bool, cpus_per_actor: int) -> dict:
    """Ray options of a stage actor: one GPU each, or ``cpus_per_actor`` CPUs."""
    opts = {"num_cpus": cpus_per_actor, "max_restarts": 0}
    if use_gpu:
        opts["num_gpus"] = 1
    forwarded = ("AWS_ENDPOINT_URL", *S3_ENV_VARS)  # to actors on any node
    env = {k: os.environ[k] for k in forwarded if k in os.environ}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


class Timer:
    """Seconds since creation (for the manifests' ``seconds``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)
