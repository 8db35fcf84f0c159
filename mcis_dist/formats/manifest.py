"""The one manifest reader and writer of every output folder (shards, CAMs, labels, masks).

A folder is finished when its ``manifest.json`` exists: every stage writes it last (and storage
writes are atomic, locally and on S3), so a half-written output never looks finished. Each
manifest names its format (``mcis-shards/1``, ``mcis-cams/1``, ``mcis-labels/1``), checked on
reading, so a folder of one kind is never read as another.
"""

from __future__ import annotations

import json

from mcis_dist.storage import Storage, StorageError

MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"  # per-output records of an unfinished run, merged into the manifest


def read_manifest(storage: Storage, fmt: str, *, what: str, missing: str, error=ValueError) -> dict:
    """The manifest of a finished folder, checked to be ``fmt``; otherwise ``error`` with one
    line naming the file. ``what`` names the kind (``a CAM manifest``); ``missing`` says what
    to do when there is none (the stage to run)."""
    where = storage.describe(MANIFEST_NAME)
    try:
        if not storage.exists(MANIFEST_NAME):
            raise error(
                f"{where} does not exist ({storage.describe()} has no {MANIFEST_NAME}): {missing}"
            )
        raw = storage.read_bytes(MANIFEST_NAME)
    except StorageError as e:
        raise error(str(e)) from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise error(f"{where} is not valid JSON ({e})") from None
    got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if got != fmt:
        raise error(f"{where} is not {what} (format {got!r}, expected {fmt!r})")
    return manifest


def write_manifest(storage: Storage, manifest: dict) -> None:
    """Write a folder's manifest, last: the write that makes the folder count as finished."""
    storage.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def shard_entries(records: list[dict], *extra: str) -> list[dict]:
    """The ``shards`` list of a derived manifest (CAMs, labels) from the stage's part records:
    one entry per shard that holds samples, with its name, index, source, counts and hashes,
    and the ``extra`` fields a format adds (e.g. ``cams``)."""
    names = ("name", "index", "source", *extra, "samples", "keys")
    return [
        {
            **{k: r[k] for k in names},
            "bytes": r.get("bytes", 0),
            "sha256": r.get("sha256"),
            "index_name": r.get("index_name"),
        }
        for r in records
        if r["samples"]
    ]
