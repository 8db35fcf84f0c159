"""The `mcis` command line: builds, info, verify, the demo, and its error messages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcis_dist.cli import main

from fixtures_data import make_list_dataset

REPO = Path(__file__).resolve().parents[1]
SYNTH = [
    "shards",
    "build",
    "--source",
    "synthetic",
    "--num-train",
    "30",
    "--num-val",
    "6",
    "--shard-size",
    "0.12",
    "--no-progress",
    "--workers",
    "1",
]


def test_build_info_verify_round_trip(tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert main([*SYNTH, "--out", out]) == 0
    build_out = capsys.readouterr().out
    assert "[train]" in build_out and "[val]" in build_out
    assert main(["shards", "info", out]) == 0
    info = capsys.readouterr().out
    assert "samples     30 in" in info and "samples     6 in" in info and "disc" in info
    assert main(["shards", "info", f"{out}/val", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["split"] == "val" and manifest["num_samples"] == 6
    assert main(["shards", "verify", out]) == 0
    assert capsys.readouterr().out.count("hashes and counts match") == 2


def test_verify_fails_on_a_lost_shard(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main([*SYNTH, "--out", str(out), "--split", "train"]) == 0
    (out / "train" / "shard-000001.tar").unlink()
    capsys.readouterr()
    assert main(["shards", "verify", str(out / "train")]) == 1
    assert "shard-000001.tar does not exist" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--source", "list", "--out", "{tmp}/o"], "--list is required for --source list"),
        (
            [
                "--source",
                "list",
                "--list",
                "{tmp}/nope.txt",
                "--classes",
                "{tmp}/lid/classes.txt",
                "--image-root",
                "{tmp}/lid/images",
                "--out",
                "{tmp}/o",
            ],
            "list file .*nope.txt does not exist",
        ),
        (
            [
                "--source",
                "list",
                "--list",
                "{tmp}/lid/train.txt",
                "--classes",
                "{tmp}/lid/classes.txt",
                "--image-root",
                "{tmp}/missing",
                "--out",
                "{tmp}/o",
            ],
            "image root .*missing does not exist",
        ),
        (
            ["--source", "folder", "--folder-root", "{tmp}/lid/classes.txt", "--out", "{tmp}/o"],
            "folder root .* is not a folder",
        ),
        (
            ["--source", "synthetic", "--split", "test", "--out", "{tmp}/o"],
            "split 'test'.*'train', 'val'",
        ),
        (["--source", "synthetic", "--out", "gs://bucket/x"], "unsupported storage URL .*gs"),
        (["--source", "synthetic", "--out", "{tmp}/o", "--shard-size", "0"], "shard_size_mb=0"),
    ],
    ids=[
        "no-list",
        "missing-list",
        "missing-root",
        "not-a-folder",
        "bad-split",
        "bad-url",
        "bad-size",
    ],
)
def test_configuration_errors_are_clear_and_write_nothing(tmp_path, capsys, argv, words):
    make_list_dataset(tmp_path / "lid")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["shards", "build", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcis: error: ")
    assert re.search(words, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "train" / "manifest.json").exists()


def test_info_on_an_unfinished_build_says_how_to_finish(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main([*SYNTH, "--out", str(out), "--split", "train"]) == 0
    (out / "train" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["shards", "info", str(out / "train")]) == 1
    text = capsys.readouterr().out
    assert "unfinished" in text and "run the same `mcis shards build` command again" in text


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_shards(tmp_path):
    """SIGKILL the CLI mid-build (a lost node), re-run the same command, compare with a clean
    build: identical shards, and a manifest only once complete."""
    argv = [
        "shards",
        "build",
        "--source",
        "synthetic",
        "--num-train",
        "400",
        "--num-val",
        "4",
        "--split",
        "train",
        "--shard-size",
        "0.1",
        "--workers",
        "2",
        "--no-progress",
    ]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mcis_dist.cli", *argv, "--out", str(out)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    parts = out / "train" / "_parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.json")))
    assert done_before >= 3
    assert not (out / "train" / "manifest.json").exists()
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--out", str(tmp_path / "clean")]) == 0
    killed = json.loads((out / "train" / "manifest.json").read_text())
    clean = json.loads((tmp_path / "clean" / "train" / "manifest.json").read_text())
    assert killed["num_shards"] > done_before
    assert [s["sha256"] for s in killed["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert main(["shards", "verify", str(out / "train")]) == 0
    leftovers = [p.name for p in (out / "train").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written temporary files remain


def test_demo_rejects_a_bad_override(capsys):
    assert main(["demo", "synthetic.num_trian=5"]) == 2
    err = capsys.readouterr().err
    assert "num_trian" in err and "num_train" in err


def test_weights_convert_refuses_a_bad_params_file(tmp_path, capsys):
    bad = tmp_path / "resnet38.params"
    bad.write_bytes(b"\x12\x01\x00\x00\x00\x00\x00\x00" + b"garbage")
    assert main(["weights", "convert-resnet38", str(bad), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcis: error: ") and "resnet38.params" in err and "Traceback" not in err
    assert not (tmp_path / "out.pth").exists()
