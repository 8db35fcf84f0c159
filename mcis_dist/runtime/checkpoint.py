"""What a classifier checkpoint holds, and how it is written and read.

One file, ``checkpoint.pt``, inside the checkpoint directory that Ray Train uploads to the run's
storage (local or s3://; Ray keeps the newest ``keep_checkpoints`` and registers a checkpoint only
once its upload finished, so a crash mid-write never leaves one that loads as valid). It holds
plain data only — tensors, numbers, strings, lists, dicts — so it loads with
``torch.load(weights_only=True)``: a checkpoint from a stranger cannot run code.

Contents: the model (unwrapped from DDP), optimizer, LR scheduler, GradScaler, epoch and global
step, every rank's loader position and every rank's RNG states (torch, numpy, python), and the
resolved experiment config. Restoring all of them is what makes a resumed run end with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from mcis_dist.errors import StageError
from mcis_dist.runtime.paths import absolute_url, classifier_run_url, endpoint_url
from mcis_dist.storage import StorageError, open_storage

CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of finished checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not plain data, or for another model."""


def rng_state() -> dict:
    """This process's RNG states as plain data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, state: dict) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def load(directory: str | Path) -> dict:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no {CHECKPOINT_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for anything but plain data
        raise CheckpointError(
            f"{path} is not a plain-data checkpoint and will not be loaded (it would need "
            f"arbitrary unpickling): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None


def load_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load weights, naming every missing, unexpected or mis-shaped key on a mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError(f"{where} does not match the configured model ({'; '.join(parts)})")
    model.load_state_dict(state)


def newest_checkpoint(run_storage) -> str | None:
    """Name of the newest *finished* ``checkpoint_*`` folder of a Ray Train run.

    Ray writes ``checkpoint_manager_snapshot.json`` only after a checkpoint's upload finished,
    so a run killed while it copied a checkpoint leaves a newer folder with a truncated
    ``checkpoint.pt`` that the snapshot does not name; the snapshot's latest checkpoint is the
    one a resumed run restores, and the one every later stage must read. Folders outside the
    snapshot count only when there is no snapshot at all (checkpoints a user laid out by hand);
    Ray names them by time, so the largest name is the newest.
    """
    names = [d for d in run_storage.list_dirs() if d.startswith("checkpoint_")]
    if run_storage.exists(SNAPSHOT_FILE):
        where = run_storage.describe(SNAPSHOT_FILE)
        try:
            snapshot = json.loads(run_storage.read_bytes(SNAPSHOT_FILE))
            latest = snapshot.get("latest_checkpoint_result") or {}
            registered = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{where} is not a Ray Train checkpoint snapshot ({type(e).__name__}: {e}); "
                "it names the finished checkpoints of the run"
            ) from None
        newest = latest.get("checkpoint_dir_name") or (max(registered) if registered else None)
        if newest is not None and newest not in names:
            raise CheckpointError(f"{where} names {newest}, which is not in the run folder")
        return newest
    return max(names) if names else None


def load_from(url: str, endpoint_url: str | None = None) -> tuple[dict, str]:
    """Load a checkpoint from a folder holding ``checkpoint.pt`` or a ``.pt`` file, local or
    s3://; returns (state, the file's URL). Plain data only, like :func:`load`."""

    url = url.rstrip("/")
    parent, name = url.rsplit("/", 1) if url.endswith(".pt") else (url, CHECKPOINT_FILE)
    storage = open_storage(parent, endpoint_url=endpoint_url)
    where = storage.describe(name)
    try:
        blob = storage.read_bytes(name)
    except StorageError as e:
        raise CheckpointError(f"cannot read checkpoint {where}: {e}") from None
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), where
    except Exception as e:
        raise CheckpointError(
            f"{where} is not a plain-data checkpoint and will not be loaded (it would need "
            f"arbitrary unpickling): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None


def resolve(
    url: str | None,
    run_url: str,
    endpoint_url: str | None,
    *,
    what: str,
    hint: str,
    stage: str | None = None,
) -> tuple[dict, str]:
    """(saved checkpoint, where) of the checkpoint a stage should use: ``url`` (a folder with
    ``checkpoint.pt`` or a ``.pt`` file, local or s3://) or, when None, the newest
    ``checkpoint_*`` of the training run at ``run_url``. ``what`` names the kind ("classifier")
    and ``hint`` how to get one, both in the error; ``stage``, when given, must match the
    checkpoint's own ``stage`` entry (checkpoints without one are accepted)."""

    if url is None:
        run = open_storage(absolute_url(run_url), endpoint_url=endpoint_url)
        newest = newest_checkpoint(run)
        if newest is None:
            raise StageError(f"no {what} checkpoint under {run.describe()}: {hint}")
        url = run.describe(newest)
    saved, where = load_from(absolute_url(url), endpoint_url=endpoint_url)
    if not isinstance(saved, dict) or "model" not in saved:
        raise StageError(f"{where} is not a {what} checkpoint (it has no 'model' entry)")
    if stage is not None and saved.get("stage", stage) != stage:
        raise StageError(f"{where} is a {saved['stage']!r} checkpoint, not a {what} one")
    return saved, where


def classifier_checkpoint(cfg, url: str | None) -> tuple[dict, str]:
    """(model state dict, where) of the classifier checkpoint a stage maps with: ``url``, else
    ``cams.checkpoint``, else the newest of the experiment's classifier run."""

    hint = (
        "run `mcis train-cls` with this config first, or name one with --checkpoint / "
        "cams.checkpoint"
    )
    saved, where = resolve(
        url or cfg.cams.checkpoint,
        classifier_run_url(cfg),
        endpoint_url(cfg),
        what="classifier",
        hint=hint,
    )
    return saved["model"], where
