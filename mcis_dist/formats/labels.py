"""The label shard format ``mcis-labels/1``: per-pixel labels of a whole split, one shard per
source shard, shared by AffinityNet's confident labels and the pseudo masks.

A label folder holds, for the source (image) shard at position ``i`` of the split,

* ``labels-NNNNNN.tar`` (NNNNNN = i) with, per sample, in the order of the source shard:

  - ``<key>.label.png``: 8-bit grey (L) PNG at the image's full size; 0 background,
    ``k + 1`` foreground class k, 255 ignore;
  - ``<key>.json``: ``{"key", "labels": [class indices], "size": [H, W]}``;

* ``labels-NNNNNN.idx``: its DALI-style index (``mcis_dist.shards.build.ShardWriter``);
* ``_parts/labels-NNNNNN.json``: the shard's part record (``mcis_dist.runtime.sharded``);
* ``manifest.json``, written last::

    {"format": "mcis-labels/1", "kind": "confident" | "pseudo", "mode", "fingerprint",
     "classes", "source": {"url": image split, "samples"}, "cams": CAM folder, "settings",
     "shards": [{"name", "index", "source": image shard name, "cams": CAM shard name,
                 "samples", "keys", "bytes", "sha256", "index_name"}],
     "samples", "skipped_count", "skipped": [{"key", "shard", "reason"}] (at most 1000 listed),
     "empty": labels with no confident pixel (all 255; written all the same), "seconds"}

A reader joins a label shard with its image shard through ``shards[i]["source"]`` and the keys.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
from PIL import Image

from mcis_dist.errors import StageError
from mcis_dist.formats.manifest import read_manifest, shard_entries
from mcis_dist.formats.shards import iter_shard
from mcis_dist.storage import open_storage

FORMAT = "mcis-labels/1"
KINDS = ("confident", "pseudo")
LABEL_MEMBER = "label.png"
IGNORE = 255
MAX_LISTED = 1000  # skipped samples listed by key in a manifest (all are counted)

__all__ = [
    "FORMAT",
    "KINDS",
    "LABEL_MEMBER",
    "assemble_manifest",
    "decode_label",
    "encode_label",
    "iter_label_shard",
    "label_shard_name",
    "read_label_manifest",
]


def encode_label(label: np.ndarray) -> bytes:
    """(H, W) uint8 label map -> 8-bit grey PNG bytes (lossless)."""
    a = np.asarray(label)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"a label map must be a (H, W) uint8 array, got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # uint8 (H, W): mode L
    return buf.getvalue()


def decode_label(blob: bytes) -> np.ndarray:
    """PNG bytes of a label map -> (H, W) uint8 (grey or palette PNGs; palette indices kept)."""
    with Image.open(io.BytesIO(blob)) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"a label PNG must be 8-bit grey (L) or palette (P), got {im.mode}")
        return np.array(im, dtype=np.uint8)


def label_shard_name(index: int) -> str:
    return f"labels-{index:06d}.tar"


def iter_label_shard(storage, name: str):
    """(meta dict, label (H, W) uint8) of every sample of one label shard, in order."""

    for raw in iter_shard(storage.describe(name), getattr(storage, "endpoint_url", None)):
        yield json.loads(raw["json"]), decode_label(raw[LABEL_MEMBER])


def read_label_manifest(url: str, endpoint_url: str | None = None) -> tuple[dict, object]:
    """(manifest, storage) of a finished label folder; a clear error otherwise."""
    storage = open_storage(url, endpoint_url=endpoint_url)
    missing = (
        "make the labels first (`mcis masks`, or AffinityNet's confident labels), or "
        "they are still being made"
    )
    found = read_manifest(
        storage, FORMAT, what="a label manifest", missing=missing, error=StageError
    )
    return found, storage


def assemble_manifest(
    records: list[dict],
    *,
    kind: str,
    mode: str,
    fingerprint: str,
    classes: list[str],
    source: dict,
    cams_url: str,
    settings: dict,
    seconds: float,
) -> dict:
    """The label folder's manifest from its shards' part records (any order)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    records = sorted(records, key=lambda r: r["index"])
    skipped = [{**s, "shard": r["source"]} for r in records for s in r["skipped"]]
    compute = sum(r["seconds"] for r in records)
    samples = sum(r["samples"] for r in records)
    return {
        "format": FORMAT,
        "kind": kind,
        "mode": mode,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": classes,
        "source": source,
        "cams": cams_url,
        "settings": settings,
        "shards": shard_entries(records, "cams"),
        "samples": samples,
        "skipped_count": len(skipped),
        "skipped": skipped[:MAX_LISTED],
        "empty": sum(r["empty"] for r in records),
        "seconds": {
            "wall": seconds,
            "compute": round(compute, 3),
            "images_per_s_per_actor": round(samples / compute, 3) if compute else None,
        },
    }
