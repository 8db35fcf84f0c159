"""``mcis predict``: label maps of new images with the trained segmentation network.

Inputs are a folder of images (``.jpg``/``.jpeg``/``.png`` directly in it; local or s3://) or an
image split (a folder with ``manifest.json``, format ``mcis-shards/1``). Each image gives one
palette PNG (mode "P", the VOC colours of ``mcis_dist.evaluation.palette``; pixel value = label,
0 background, k+1 class k) named ``<file stem>.png`` (folders) or ``<key>.png`` (splits), at
the image's size, written atomically to ``out_url`` (local or s3://). The test-time settings are
evaluation's: ``seg.eval_scales`` × ``seg.eval_flip``, CRF when ``seg.crf``.

The work is shared out over a pool of Ray actors (as ``mcis eval seg``): chunks of
``chunk_size`` files of a folder, or one job per shard of a split; a lost actor's job is redone.
Idempotent: images whose PNG already exists are skipped, so a re-run only does what is missing.
Undecodable images are skipped and listed in ``predictions.json``, the summary written last.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from mcis_dist.config import ExperimentConfig
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.stream import IMAGE_EXTS, iter_shard
from mcis_dist.data.transforms import decode_rgb
from mcis_dist.evaluation import palette
from mcis_dist.formats.shards import MANIFEST_NAME
from mcis_dist.runtime.paths import absolute_url
from mcis_dist.runtime.sharded import StageError, Timer
from mcis_dist.seg.evaluate import SegActor, eval_settings, prepare, run_pool
from mcis_dist.storage import open_storage

__all__ = ["IMAGE_SUFFIXES", "PredictActor", "encode_prediction", "predict"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SUMMARY = "predictions.json"
FORMAT = "mcis-predictions/1"
MAX_LISTED = 1000  # failed images listed in the summary (all are counted)


def encode_prediction(labels: np.ndarray) -> bytes:
    """(H, W) labels in 0..255 → PNG bytes, mode "P" with the VOC palette."""

    a = np.asarray(labels)
    if a.ndim != 2 or a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"labels must be (H, W) in 0..255, got {a.dtype} {a.shape}")
    im = Image.fromarray(a.astype(np.uint8))  # (H, W) uint8: mode L
    im.putpalette(palette(256).tobytes())  # L → P, values kept
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------------------------- the worker
class PredictActor(SegActor):
    """``run(job)``: label a chunk of files, or the listed keys of one shard, into PNGs."""

    def __init__(self, experiment: dict, state: dict, num_classes: int, spec: dict) -> None:
        super().__init__(experiment, state, num_classes, spec)
        self.out = open_storage(spec["out_url"], endpoint_url=spec.get("endpoint_url"))

    def _one(self, what: str, stem: str, data: bytes | None, failed: list) -> int:
        """Label one image into ``<stem>.png``; 1 if written, 0 if skipped (and listed)."""

        try:
            if data is None:
                raise ValueError("no image member (jpg, png)")
            rgb = decode_rgb(data)  # (3, H, W) uint8
        except Exception as e:  # undecodable: skipped and listed
            failed.append({"input": what, "reason": _reason(e)})
            return 0
        self.out.write_bytes(f"{stem}.png", encode_prediction(self.labels(rgb)))
        return 1

    def run(self, job: dict) -> dict:

        start, written, failed = time.perf_counter(), 0, []
        if job["kind"] == "files":
            for file in job["files"]:
                try:
                    data = self.source.read_bytes(file)
                except Exception as e:
                    failed.append({"input": file, "reason": _reason(e)})
                    continue
                written += self._one(file, PurePosixPath(file).stem, data, failed)
        else:
            todo = set(job["keys"])
            try:
                endpoint = getattr(self.source, "endpoint_url", None)
                for raw in iter_shard(self.source.describe(job["name"]), endpoint):
                    key = raw.get("__key__", "?")
                    if key in todo:
                        todo.discard(key)
                        data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
                        written += self._one(key, key, data, failed)
            except Exception as e:  # an unreadable or truncated shard: keep what was done
                failed.append({"input": f"{job['name']}:*", "reason": f"shard: {_reason(e)}"})
            failed += [{"input": k, "reason": f"not found in {job['name']}"} for k in sorted(todo)]
        return {
            "name": job["name"],
            "written": written,
            "failed": failed,
            "seconds": round(time.perf_counter() - start, 3),
        }


# ---------------------------------------------------------------------------------- the driver
def _plan(source, inputs: str, existing: set[str], endpoint, chunk_size: int):
    """(kind, jobs, images in all, images already done)."""

    if source.exists(MANIFEST_NAME):
        manifest, _ = open_manifest(inputs, endpoint)
        jobs, total = [], 0
        for shard in manifest["shards"]:
            total += len(shard["keys"])
            keys = [k for k in shard["keys"] if f"{k}.png" not in existing]
            if keys:
                jobs.append({"name": shard["name"], "kind": "shard", "keys": keys})
        return "split", jobs, total, total - sum(len(j["keys"]) for j in jobs)
    files = [n for n in source.list("") if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise StageError(
            f"{source.describe()} holds no images ({', '.join(IMAGE_SUFFIXES)}) and "
            f"no {MANIFEST_NAME} (an image split)"
        )
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(PurePosixPath(f).stem, []).append(f)
    clash = [names for names in by_stem.values() if len(names) > 1]
    if clash:
        raise StageError(
            f"{source.describe()}: images with the same name would write the same "
            f"PNG: {'; '.join(', '.join(c) for c in clash[:5])}; rename them"
        )
    todo = [f for f in files if f"{PurePosixPath(f).stem}.png" not in existing]
    jobs = [
        {
            "name": f"files {i}-{min(i + chunk_size, len(todo)) - 1}",
            "kind": "files",
            "files": todo[i : i + chunk_size],
        }
        for i in range(0, len(todo), chunk_size)
    ]
    return "folder", jobs, len(files), len(files) - len(todo)


def predict(
    cfg: ExperimentConfig,
    inputs: str,
    out_url: str,
    checkpoint: str | None = None,
    log=print,
    chunk_size: int = 16,
) -> dict:
    """Palette PNGs of every image of ``inputs`` (a folder of images or an image split) into
    ``out_url`` with the trained network (``checkpoint``, default the newest of
    ``<seg.out_url>/run``); returns the summary also written to ``<out_url>/predictions.json``."""

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    timer = Timer()
    cfg, endpoint, model, classes, where = prepare(cfg, checkpoint)
    if len(classes) + 1 > 256:
        raise StageError(f"{len(classes)} classes + background do not fit an 8-bit palette PNG")
    inputs, out_url = absolute_url(inputs).rstrip("/"), absolute_url(out_url).rstrip("/")
    if inputs == out_url:
        raise StageError(f"--out {out_url} is the input folder: the PNGs would become inputs")
    source = open_storage(inputs, endpoint_url=endpoint)
    source.check_readable()
    out = open_storage(out_url, endpoint_url=endpoint)
    out.check_writable()
    existing = set(out.list(""))
    kind, jobs, total, done = _plan(source, inputs, existing, endpoint, chunk_size)
    todo = total - done
    log(
        f"predict: {total} images in {source.describe()} ({kind}), checkpoint {where}"
        + (f"; {done} already have a PNG in {out.describe()}" if done else "")
    )
    records, actors = [], 0
    if jobs:
        spec = {
            "source_url": source.describe(),
            "out_url": out.describe(),
            "endpoint_url": endpoint,
        }
        with tqdm(total=todo, desc="predict", unit="img", disable=None) as bar:
            records, actors = run_pool(
                cfg,
                PredictActor,
                jobs,
                model.state_dict(),
                len(classes) + 1,
                spec,
                "predict",
                log,
                lambda r: bar.update(r["written"] + len(r["failed"])),
            )
    written = sum(r["written"] for r in records)
    failed = [f for r in records for f in r["failed"]]
    seconds = timer()
    summary = {
        "format": FORMAT,
        "inputs": source.describe(),
        "kind": kind,
        "out": out.describe(),
        "checkpoint": where,
        "classes": ["background", *classes],
        "settings": eval_settings(cfg),
        "images": total,
        "written": written,
        "existing": done,
        "failed_count": len(failed),
        "failed": failed[:MAX_LISTED],
        "actors": actors,
        "seconds": seconds,
        "images_per_s": round(written / seconds, 3) if seconds else None,
    }
    out.write_bytes(SUMMARY, json.dumps(summary, indent=1).encode())
    for f in failed[:5]:
        log(f"predict: skipped {f['input']}: {f['reason']}")
    log(
        f"predict: {written} PNGs written to {out.describe()} ({done} already there, "
        f"{len(failed)} failed) in {seconds:.1f} s"
    )
    return summary
