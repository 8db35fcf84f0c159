"""The shard set's manifest: what later stages read first, written last.

The format is specified for users in ``shards/README.md``. In short, one split folder holds
``shard-NNNNNN.tar`` + ``shard-NNNNNN.idx`` pairs, ``_parts/shard-NNNNNN.json`` completion
records, and ``manifest.json``, which exists only once every shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mcis_dist.formats import manifest
from mcis_dist.formats.manifest import MANIFEST_NAME, PARTS_DIR
from mcis_dist.storage import Storage, StorageError, open_url

__all__ = [
    "FORMAT",
    "BOXES_MEMBER",
    "MANIFEST_NAME",
    "PARTS_DIR",
    "ManifestError",
    "shard_name",
    "part_name",
    "assemble_manifest",
    "read_manifest",
    "find_splits",
    "summarize",
    "verify_split",
    "decode_boxes",
]

FORMAT = "mcis-shards/1"
BOXES_MEMBER = "boxes.json"  # optional: [[class, x0, y0, x1, y1], ...], half-open pixels


class ManifestError(ValueError):
    """A manifest is missing, unreadable, of another format, or disagrees with its shards."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def part_name(i: int) -> str:
    return f"shard-{i:06d}.json"


def assemble_manifest(plan, records: list[dict], plan_rejected: list[dict], build: dict) -> dict:
    """Combine the part records (in shard order) into the manifest."""
    num_classes = len(plan.classes)
    shards, rejected = [], list(plan_rejected)
    class_index: list[list[int]] = [[] for _ in range(num_classes)]
    domains, normalised = Counter(), Counter()
    masks = saliency = with_boxes = num_boxes = 0
    n = 0
    for rec in records:
        rejected.extend(rec["rejected"])
        normalised.update(rec.get("normalised", {}))
        if not rec["samples"]:
            continue
        keys = []
        for row in rec["rows"]:
            keys.append(row["key"])
            domains[row["domain"]] += 1
            masks += bool(row.get("mask"))
            saliency += bool(row.get("saliency"))
            with_boxes += bool(row.get("boxes"))
            num_boxes += row.get("boxes", 0)
            for k in row["labels"]:
                class_index[k].append(n)
            n += 1
        shards.append(
            {
                "name": rec["name"],
                "index": rec["index"],
                "first": n - len(keys),
                "samples": rec["samples"],
                "bytes": rec["bytes"],
                "sha256": rec["sha256"],
                "index_sha256": rec["index_sha256"],
                "keys": keys,
            }
        )
    return {
        "format": FORMAT,
        "split": plan.split,
        "classes": list(plan.classes),
        "num_samples": n,
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "domains": dict(sorted(domains.items())),
        "class_histogram": [len(ix) for ix in class_index],
        "with_mask": masks,
        "with_saliency": saliency,
        "with_boxes": with_boxes,
        "num_boxes": num_boxes,
        "normalised": dict(sorted(normalised.items())),
        "num_rejected": len(rejected),
        "rejected": rejected,
        "build": build,
        "shards": shards,
        "class_index": class_index,
    }


def read_manifest(storage: Storage) -> dict:
    """The manifest of a finished split folder, or a clear error saying what the folder holds."""
    where = storage.describe(MANIFEST_NAME)
    try:
        parts = [] if storage.exists(MANIFEST_NAME) else storage.list(PARTS_DIR)
    except StorageError as e:
        raise ManifestError(str(e)) from None
    if parts:
        raise ManifestError(
            f"{where} does not exist: the build is unfinished ({len(parts)} shards "
            "done); run the same `mcis shards build` command again to finish it"
        )
    return manifest.read_manifest(
        storage,
        FORMAT,
        what="a shard manifest",
        missing="no shards were built here",
        error=ManifestError,
    )


def iter_shard(url: str, endpoint_url: str | None = None):
    """Raw samples (dicts of member bytes, ``__key__``) of one shard, in tar order; an S3 read
    that breaks mid-shard resumes where it broke (a StorageError naming the URL if it cannot)."""
    with open_url(url, endpoint_url=endpoint_url) as stream:
        members = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(members)


def decode_boxes(raw: dict) -> np.ndarray | None:
    """The boxes of a raw sample (:func:`iter_shard`) as an (N, 5) int32 array of rows
    ``class, x0, y0, x1, y1`` (half-open pixels of the stored image), or None when it has none
    (a dict lookup: samples without boxes cost nothing). ValueError if the member is malformed."""
    data = raw.get(BOXES_MEMBER)
    if data is None:
        return None
    try:
        boxes = np.asarray(json.loads(data), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"sample {raw.get('__key__', '?')!r}: malformed {BOXES_MEMBER} ({e})"
        ) from None
    if boxes.size == 0:
        return np.zeros((0, 5), np.int32)
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(
            f"sample {raw.get('__key__', '?')!r}: {BOXES_MEMBER} holds an array of shape "
            f"{boxes.shape}, expected rows of [class, x0, y0, x1, y1]"
        )
    return boxes.astype(np.int32)


def find_splits(storage: Storage) -> list[str]:
    """Split folders (with a manifest or unfinished parts) directly under a dataset URL."""
    return [d for d in storage.list_dirs() if d != PARTS_DIR and storage.child(d).list(PARTS_DIR)]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def summarize(manifest: dict, url: str, max_rejected: int = 10) -> str:
    """A human summary for ``mcis shards info``."""
    classes = manifest["classes"]
    hist = manifest["class_histogram"]
    lines = [
        f"{url}  [{manifest['split']}]",
        f"  samples     {manifest['num_samples']:,} in {manifest['num_shards']} shards "
        f"({_mb(manifest['total_bytes'])})",
        f"  classes     {len(classes)}",
        f"  domains     {', '.join(f'{k}: {v:,}' for k, v in manifest['domains'].items()) or '-'}",
        f"  masks       {manifest['with_mask']:,}   saliency maps {manifest['with_saliency']:,}",
    ]
    if manifest.get("with_boxes"):
        lines.append(
            f"  boxes       {manifest['num_boxes']:,} on {manifest['with_boxes']:,} samples"
        )
    if manifest["normalised"]:
        text = ", ".join(f"{k}: {v}" for k, v in manifest["normalised"].items())
        lines.append(f"  normalised  {text}")
    width = max((len(c) for c in classes), default=0)
    if len(classes) <= 40:
        lines.append("  class histogram")
        for c, k in zip(classes, hist, strict=True):
            lines.append(f"    {c:<{width}}  {k:>8,}")
    else:
        order = sorted(range(len(classes)), key=lambda i: hist[i])
        lines.append(
            f"  class histogram: min {hist[order[0]]:,} ({classes[order[0]]}), "
            f"median {hist[order[len(order) // 2]]:,}, max {hist[order[-1]]:,} "
            f"({classes[order[-1]]})"
        )
    lines.append(f"  rejected    {manifest['num_rejected']:,}")
    for r in manifest["rejected"][:max_rejected]:
        lines.append(f"    {r['source_id']}: {r['reason']}")
    if manifest["num_rejected"] > max_rejected:
        lines.append(f"    ... {manifest['num_rejected'] - max_rejected} more in manifest.json")
    return "\n".join(lines)


class _HashingReader:
    """Reads through to ``raw`` while hashing every byte (for one-pass verification)."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def verify_split(storage: Storage, manifest: dict, progress=None) -> list[str]:
    """Re-read every shard: byte count, sha256, the keys in order, and the index file.

    Returns a list of problems (empty when everything matches).
    """
    problems = []
    for shard in manifest["shards"]:
        name = shard["name"]
        try:
            body = storage.open_read(name)
        except StorageError as e:
            problems.append(str(e))
            continue
        reader = _HashingReader(body)
        keys = []
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        base = member.name[: member.name.find(".", member.name.rfind("/") + 1)]
                        if not keys or keys[-1] != base:
                            keys.append(base)
            reader.drain()
        except (tarfile.TarError, OSError) as e:
            problems.append(f"{storage.describe(name)}: not a readable tar ({e})")
            continue
        finally:
            body.close()
        if reader.nbytes != shard["bytes"]:
            problems.append(f"{name}: {reader.nbytes} bytes, manifest says {shard['bytes']}")
        if reader.sha.hexdigest() != shard["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
        if keys != shard["keys"]:
            problems.append(
                f"{name}: holds {len(keys)} samples, manifest lists {len(shard['keys'])} "
                "(or their keys differ)"
            )
        try:
            idx = storage.read_bytes(shard["index"])
        except StorageError as e:
            problems.append(str(e))
        else:
            if hashlib.sha256(idx).hexdigest() != shard["index_sha256"]:
                problems.append(f"{shard['index']}: sha256 differs from the manifest")
            head = idx.split(b"\n", 1)[0].split()
            if len(head) != 2 or int(head[1]) != shard["samples"]:
                problems.append(f"{shard['index']}: header {head!r} does not match the samples")
        if progress is not None:
            progress(shard["samples"])
    return problems
