"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1), image-file makers, and
the `mcis pipeline` command at test size (tests/test_pipeline.py, tests/test_reproducible.py)."""

from __future__ import annotations

import io
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
# The demo at test size: small shards so the sharded stages have several, one step per stage.
SMALL = [
    "synthetic.num_train=40",
    "synthetic.num_val=8",
    "shards.workers=1",
    "shards.shard_size_mb=0.1",
    "train.epochs=2",
    "train.report_every_steps=2",
    "data.batch_size=4",
    "data.pool_size=16",
    "cams.scales=[1.0]",
    "cams.related=1",
    "affinity.train.epochs=1",
    "masks.steps=16",
    "seg.train.epochs=1",
    "seg.data.batch_size=4",
]

# The demo at its smallest, on top of SMALL: 8 training images of 64-80 px (2 shards), one epoch
# of each trained stage, 64-pixel crops, one CAM scale without flip, a 4-step random walk. The
# classifier trains on 2 Ray Train workers (DDP, as in the demo); every other stage uses one
# worker or actor: each Ray process costs seconds of imports (tests that run a whole pipeline).
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


def env(**extra) -> dict:
    """The environment of a pipeline subprocess: no usage statistics, Ray Train's controller
    polling its workers every 0.2 s (not 2 s: a finished run is noticed sooner), unbuffered."""
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def pipeline_cmd(*overrides: str) -> list[str]:
    """`mcis pipeline` of the demo config at test size (SMALL), then ``overrides``."""
    return [sys.executable, "-m", "mcis_dist.cli", "pipeline", "--config", DEMO, *SMALL, *overrides]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-SECRET-do-not-leak-7f3a9c",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint for the whole session (moto's threaded server on loopback)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint_process():
    """A real S3 endpoint in its own process (moto's server): for clients that hold the GIL
    while they wait on the network (DALI's S3 reader, while a pipeline builds), which a server
    thread in the test process could not answer."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's server did not start on {url}") from None
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; dummy credentials in the environment, as users set real ones."""
    import boto3

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def noise_image(w: int, h: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 127 // max(h - 1, 1)) % 256  # smooth content
    arr = np.stack([(base + 40 * c) % 256 for c in range(channels)], axis=-1)
    arr = arr + rng.integers(-10, 10, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8).squeeze()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(w=64, h=48, seed=0, mode="RGB", **kw) -> bytes:
    arr = noise_image(w, h, seed, channels=1 if mode == "L" else 3)
    img = Image.fromarray(arr, mode="L" if mode == "L" else "RGB")
    if mode == "CMYK":
        img = img.convert("CMYK")
    return encode(img, "JPEG", quality=90, **kw)


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    return encode(Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr), "PNG")


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: at test sizes a second thread gains little, and on
    a busy 2-core machine two spinning OpenMP threads made small tensor ops 10-1000x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: where Ray Train would have put a run's first checkpoint (the folder name sorts as a date)
CHECKPOINT_DIR = "checkpoint_2026-01-01_00-00-00.000000"


def build_synthetic(out, *, num_train: int, num_val: int, per_shard: int):
    """``mcis shards build --source synthetic`` into ``out`` (in this process); returns ``out``."""
    from mcis_dist.cli import main

    argv = ["shards", "build", "--source", "synthetic", "--num-train", str(num_train)]
    argv += ["--num-val", str(num_val), "--max-samples-per-shard", str(per_shard)]
    assert main([*argv, "--workers", "1", "--no-progress", "--out", str(out)]) == 0
    return out


def save_checkpoint(model, run_dir):
    """``model``'s weights as a Ray Train run's checkpoint: ``<run_dir>/checkpoint_*/checkpoint.pt``."""
    import torch

    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, folder / "checkpoint.pt")
    return folder


def small_data_config(url, **overrides):
    """The pair loader's config at test sizes (48-pixel crops, batches of 4, small pools)."""
    from mcis_dist.config import DataConfig

    base = dict(
        train_url=str(url),
        batch_size=4,
        crop_size=48,
        resize_long=[48, 80],
        pool_size=32,
        max_wait=16,
        shuffle_buffer=8,
    )
    return DataConfig(**{**base, **overrides})
