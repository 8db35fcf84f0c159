"""Shards on a real S3 endpoint (moto's server on 127.0.0.1): build, read back, verify,
resume, credentials kept out of every output, and clear errors for unusable buckets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import boto3
import pytest
import webdataset as wds
from webdataset.gopen import gopen_schemes

from mcis_dist.cli import main
from mcis_dist.data.stream import register_webdataset_s3
from mcis_dist.formats.shards import read_manifest
from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import LocalStorage, S3Storage, StorageError, open_url

from conftest import S3_ENV
from test_shards_dali import dali_read_all

ARGS = [
    "--source",
    "synthetic",
    "--num-train",
    "30",
    "--num-val",
    "8",
    "--shard-size",
    "0.12",
    "--no-progress",
]


def all_objects(endpoint, bucket) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.slow
def test_build_to_s3_matches_local_and_reads_back(s3_endpoint, s3_bucket, tmp_path, capsys):
    url = f"s3://{s3_bucket}/datasets/demo"
    assert (
        main(
            [
                "shards",
                "build",
                *ARGS,
                "--out",
                url,
                "--endpoint-url",
                s3_endpoint,
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert main(["shards", "build", *ARGS, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main(["shards", "verify", url, "--endpoint-url", s3_endpoint]) == 0
    assert main(["shards", "info", f"{url}/train", "--endpoint-url", s3_endpoint]) == 0
    printed = capsys.readouterr()
    assert "OK, " in printed.out and "samples     30" in printed.out

    remote = read_manifest(S3Storage(f"{url}/train", endpoint_url=s3_endpoint))
    local = read_manifest(LocalStorage(tmp_path / "local" / "train"))
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]

    # webdataset streams the shards straight from S3 through a registered s3 handler.
    old = gopen_schemes.get("s3")
    register_webdataset_s3(endpoint_url=s3_endpoint)
    try:
        urls = [f"{url}/train/{s['name']}" for s in remote["shards"]]
        keys = [json.loads(x["json"])["key"] for x in wds.WebDataset(urls, shardshuffle=False)]
    finally:
        gopen_schemes["s3"] = old
    assert keys == [k for s in remote["shards"] for k in s["keys"]]

    # DALI reads the S3-built shards (fetched with their .idx files) on the CPU.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = "datasets/demo/train"
    tars, idxs = [], []
    for s in remote["shards"]:
        for name, dest in ((s["name"], tars), (s["index"], idxs)):
            s3.download_file(s3_bucket, f"{prefix}/{name}", str(tmp_path / name))
            dest.append(str(tmp_path / name))
    seen = dali_read_all(tars, idxs, remote["num_samples"])
    assert sorted(seen) == sorted(keys)

    # Credentials never reach a manifest, a part record, an index or the console.
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"].encode()
    access = S3_ENV["AWS_ACCESS_KEY_ID"].encode()
    for key, body in all_objects(s3_endpoint, s3_bucket).items():
        assert secret not in body and access not in body, key
    assert secret.decode() not in printed.out + printed.err


class FlakyS3(S3Storage):
    def child(self, name):
        return FlakyS3(f"{self.url}/{name}", self.endpoint_url)

    def write_bytes(self, name, data):
        if name == "shard-000001.idx" and not os.environ.get("FLAKY_DONE"):
            os.environ["FLAKY_DONE"] = "1"
            raise StorageError("simulated: connection reset by peer")
        super().write_bytes(name, data)


@pytest.mark.slow
def test_interrupted_s3_build_resumes(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.delenv("FLAKY_DONE", raising=False)
    spec = SyntheticSpec(num_train=30, num_val=4)
    opts = BuildOptions(shard_size_mb=0.12, workers=1, progress=False)
    url = f"s3://{s3_bucket}/ds"
    with pytest.raises(StorageError, match="simulated"):
        build_dataset(
            "synthetic",
            FlakyS3(url, s3_endpoint),
            opts,
            ["train"],
            {"spec": spec},
            log=lambda *_: None,
        )
    assert "ds/train/manifest.json" not in all_objects(s3_endpoint, s3_bucket)
    m = build_dataset(
        "synthetic", FlakyS3(url, s3_endpoint), opts, ["train"], {"spec": spec}, log=lambda *_: None
    )["train"]
    assert m["num_samples"] == 30
    assert main(["shards", "verify", url, "--endpoint-url", s3_endpoint]) == 0


def test_missing_bucket_fails_before_any_work(s3_endpoint, s3_bucket, capsys):
    code = main(
        [
            "shards",
            "build",
            *ARGS,
            "--out",
            "s3://no-such-bucket-xyz/p",
            "--endpoint-url",
            s3_endpoint,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bucket 'no-such-bucket-xyz' does not exist" in err
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in err


def test_unreachable_endpoint_is_a_clear_error(s3_bucket, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    t0 = time.monotonic()
    code = main(
        ["shards", "info", f"s3://{s3_bucket}/x", "--endpoint-url", f"http://127.0.0.1:{port}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the S3 endpoint" in err, err
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_access_denied_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    """A moto server that enforces IAM: unknown credentials are refused (403)."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        code = main(
            [
                "shards",
                "build",
                *ARGS,
                "--out",
                "s3://locked-bucket/p",
                "--endpoint-url",
                f"http://127.0.0.1:{port}",
            ]
        )
    finally:
        server.terminate()
        server.wait(10)
    err = capsys.readouterr().err
    assert code == 2
    assert "access denied" in err and "locked-bucket" in err, err
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in err


def test_open_url_names_the_missing_object(s3_endpoint, s3_bucket):
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/nope/x.tar does not exist"):
        open_url(f"s3://{s3_bucket}/nope/x.tar", endpoint_url=s3_endpoint)
