"""The same config gives the same numbers on one machine: the whole pipeline, run twice from
scratch, side by side, into two fresh run folders, reports the same CAM, pseudo-mask and
segmentation mIoU to the last bit, and its trained networks end with bit-identical weights.
(Across CPUs the numbers differ: torch picks kernels by CPU features, and training amplifies
their round-off; README.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mcis_dist.runtime.checkpoint import resolve

from conftest import TINY, env, pipeline_cmd

NUMBERS = ("cam_miou_single", "cam_miou_coattentive", "pseudo_miou", "seg_miou")
# The trained networks' run folders, under <run_root>/demo/: classifier, AffinityNet, DeepLab.
TRAINED = ("cls", "affinity/run", "seg/run")


def run_pipelines(tmp_path: Path, run_roots: tuple[str, ...]) -> list[Path]:
    """`mcis pipeline` of the TINY config, from scratch (its own shards too) into each fresh
    ``run_root``, all at once: each starts its own embedded Ray, and running them side by side
    both halves the test's time and shows that the numbers do not depend on how the processes
    were scheduled. Returns the run folders."""
    procs = []
    for root in run_roots:
        cmd = pipeline_cmd(
            *TINY, f"shards.url={tmp_path}/{root}/shards", f"run_root={tmp_path}/{root}"
        )
        procs.append(
            subprocess.Popen(
                cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-4000:]
    return [tmp_path / root / "demo" for root in run_roots]


def newest_weights(run_dir: Path) -> tuple[dict, str]:
    """The model state of the newest checkpoint of a Ray Train run folder, found as the stages
    find it (the newest ``checkpoint_*/checkpoint.pt``)."""
    saved, where = resolve(None, str(run_dir), None, what="trained", hint="none was written")
    return saved["model"], where


@pytest.mark.slow
def test_the_same_config_twice_gives_the_same_numbers_and_weights(tmp_path):
    first, second = run_pipelines(tmp_path, ("first", "second"))

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
