"""The ``dali`` backend streaming shards from S3: DALI's own S3 reader fetches the tars (its
index files are fetched once into the index cache), straight from the endpoint and through a
proxy that answers 503 SlowDown and resets connections mid-body. The batches must be exactly the
ones DALI makes from the same shards on local disk.

DALI's S3 client waits on the network while the pipeline holds the GIL, so moto's server and
the proxy run in processes of their own here (an in-process server thread could not answer);
and it keeps the first endpoint it meets for the life of the process, so every test here reads
through one proxy.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import torch
from s3_faults import ProxyProcess, Rule

from mcis_dist.config import DataConfig
from mcis_dist.data.dali import DaliReadError
from mcis_dist.data.loader import PairLoader

from conftest import S3_ENV, build_synthetic, small_data_config

pytestmark = pytest.mark.slow
BUCKET = "dali-bucket"


@pytest.fixture(scope="module")
def s3env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        mp.setenv("MCIS_S3_MAX_ATTEMPTS", "5")
        yield mp


@pytest.fixture(scope="module")
def split(tmp_path_factory, s3_endpoint_process, s3env) -> tuple[Path, str]:
    """A synthetic training split on local disk and the same files under s3://BUCKET/ds."""
    root = build_synthetic(
        tmp_path_factory.mktemp("dali_s3") / "ds", num_train=48, num_val=2, per_shard=8
    )
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_process)
    s3.create_bucket(Bucket=BUCKET)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"ds/{p.relative_to(root)}", Body=p.read_bytes())
    return root / "train", f"s3://{BUCKET}/ds/train"


def cfg(url, cache: Path, endpoint: str | None = None) -> DataConfig:
    return small_data_config(
        url, endpoint_url=endpoint, backend="dali", index_cache=str(cache), num_workers=1
    )


def one_epoch(c: DataConfig) -> list[dict]:
    return list(PairLoader(c, rank=0, world_size=1, device="cpu"))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g["key_m"] == w["key_m"] and g["key_n"] == w["key_n"]
        assert torch.equal(g["image_m"], w["image_m"]) and torch.equal(g["image_n"], w["image_n"])


@pytest.fixture(scope="module")
def local(split, tmp_path_factory) -> list[dict]:
    return one_epoch(cfg(split[0], tmp_path_factory.mktemp("cache_local")))


@pytest.fixture(scope="module")
def proxy(s3_endpoint_process, s3env):
    """The one endpoint DALI reads from in this process (its S3 client keeps the first it
    meets): a proxy in front of moto, forwarding faithfully until a test arms it."""
    with ProxyProcess(s3_endpoint_process, seed=3) as p:
        yield p


def test_dali_streams_a_split_from_s3_as_from_disk(split, local, proxy, tmp_path):
    proxy.disarm()
    cache = tmp_path / "idx"
    assert_same_batches(one_epoch(cfg(split[1], cache, proxy.endpoint)), local)
    assert proxy.requests["get_object"] > 0 and not proxy.faults
    # the index files were fetched once, named by their content hash
    cached = sorted(p.name for p in cache.rglob("*.idx"))
    assert len(cached) == len(list(split[0].glob("*.idx"))) > 1
    assert all(len(name) == len("0" * 64 + ".idx") for name in cached)


def test_dali_survives_slowdowns_and_resets(split, local, proxy, s3env, tmp_path):
    """503 SlowDown on reads and heads, connections reset mid-body: DALI's S3 client retries
    the first, and a broken body rebuilds the pipeline, which replays to the batch it stopped
    at; the epoch is the same. The endpoint in the config wins over the environment's."""
    s3env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    proxy.arm(
        [
            Rule("503", rate=0.3, ops=("get_object", "head_object")),
            Rule("reset", rate=0.3, ops=("get_object",), path=r"\.tar$"),
        ],
        max_streak=1,
        max_faults=12,
    )
    loader = PairLoader(cfg(split[1], tmp_path / "idx", proxy.endpoint), 0, 1, device="cpu")
    got = list(loader)
    summary = proxy.summary()
    resets = [f for f in proxy.faults if f.kind == "reset" and f.path.endswith(".tar")]
    proxy.disarm()
    assert proxy.fault_counts()["503"] and resets, summary
    assert_same_batches(got, local)
    assert 1 <= loader.stats["shard_errors"] <= len(resets), summary
    assert "s3://dali-bucket/ds/train" in loader.stats["last_error"], loader.stats


def test_a_shard_that_never_reads_names_the_split_and_the_setting(split, proxy, tmp_path):
    proxy.arm([Rule("reset", ops=("get_object",), path=r"\.tar$")])
    c = cfg(split[1], tmp_path / "idx", proxy.endpoint).model_copy(update={"dali_restarts": 1})
    with pytest.raises(DaliReadError, match=r"s3://dali-bucket/ds/train.*2 times.*dali_restarts=1"):
        one_epoch(c)
    proxy.disarm()


def test_a_second_endpoint_in_one_process_is_refused(split, proxy, s3_endpoint_process, tmp_path):
    """DALI's S3 client keeps the first endpoint of the process: reading another one would
    silently read from the first, so it is an error that says so."""
    one_epoch(cfg(split[1], tmp_path / "a", proxy.endpoint))  # (the endpoint in use)
    with pytest.raises(
        RuntimeError, match=r"already reads from http://127.0.0.1:\d+.*another process"
    ):
        one_epoch(cfg(split[1], tmp_path / "b", s3_endpoint_process))
