"""Which checkpoint of a training run the later stages read (runtime/checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch

from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.storage import open_storage


def _run_folder(tmp_path, snapshot: dict | None):
    run = tmp_path / "cls"
    finished = run / "checkpoint_2026-01-01_00-00-01.000000"
    killed = run / "checkpoint_2026-01-01_00-00-09.000000"  # newer, copy cut off by a kill
    finished.mkdir(parents=True)
    killed.mkdir()
    ckpt.save(finished, {"model": {"w": torch.ones(3)}, "stage": "cls"})
    blob = (finished / ckpt.CHECKPOINT_FILE).read_bytes()
    (killed / ckpt.CHECKPOINT_FILE).write_bytes(blob[: len(blob) // 2])
    if snapshot is not None:
        (run / ckpt.SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return run, finished.name, killed.name


def test_a_checkpoint_cut_off_by_a_kill_is_never_the_newest(tmp_path):
    snapshot = {
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01.000000"}],
        "latest_checkpoint_result": {
            "checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01.000000"
        },
    }
    run, finished, _ = _run_folder(tmp_path, snapshot)
    assert ckpt.newest_checkpoint(open_storage(str(run))) == finished
    saved, where = ckpt.resolve(None, str(run), None, what="classifier", hint="train one")
    assert finished in where
    assert torch.equal(saved["model"]["w"], torch.ones(3))


def test_without_a_snapshot_the_newest_folder_counts_and_a_truncated_file_is_named(tmp_path):
    run, _, killed = _run_folder(tmp_path, None)
    assert ckpt.newest_checkpoint(open_storage(str(run))) == killed
    with pytest.raises(ckpt.CheckpointError, match=f"{killed}.*checkpoint.pt"):
        ckpt.resolve(None, str(run), None, what="classifier", hint="train one")


@pytest.mark.parametrize(
    "snapshot, expected",
    [
        ("{not json", "not a Ray Train checkpoint snapshot"),
        (json.dumps({"latest_checkpoint_result": None}), "KeyError"),
        (
            json.dumps(
                {"checkpoint_results": [], "latest_checkpoint_result": {"checkpoint_dir_name": "x"}}
            ),
            "names x, which is not in the run folder",
        ),
    ],
)
def test_a_broken_snapshot_is_named(tmp_path, snapshot, expected):
    run, _, _ = _run_folder(tmp_path, None)
    (run / ckpt.SNAPSHOT_FILE).write_text(snapshot)
    with pytest.raises(ckpt.CheckpointError, match=expected) as e:
        ckpt.newest_checkpoint(open_storage(str(run)))
    assert ckpt.SNAPSHOT_FILE in str(e.value)
