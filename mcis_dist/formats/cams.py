"""The CAM output format ``mcis-cams/1``: one tar per input shard, each sample holding

* ``<key>.cam.npy``: float16 (L, ceil(H/s), ceil(W/s)) maps in [0, 1], one per labelled class,
  in the order of ``labels`` (s = the stride the maps were made at);
* ``<key>.json``: ``{"key", "labels", "size": [H, W], "stride", "fallback": [...]}`` and,
  optionally, ``"top1"`` (int) and ``"top5"`` (ints, highest first): the classifier's top
  classes over all classes (written by ``mcis cams`` since top-1 localization was added),

with the DALI-style ``.idx`` of each tar and ``manifest.json`` written last.

``top1`` / ``top5`` are additive, so the format stays ``mcis-cams/1``: a reader takes them with
``meta.get`` and treats their absence (a folder written before them) as "not recorded"; every
other key is unchanged. A change that alters or removes a key must bump ``FORMAT``.
"""

from __future__ import annotations

import io
import json

import numpy as np

from mcis_dist.errors import StageError
from mcis_dist.formats.manifest import read_manifest
from mcis_dist.formats.shards import iter_shard
from mcis_dist.storage import open_storage

FORMAT = "mcis-cams/1"

__all__ = [
    "FORMAT",
    "cam_shard_name",
    "decode_cam",
    "encode_cam",
    "iter_cam_shard",
    "read_cam_manifest",
]


def encode_cam(cams: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(cams, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_cam(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def cam_shard_name(index: int) -> str:
    return f"cams-{index:06d}.tar"


def iter_cam_shard(storage, name: str):
    """(meta dict, maps float16 (L, h, w)) of every sample of one CAM shard, in order."""
    for raw in iter_shard(storage.describe(name), getattr(storage, "endpoint_url", None)):
        yield json.loads(raw["json"]), decode_cam(raw["cam.npy"])


def read_cam_manifest(url: str, endpoint_url: str | None = None) -> tuple[dict, object]:
    """(manifest, storage) of a finished CAM folder; a clear error otherwise."""
    storage = open_storage(url, endpoint_url=endpoint_url)
    missing = "run `mcis cams` first (or it is still running)"
    found = read_manifest(storage, FORMAT, what="a CAM manifest", missing=missing, error=StageError)
    return found, storage
