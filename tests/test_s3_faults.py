"""A flaky S3: every S3 path of the project, through a proxy (tests/s3_faults.py) in front of
moto's server that answers 500/503 SlowDown, resets connections mid-body, trickles bodies and
stalls past the client's read timeout. Each test says which faults it injected, checks that they
were injected (the proxy's record) and that nothing was lost or duplicated (counts, hashes);
faults that outlast the retries must fail with the s3:// URL named and nothing that looks
finished left behind."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import time
from pathlib import Path

import boto3
import pytest
import torch
from s3_faults import Rule, S3FaultProxy, s3_operation

from mcis_dist.cli import main
from mcis_dist.storage import S3Storage, StorageError, open_url

from conftest import S3_ENV, small_data_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
BUILD = [
    "shards",
    "build",
    "--source",
    "synthetic",
    "--num-train",
    "24",
    "--num-val",
    "4",
    "--max-samples-per-shard",
    "4",
    "--workers",
    "1",
    "--no-progress",
]
READ_TIMEOUT = 2  # seconds (MCIS_S3_READ_TIMEOUT); the proxy's stalls last longer
STALL_S = 3.0


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def s3env():
    """Dummy credentials, short timeouts and few attempts (so stalls and give-ups are quick)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.setenv("MCIS_S3_MAX_ATTEMPTS", "5")
        mp.setenv("MCIS_S3_READ_TIMEOUT", str(READ_TIMEOUT))
        mp.setenv("MCIS_S3_CONNECT_TIMEOUT", "2")
        yield


@pytest.fixture(scope="module")
def bucket(s3_endpoint, s3env) -> str:
    name = "faults-bucket"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3_endpoint, s3env):
    """A fault-injecting proxy in front of moto, with no faults until a test arms it."""
    with S3FaultProxy(s3_endpoint, seed=7, stall_s=STALL_S) as p:
        yield p


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same build, to a local folder, with no S3 and no faults: the bytes to match."""
    root = tmp_path_factory.mktemp("faults") / "reference"
    assert main([*BUILD, "--out", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def s3_shards(reference, bucket, s3_endpoint) -> str:
    """The reference shards copied to S3 (straight to moto): s3://bucket/ref/{train,val}."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for name, data in local_files(reference).items():
        s3.put_object(Bucket=bucket, Key=f"ref/{name}", Body=data)
    return f"s3://{bucket}/ref"


# ------------------------------------------------------------------------------------- helpers
def local_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def s3_objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/``, read straight from moto (not through the proxy)."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for o in page.get("Contents", []):
            key = o["Key"]
            out[key[len(prefix) + 1 :]] = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_timing(manifest: bytes) -> dict:
    """A build manifest minus the one field that differs between two identical builds."""
    m = json.loads(manifest)
    m["build"].pop("seconds")
    return m


def assert_faults(proxy: S3FaultProxy, *kinds: str) -> str:
    """Faults of each kind were injected (so the test cannot pass vacuously); the summary."""
    counts = proxy.fault_counts()
    missing = [k for k in kinds if not counts.get(k)]
    assert not missing, f"no {missing} fault was injected; {proxy.summary()}"
    return proxy.summary()


# ---------------------------------------------------------------------------- the proxy itself
def test_proxy_forwards_faithfully(proxy, bucket, s3_endpoint):
    """Without faults the proxy is transparent: GET, ranged GET (206 + Content-Range), HEAD,
    listing, a multipart upload, and a chunked request body."""
    from boto3.s3.transfer import TransferConfig

    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    via = boto3.client("s3", endpoint_url=proxy.endpoint)
    data = bytes(range(256)) * 4096  # 1 MiB
    via.put_object(Bucket=bucket, Key="fwd/a.bin", Body=data)
    assert direct.get_object(Bucket=bucket, Key="fwd/a.bin")["Body"].read() == data
    got = via.get_object(Bucket=bucket, Key="fwd/a.bin", Range="bytes=1000-2999")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 1000-2999/{len(data)}"
    assert got["Body"].read() == data[1000:3000]
    head = via.head_object(Bucket=bucket, Key="fwd/a.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == direct.head_object(Bucket=bucket, Key="fwd/a.bin")["ETag"]
    assert [o["Key"] for o in via.list_objects_v2(Bucket=bucket, Prefix="fwd/")["Contents"]] == [
        "fwd/a.bin"
    ]
    big = bytes(range(251)) * (12 * 2**20 // 251)  # 3 parts of 5 MiB
    cfg = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    via.upload_fileobj(io.BytesIO(big), bucket, "fwd/big.bin", Config=cfg)
    assert direct.get_object(Bucket=bucket, Key="fwd/big.bin")["Body"].read() == big
    ops = proxy.requests
    assert ops["upload_part"] == 3 and ops["create_multipart"] == ops["complete_multipart"] == 1
    # A chunked request body (a generator has no length) arrives whole.
    conn = http.client.HTTPConnection(proxy.endpoint.split("//")[1])
    conn.request(
        "PUT",
        f"/{bucket}/fwd/chunked.txt",
        body=iter([b"hello ", b"chunked"]),
        encode_chunked=True,
        headers={"Transfer-Encoding": "chunked"},
    )
    assert conn.getresponse().status == 200
    conn.close()
    assert (
        direct.get_object(Bucket=bucket, Key="fwd/chunked.txt")["Body"].read() == b"hello chunked"
    )
    assert proxy.faults == []


def test_proxy_faults_are_bounded_filtered_and_recorded(proxy, bucket, s3_endpoint):
    from botocore.config import Config

    no_retry = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=30)
    via = boto3.client("s3", endpoint_url=proxy.endpoint, config=no_retry)
    via.put_object(Bucket=bucket, Key="bound/x", Body=b"x" * 10000)
    # per-method filter and per-rule cap: two 503s on GET only, then none
    proxy.arm([Rule("503", methods=("GET",), max_count=2)])
    via.head_object(Bucket=bucket, Key="bound/x")
    codes = []
    for _ in range(4):
        try:
            via.get_object(Bucket=bucket, Key="bound/x")["Body"].read()
            codes.append(200)
        except via.exceptions.ClientError as e:
            codes.append(e.response["Error"]["Code"])
    assert codes == ["SlowDown", "SlowDown", 200, 200], proxy.summary()
    assert [(f.kind, f.method, f.path, f.op) for f in proxy.faults] == [
        ("503", "GET", f"/{bucket}/bound/x", "get_object")
    ] * 2
    # the total cap
    proxy.arm([Rule("500")], max_faults=3)
    errors = 0
    for _ in range(5):
        try:
            via.head_object(Bucket=bucket, Key="bound/x")
        except via.exceptions.ClientError:
            errors += 1
    assert errors == 3 and proxy.fault_counts() == {"500": 3}
    # the time window: nothing after it closes
    proxy.arm([Rule("500")], window_s=(0.0, 0.3))
    time.sleep(0.4)
    via.head_object(Bucket=bucket, Key="bound/x")
    assert proxy.faults == [] and proxy.requests["head_object"] == 1
    # a reset mid-body breaks the client's read of the body (headers came through)
    proxy.arm([Rule("reset", ops=("get_object",), max_count=1)])
    body = via.get_object(Bucket=bucket, Key="bound/x")["Body"]
    with pytest.raises(Exception, match="reset|Connection broken|IncompleteRead"):
        body.read()
    assert proxy.fault_counts() == {"reset": 1}
    assert s3_operation("PUT", "/b/k", "partNumber=1&uploadId=u") == "upload_part"
    with pytest.raises(ValueError, match="fault kind"):
        Rule("teapot")


# --------------------------------------------------------------------------------- a. building
def test_build_through_5xx_and_resets_is_byte_identical(proxy, bucket, s3_endpoint, reference):
    """`mcis shards build` to S3 under 500s, 503 SlowDowns, resets and a stall: the shards,
    indexes, part records and manifest are the fault-free build's, byte for byte."""
    # one fault of each kind for certain, then a seeded share of every request
    once = [Rule(k, ops=("put_object",), max_count=1) for k in ("503", "stall_headers", "reset")]
    proxy.arm(
        [*once, Rule("503", rate=0.12), Rule("500", rate=0.08), Rule("reset", rate=0.15)],
        max_faults=14,
        max_streak=2,
    )
    url = f"s3://{bucket}/built"
    assert main([*BUILD, "--out", url, "--endpoint-url", proxy.endpoint]) == 0, proxy.summary()
    summary = assert_faults(proxy, "503", "500", "reset", "stall_headers")
    assert {"put_object"} <= {f.op for f in proxy.faults}, summary
    proxy.disarm()

    got, want = s3_objects(s3_endpoint, bucket, "built"), local_files(reference)
    assert sorted(got) == sorted(want), f"objects differ from the fault-free build; {summary}"
    for name in want:
        if name.endswith("manifest.json"):
            assert without_timing(got[name]) == without_timing(want[name]), f"{name}; {summary}"
        else:
            assert sha(got[name]) == sha(want[name]), f"{name} differs; {summary}"
    manifest = json.loads(got["train/manifest.json"])
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    assert manifest["num_samples"] == 24 == len(keys) == len(set(keys)), summary


# -------------------------------------------------------------------------------- b. streaming
def first_pass(shard_urls: tuple[str, ...], endpoint: str) -> tuple[list, object]:
    """(key, {member: sha256}) of every sample of one epoch's first pass over the shards, as the
    training stream reads them (shuffle buffer 1: in stream order), and the worker's stats."""
    from mcis_dist.data.sharding import Unit
    from mcis_dist.data.stream import PairStream, StreamSpec, WorkerStats
    from mcis_dist.data.transforms import AugmentSpec

    spec = StreamSpec(
        shard_urls=shard_urls,
        num_samples=24,
        num_classes=8,
        batch_size=4,
        augment=AugmentSpec(),
        shuffle_buffer=1,
        endpoint_url=endpoint,
    )
    stream, stats = PairStream(spec), WorkerStats()
    out = []
    for raw, cycle in stream._raw_samples(Unit(0, 1, 0, 1), stats):
        if cycle > 0:
            break
        members = {k: sha(v) for k, v in raw.items() if isinstance(v, bytes)}
        out.append((raw["__key__"], members))
    return out, stats


def loader_epoch(url: str, endpoint: str) -> tuple[list, dict]:
    from mcis_dist.data.loader import PairLoader

    cfg = small_data_config(url, endpoint_url=endpoint, backend="webdataset", num_workers=0)
    loader = PairLoader(cfg, rank=0, world_size=1, device="cpu")
    batches = [(b["key_m"], b["key_n"], b["image_m"], b["image_n"]) for b in loader]
    return batches, loader.stats


def test_streaming_a_split_reads_every_sample_once(proxy, s3_shards, s3_endpoint, one_thread):
    """The training stream over S3 under resets, a stall past the read timeout, slow bodies and
    503s reads every sample exactly once per pass, with the same bytes as a fault-free read;
    a whole loader epoch gives the same batches."""
    manifest = json.loads(open_url(f"{s3_shards}/train/manifest.json", s3_endpoint).read())
    urls = tuple(f"{s3_shards}/train/{s['name']}" for s in manifest["shards"])
    want_keys = sorted(k for s in manifest["shards"] for k in s["keys"])
    clean, clean_stats = first_pass(urls, s3_endpoint)

    once = [Rule(k, ops=("get_object",), max_count=1) for k in ("503", "stall", "reset", "slow")]
    proxy.arm(
        [
            *once,
            Rule("reset", rate=0.35, ops=("get_object",)),
            Rule("slow", rate=0.3, ops=("get_object",)),
            Rule("503", rate=0.15),
        ],
        max_faults=10,
        max_streak=2,
    )
    got, stats = first_pass(urls, proxy.endpoint)
    summary = assert_faults(proxy, "stall", "reset", "slow", "503")
    keys = [k for k, _ in got]
    assert sorted(keys) == want_keys and len(set(keys)) == len(keys) == 24, summary
    assert got == clean, f"keys or member bytes differ from the fault-free read; {summary}"
    assert stats.shard_errors == 0 == clean_stats.shard_errors, f"{stats.last_error}; {summary}"

    want_batches, want_stats = loader_epoch(f"{s3_shards}/train", s3_endpoint)
    proxy.arm(
        [
            Rule("503", ops=("list",), max_count=1),
            Rule("reset", ops=("get_object",), max_count=1),
            Rule("reset", rate=0.3, ops=("get_object",)),
            Rule("503", rate=0.2, ops=("get_object", "list")),
        ],
        max_faults=6,
        max_streak=2,
    )
    batches, stats = loader_epoch(f"{s3_shards}/train", proxy.endpoint)
    summary = assert_faults(proxy, "reset", "503")
    assert len(batches) == len(want_batches) == 6, summary
    for (km, kn, im, inn), (wkm, wkn, wim, win) in zip(batches, want_batches, strict=True):
        assert (km, kn) == (wkm, wkn), summary
        assert torch.equal(im, wim) and torch.equal(inn, win), summary
    assert stats["shard_errors"] == 0 and stats["samples"] == want_stats["samples"], summary


# ------------------------------------------------------------------------------- c. checkpoint
def test_checkpoint_survives_a_flaky_upload_and_download(
    proxy, bucket, s3_endpoint, tmp_path, one_thread
):
    """A classifier checkpoint (model, optimizer with momentum, RNG states) uploaded and loaded
    back through 503s, resets, slow bodies and a stall: same bytes, same tensors, and a resumed
    step equals an uninterrupted one."""
    from mcis_dist.config import load_config
    from mcis_dist.models.build import build_model
    from mcis_dist.runtime import checkpoint as ckpt

    torch.manual_seed(0)
    cfg = load_config(CONFIG, [])
    model = build_model(cfg, num_classes=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(m, o):
        o.zero_grad()
        sum((p.float() ** 2).mean() for p in m.parameters()).backward()
        o.step()

    step(model, opt)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 1,
        "step": 7,
        "rng": {"0": ckpt.rng_state()},
    }
    local = ckpt.save(tmp_path, state)
    blob = local.read_bytes()

    run = S3Storage(f"s3://{bucket}/runs/demo/cls", endpoint_url=proxy.endpoint)
    proxy.arm(
        [Rule(kind, ops=("put_object",), max_count=1) for kind in ("503", "reset", "stall_headers")]
    )
    run.upload_file(local, "checkpoint_000001/checkpoint.pt")
    up = assert_faults(proxy, "503", "reset", "stall_headers")
    stored = s3_objects(s3_endpoint, bucket, "runs/demo/cls")["checkpoint_000001/checkpoint.pt"]
    assert sha(stored) == sha(blob), f"stored checkpoint differs; {up}"

    proxy.arm(
        [
            Rule("reset", ops=("get_object",), max_count=2),
            Rule("stall", ops=("get_object",), max_count=1),
            Rule("slow", ops=("get_object",), max_count=1),
            Rule("503", ops=("list",), max_count=1),
        ]
    )
    newest = ckpt.newest_checkpoint(S3Storage(run.url, endpoint_url=proxy.endpoint))
    assert newest == "checkpoint_000001"
    loaded, where = ckpt.load_from(run.describe(newest), endpoint_url=proxy.endpoint)
    down = assert_faults(proxy, "reset", "stall", "slow", "503")
    assert where == f"s3://{bucket}/runs/demo/cls/checkpoint_000001/checkpoint.pt"
    assert loaded["epoch"] == 1 and loaded["step"] == 7
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v), f"tensor {k} differs; {down}"
    assert torch.equal(loaded["rng"]["0"]["torch"], state["rng"]["0"]["torch"]), down

    # resume: a fresh model and optimizer from the checkpoint take the same next step
    torch.manual_seed(1)
    model2 = build_model(cfg, num_classes=8)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01, momentum=0.9)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    step(model, opt)
    step(model2, opt2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{k} differs after a resumed step; {down}"


@pytest.mark.parametrize(
    "kind, op",
    [
        ("reset", "create_multipart"),  # forwarded, answer lost: a second upload is started
        ("reset", "upload_part"),
        ("503", "complete_multipart"),
        ("reset", "complete_multipart"),  # completed upstream, answer lost: completed again
        ("stall_headers", "complete_multipart"),
    ],
)
def test_a_multipart_upload_survives_a_fault_on_each_step(
    proxy, bucket, s3_endpoint, tmp_path, monkeypatch, kind, op
):
    """A 12 MB upload in 5 MB parts through one fault on one step of the multipart protocol:
    the stored object is the file, in 3 parts, and no unfinished upload is left on the key
    (one whose CreateMultipartUpload answer was lost is aborted)."""
    monkeypatch.setenv("MCIS_S3_MULTIPART_MB", "5")
    blob = torch.randint(
        0, 256, (12 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    local = tmp_path / "big.bin"
    local.write_bytes(blob.numpy().tobytes())
    proxy.arm([Rule(kind, ops=(op,), max_count=1)])
    S3Storage(f"s3://{bucket}/multipart-{kind}-{op}", endpoint_url=proxy.endpoint).upload_file(
        local, "big.bin"
    )
    summary = assert_faults(proxy, kind)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    key = f"multipart-{kind}-{op}/big.bin"
    obj = s3.get_object(Bucket=bucket, Key=key)
    assert sha(obj["Body"].read()) == sha(local.read_bytes()), summary
    assert obj["ETag"].strip('"').endswith("-3"), f"not a 3-part upload: {obj['ETag']}"
    open_uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    assert open_uploads == [], summary


# ------------------------------------------------------------------------ e. faults that last
def test_a_put_that_always_fails_names_the_url_and_leaves_nothing_finished(
    proxy, bucket, s3_endpoint, reference, capsys, monkeypatch
):
    """503 SlowDown on every PUT of one shard: the build fails naming that s3:// URL, leaves no
    manifest and no shard or part record that looks finished; re-run without faults, it
    finishes byte-identical to the fault-free build."""
    monkeypatch.setenv("MCIS_S3_MAX_ATTEMPTS", "3")
    url = f"s3://{bucket}/failing"
    proxy.arm(
        [Rule("503", methods=("PUT",), path=r"/failing/train/shard-000002\.tar$")], max_faults=50
    )
    code = main([*BUILD, "--out", url, "--endpoint-url", proxy.endpoint])
    err = capsys.readouterr().err
    summary = proxy.summary()
    faults = proxy.faults
    assert code == 2, summary
    line = next(ln for ln in err.splitlines() if ln.startswith("mcis: error:"))
    assert f"{url}/train/shard-000002.tar" in line and "SlowDown" in line, line
    assert "after 3 attempts" in line, line
    assert len(faults) == 3 and {(f.kind, f.method) for f in faults} == {("503", "PUT")}, summary
    left = s3_objects(s3_endpoint, bucket, "failing")
    assert "train/manifest.json" not in left and "train/shard-000002.tar" not in left, sorted(left)
    assert "train/_parts/shard-000002.json" not in left, sorted(left)
    for name in left:  # what is there is finished: a part record only after its tar and index
        if "/_parts/" in name:
            tar = name.replace("_parts/", "").replace(".json", ".tar")
            assert tar in left and tar.replace(".tar", ".idx") in left, sorted(left)
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in err

    proxy.disarm()
    assert main([*BUILD, "--out", url, "--endpoint-url", proxy.endpoint]) == 0
    got, want = s3_objects(s3_endpoint, bucket, "failing"), local_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith("manifest.json"):
            assert without_timing(got[name]) == without_timing(want[name]), name
        else:
            assert sha(got[name]) == sha(want[name]), name


def test_a_read_that_always_stalls_names_the_url(proxy, s3_shards, monkeypatch, capsys):
    """Every GET of one shard stalls past the read timeout: reading it gives up after the
    configured attempts with the s3:// URL named, in the library and on the command line."""
    monkeypatch.setenv("MCIS_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("MCIS_S3_READ_TIMEOUT", "1")
    shard = f"{s3_shards}/train/shard-000001.tar"
    proxy.arm(
        [Rule("stall", ops=("get_object",), path=r"/train/shard-000001\.tar$")], max_faults=20
    )
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_url(shard, endpoint_url=proxy.endpoint).read()
    took = time.monotonic() - t0
    summary = assert_faults(proxy, "stall")
    assert f"cannot read {shard}:" in str(info.value), str(info.value)
    assert "gave up after 2 attempts" in str(info.value) and "ReadTimeoutError" in str(info.value)
    assert took < 30, f"{took:.1f} s: not bounded by 2 attempts x 1 s; {summary}"
    # `mcis shards verify` says the same, as one error line
    code = main(["shards", "verify", f"{s3_shards}/train", "--endpoint-url", proxy.endpoint])
    err = capsys.readouterr().err
    assert code == 2 and f"mcis: error: cannot read {shard}:" in err, err


def test_an_object_replaced_mid_read_is_not_spliced(proxy, bucket, s3_endpoint):
    """A read that stalls mid-body after the object was overwritten fails (If-Match) instead
    of resuming into the new version's bytes."""
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    old, new = b"A" * 300_000, b"B" * 300_000
    direct.put_object(Bucket=bucket, Key="swap/obj", Body=old)
    proxy.arm([Rule("stall", ops=("get_object",), max_count=1)])
    body = S3Storage(f"s3://{bucket}/swap", endpoint_url=proxy.endpoint).open_read("obj")
    direct.put_object(Bucket=bucket, Key="swap/obj", Body=new)  # while the answer stalls
    with pytest.raises(StorageError, match=f"s3://{bucket}/swap/obj: the object was replaced"):
        body.read()
    summary = assert_faults(proxy, "stall")
    assert proxy.requests["get_object"] == 2, summary  # the first GET and the If-Match re-GET


def test_corrupted_bytes_are_an_error_not_data(proxy, bucket, s3_endpoint):
    """A flipped byte fails the read with the URL named (the stored CRC32), whether the object
    came in one piece or over a resumed read."""
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    data = bytes(range(256)) * 1200
    direct.put_object(Bucket=bucket, Key="crc/obj", Body=data)
    storage = S3Storage(f"s3://{bucket}/crc", endpoint_url=proxy.endpoint)
    proxy.arm([Rule("corrupt", ops=("get_object",), max_count=1)])
    with pytest.raises(
        StorageError, match=rf"cannot read s3://{bucket}/crc/obj: CRC32 .*in 1 request\)"
    ):
        storage.read_bytes("obj")
    assert_faults(proxy, "corrupt")
    proxy.arm(
        [
            Rule("reset", ops=("get_object",), max_count=1),
            Rule("corrupt", ops=("get_object",), max_count=1),
        ]
    )
    with pytest.raises(StorageError, match=r"crc/obj: CRC32 .*in 2 requests\)"):
        storage.read_bytes("obj")
    summary = assert_faults(proxy, "reset", "corrupt")
    proxy.arm([Rule("reset", ops=("get_object",), max_count=1)])
    assert storage.read_bytes("obj") == data, proxy.summary()  # resumed and intact: no error
    assert proxy.requests["get_object"] == 2, f"{proxy.summary()} (before: {summary})"


def test_retry_settings_come_from_the_environment(monkeypatch):
    from mcis_dist.storage import S3RetrySettings

    monkeypatch.setenv("MCIS_S3_MAX_ATTEMPTS", "11")
    monkeypatch.setenv("MCIS_S3_RETRY_MODE", "adaptive")
    monkeypatch.setenv("MCIS_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("MCIS_S3_CONNECT_TIMEOUT", "3")
    config = S3Storage("s3://b/p", endpoint_url="http://127.0.0.1:9").client.meta.config
    assert config.retries == {"total_max_attempts": 11, "mode": "adaptive"}
    assert (config.read_timeout, config.connect_timeout) == (7.5, 3.0)
    monkeypatch.delenv("MCIS_S3_RETRY_MODE")
    monkeypatch.delenv("MCIS_S3_READ_TIMEOUT")
    assert S3RetrySettings.from_env() == S3RetrySettings(11, "standard", 3.0, 60.0, 64)
    monkeypatch.setenv("MCIS_S3_MAX_ATTEMPTS", "zero")
    with pytest.raises(StorageError, match="MCIS_S3_MAX_ATTEMPTS='zero': expected a number >= 1"):
        S3RetrySettings.from_env()
    monkeypatch.setenv("MCIS_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("MCIS_S3_RETRY_MODE", "legacy")
    with pytest.raises(StorageError, match="MCIS_S3_RETRY_MODE='legacy'"):
        S3RetrySettings.from_env()
    monkeypatch.setenv("MCIS_S3_RETRY_MODE", "standard")
    monkeypatch.setenv("MCIS_S3_MULTIPART_MB", "4")
    with pytest.raises(StorageError, match="MCIS_S3_MULTIPART_MB='4': expected a number >= 5"):
        S3RetrySettings.from_env()


def test_stage_actors_get_the_s3_settings_of_the_driver(monkeypatch):
    """Ray actors may run on other nodes: every MCIS_S3_* knob set here, and the endpoint,
    travel in their runtime environment; unset ones do not."""
    from mcis_dist.runtime.sharded import actor_options

    for k in ("MCIS_S3_MAX_ATTEMPTS", "MCIS_S3_RETRY_MODE", "MCIS_S3_CONNECT_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MCIS_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("MCIS_S3_MULTIPART_MB", "16")
    opts = actor_options(use_gpu=False, cpus_per_actor=2)
    assert opts["runtime_env"]["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "MCIS_S3_READ_TIMEOUT": "7.5",
        "MCIS_S3_MULTIPART_MB": "16",
    }
    assert opts["num_cpus"] == 2 and "num_gpus" not in opts


# ------------------------------------------------------------------------- d. a sharded stage
@pytest.mark.slow
def test_cams_stage_on_a_flaky_s3_finishes_complete(
    proxy, s3_shards, bucket, s3_endpoint, tmp_path
):
    """`mcis cams` (Ray actors) reading its shards and checkpoint from S3 and writing its maps
    to S3, all through 503s, 500s, resets and slow bodies: a complete manifest, every image
    mapped once, nothing skipped, and every CAM shard's bytes as the manifest records them."""
    from mcis_dist.config import load_config
    from mcis_dist.models.build import build_model

    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, []), num_classes=8)
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict()}, buf)
    direct.put_object(Bucket=bucket, Key="ckpt/checkpoint.pt", Body=buf.getvalue())

    out = f"s3://{bucket}/cams"
    once = [Rule(k, ops=("get_object",), max_count=1) for k in ("503", "reset", "slow")]
    proxy.arm(
        [
            *once,
            Rule("reset", ops=("put_object",), max_count=1),
            Rule("503", rate=0.1),
            Rule("500", rate=0.05),
            Rule("reset", rate=0.1),
            Rule("slow", rate=0.1, ops=("get_object",)),
        ],
        max_faults=25,
        max_streak=2,
    )
    code = main(
        [
            "cams",
            "--config",
            CONFIG,
            f"shards.url={s3_shards}",
            f"shards.endpoint_url={proxy.endpoint}",
            f"run_root={tmp_path}/runs",
            f"cams.out_url={out}",
            f"cams.checkpoint=s3://{bucket}/ckpt/checkpoint.pt",
            "cams.mode=coattentive",
            "cams.scales=[1.0]",
            "cams.related=2",
            "cams.related_size=64",
            "cams.num_actors=1",
        ]
    )
    summary = assert_faults(proxy, "503", "reset")
    assert code == 0, summary
    proxy.disarm()

    objects = s3_objects(s3_endpoint, bucket, "cams")
    manifest = json.loads(objects["manifest.json"])
    source = json.loads(
        direct.get_object(Bucket=bucket, Key="ref/train/manifest.json")["Body"].read()
    )
    want_keys = [k for s in source["shards"] for k in s["keys"]]
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    assert keys == want_keys, f"images lost or repeated; {summary}"
    assert manifest["samples"] == 24 and manifest["skipped_count"] == 0, summary
    assert len(manifest["shards"]) == 6, summary
    for s in manifest["shards"]:
        assert sha(objects[s["name"]]) == s["sha256"], f"{s['name']}; {summary}"
        assert s["index_name"] in objects and f"_parts/{s['name'][:-4]}.json" in objects
