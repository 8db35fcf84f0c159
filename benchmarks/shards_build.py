"""Benchmark: ``mcis shards build`` (the library API) against plain file copying.

A folder of realistic JPEGs (``root/<class>/<n>.jpg``, ~500x375, quality 90, ~60-150 KB) is
built into WebDataset shards and compared with copying the same files:

* local: ``shutil.copyfile`` of every file (one process) is the baseline; the build runs with
  header verification in 1 worker (the comparable case), in 2 workers, and with
  ``verify="full"`` in 1 worker. Goal: header-verified 1-worker build >= 0.8 x plain copy,
  since no image is re-encoded.
* S3 (moto's server on 127.0.0.1): the 1-worker header build to ``s3://bench/...`` against the
  local build and against one boto3 ``upload_file`` of the same total bytes.

Throughput (images/s, MB/s) always counts the source JPEG bytes, so every MB/s compares.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common import parse_args, print_table, timeit, write_results

NAME = "shards_build"
CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "dog")
GOAL_HEADER_VS_COPY = 0.8


def make_jpeg(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: a smooth gradient, blurred random shapes and mild sensor noise."""
    w, h = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * x / w + np.sin(a) * y / h
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    im = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.uniform(-50, w), rng.uniform(-50, h)
        box = [x0, y0, x0 + rng.uniform(20, w / 2), y0 + rng.uniform(20, h / 2)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, rng.uniform(12, 28), (h, w, 3)).astype(np.float32)
    pixels = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(root: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        path = root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_jpeg(rng))
        files.append(path)
    return files


class Fresh:
    """Untimed setup for ``timeit``: remove the previous run's output, flush dirty pages (so
    every run starts from the same state), and hand out a new, never used output name."""

    def __init__(self, base: str, remove=shutil.rmtree):
        self.base, self.remove, self.last, self.n = base, remove, None, 0

    def __call__(self) -> str:
        if self.last is not None:
            self.remove(self.last)
        os.sync()
        self.n += 1
        self.last = f"{self.base}-{self.n}"
        return self.last


def row(case: str, seconds: float, count: int, nbytes: int, **extra) -> dict:
    return {
        "case": case,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
        **extra,
    }


def build(out_url: str, opts, root: Path, count: int, endpoint_url: str | None = None) -> dict:
    from mcis_dist.shards.build import build_dataset
    from mcis_dist.storage import open_storage

    manifests = build_dataset(
        "folder",
        open_storage(out_url, endpoint_url=endpoint_url),
        opts,
        splits=["train"],
        log=lambda *a: None,
        source_args={"folder_root": str(root), "domain": "web"},
    )
    m = manifests["train"]
    assert m["num_samples"] == count, f"build accepted {m['num_samples']} of {count} images"
    return m


def s3_cases(tmp: Path, root: Path, files: list[Path], nbytes: int, opts, repeat: int):
    """The 1-worker build to moto's S3 server, and one ``upload_file`` of the same bytes."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")

        def drop(prefix: str) -> None:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
                for obj in page.get("Contents", []):
                    s3.delete_object(Bucket="bench", Key=obj["Key"])

        blob = tmp / "all-images.bin"  # the same bytes, as one file
        with open(blob, "wb") as f:
            for p in files:
                f.write(p.read_bytes())
        assert blob.stat().st_size == nbytes
        up = timeit(
            lambda key: s3.upload_file(str(blob), "bench", key),
            repeat=repeat,
            setup=Fresh("upload", remove=drop),
        )
        fresh = Fresh("s3://bench/build", remove=lambda url: drop(url[len("s3://bench/") :] + "/"))
        b = timeit(lambda url: build(url, opts, root, len(files), endpoint), repeat, setup=fresh)
        return up, b
    finally:
        server.stop()


def main() -> None:
    args = parse_args(NAME, __doc__.splitlines()[0])
    from mcis_dist.shards.build import BuildOptions

    count = 300 if args.quick else 2000
    shard_mb = 8 if args.quick else 16
    repeat = 2 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="mcis-bench-") as tmpdir:
        tmp = Path(tmpdir)
        root = tmp / "images"
        t0 = time.perf_counter()
        files = generate(root, count)
        nbytes = sum(p.stat().st_size for p in files)
        print(
            f"{count} JPEGs, {nbytes / 1e6:.1f} MB ({nbytes / count / 1e3:.0f} KB each), "
            f"generated in {time.perf_counter() - t0:.1f} s; shard size {shard_mb} MB"
        )

        def copy(dst: str) -> int:
            total = 0
            for p in files:
                out = Path(dst) / p.relative_to(root)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, out)
                total += out.stat().st_size
            assert total == nbytes
            return total

        rows, timings = [], {}
        timings["copy"] = timeit(copy, repeat=2 * repeat, setup=Fresh(str(tmp / "copy")))
        cases = {  # name: (workers, verify)
            "build_header_1w": (1, "header"),
            "build_header_2w": (2, "header"),
            "build_full_1w": (1, "full"),
        }
        for name, (workers, verify) in cases.items():
            opts = BuildOptions(
                shard_size_mb=shard_mb, workers=workers, verify=verify, progress=False
            )
            fn = lambda url, o=opts: build(url, o, root, count)  # noqa: E731
            timings[name] = timeit(fn, repeat=repeat, setup=Fresh(str(tmp / name)))
        opts = BuildOptions(shard_size_mb=shard_mb, workers=1, verify="header", progress=False)
        timings["s3_upload_file"], timings["s3_build_header_1w"] = s3_cases(
            tmp, root, files, nbytes, opts, repeat
        )

    metrics = {"images": count, "source_mb": nbytes / 1e6, "shard_size_mb": shard_mb}
    for name, t in timings.items():
        extra = {}
        if isinstance(t.result, dict):
            extra = {"shards": t.result["num_shards"], "output_mb": t.result["total_bytes"] / 1e6}
        r = row(name, t.best, count, nbytes, first_s=t.runs[0], **extra)
        rows.append(r)
        metrics[name] = {k: v for k, v in r.items() if k != "case"} | {"runs_s": t.runs}
    speed = {r["case"]: r["mb_per_s"] for r in rows}
    ratios = {
        "build_header_1w_vs_copy": speed["build_header_1w"] / speed["copy"],
        "build_header_2w_vs_copy": speed["build_header_2w"] / speed["copy"],
        "build_full_1w_vs_copy": speed["build_full_1w"] / speed["copy"],
        "build_header_2w_vs_1w": speed["build_header_2w"] / speed["build_header_1w"],
        "s3_build_vs_local_build": speed["s3_build_header_1w"] / speed["build_header_1w"],
        "s3_build_vs_s3_upload_file": speed["s3_build_header_1w"] / speed["s3_upload_file"],
    }
    print_table(
        rows,
        ["case", "seconds", "images_per_s", "mb_per_s", "first_s", "shards", "output_mb"],
        title=f"\nbest of {repeat} runs (copy: {2 * repeat}); first_s: the first run "
        "(imports included); MB = source JPEG bytes",
    )
    print()
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    met = ratios["build_header_1w_vs_copy"] >= GOAL_HEADER_VS_COPY
    print(
        f"\ngoal: header-verified 1-worker build >= {GOAL_HEADER_VS_COPY} x plain copy: "
        f"{'met' if met else 'NOT met'} ({ratios['build_header_1w_vs_copy']:.2f})"
    )
    write_results(args.out, NAME, metrics, ratios)


if __name__ == "__main__":
    main()
