"""The same config gives the same numbers on one machine: the whole pipeline, run twice from
scratch into two fresh run folders, reports the same CAM, pseudo-mask and segmentation mIoU to
the last bit, and its trained networks end with bit-identical weights. (Across CPUs the numbers
differ: torch picks kernels by CPU features, and training amplifies their round-off; README.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mcis_dist.runtime.checkpoint import resolve

from conftest import env, pipeline_cmd

# The demo at its smallest, on top of SMALL: 8 training images of 64-80 px (2 shards), one epoch
# of each trained stage, 64-pixel crops, one CAM scale without flip, a 4-step random walk. The
# classifier trains on 2 Ray Train workers (DDP, as in the demo); every other stage uses one
# worker or actor: each Ray process costs seconds of imports, and the test runs the pipeline twice.
TINY = [
    "synthetic.num_train=8",
    "synthetic.num_val=2",
    "synthetic.min_size=64",
    "synthetic.max_size=80",
    "shards.shard_size_mb=0.02",
    "train.epochs=1",
    "train.contrastive_from_epoch=0",
    "train.report_every_steps=1",
    "data.batch_size=2",
    "data.pool_size=8",
    "data.max_wait=8",
    "data.shuffle_buffer=8",
    "data.crop_size=64",
    "data.resize_long=[56,80]",
    "cams.flip=false",
    "cams.num_actors=1",
    "cams.eval_attention_pairs=0",
    "cams.eval_grid=0",
    "affinity.num_actors=1",
    "affinity.train.num_workers=1",
    "affinity.data.crop_size=64",
    "masks.steps=4",
    "masks.num_actors=1",
    "masks.eval_grid=0",
    "seg.train.num_workers=1",
    "seg.data.crop_size=64",
    "seg.num_actors=1",
    "seg.eval_grid=0",
]
NUMBERS = ("cam_miou_single", "cam_miou_coattentive", "pseudo_miou", "seg_miou")
# The trained networks' run folders, under <run_root>/demo/: classifier, AffinityNet, DeepLab.
TRAINED = ("cls", "affinity/run", "seg/run")


def run_pipeline(tmp_path: Path, run_root: str) -> Path:
    """`mcis pipeline` of the TINY config into a fresh ``run_root``; the shards are shared (the
    first run builds them, the second finds them complete). Returns the run folder."""
    cmd = pipeline_cmd(*TINY, f"shards.url={tmp_path}/shards", f"run_root={tmp_path}/{run_root}")
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / run_root / "demo"


def newest_weights(run_dir: Path) -> tuple[dict, str]:
    """The model state of the newest checkpoint of a Ray Train run folder, found as the stages
    find it (the newest ``checkpoint_*/checkpoint.pt``)."""
    saved, where = resolve(None, str(run_dir), None, what="trained", hint="none was written")
    return saved["model"], where


@pytest.mark.slow
def test_the_same_config_twice_gives_the_same_numbers_and_weights(tmp_path):
    first = run_pipeline(tmp_path, "first")
    second = run_pipeline(tmp_path, "second")

    reports = [json.loads((run / "report.json").read_text()) for run in (first, second)]
    numbers = [{key: report[key] for key in NUMBERS} for report in reports]
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in numbers[0].values()), numbers[0]
    assert numbers[0] == numbers[1]  # exact float equality, not approx

    for trained in TRAINED:
        (a, where_a), (b, where_b) = (newest_weights(run / trained) for run in (first, second))
        assert where_a.startswith(str(first)) and where_b.startswith(str(second))
        assert a.keys() == b.keys() and a, trained
        differ = [name for name in a if not torch.equal(a[name], b[name])]
        assert not differ, f"{trained}: {len(differ)} of {len(a)} tensors differ: {differ[:5]}"
