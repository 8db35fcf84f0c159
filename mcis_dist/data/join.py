"""Joining an image split with a label folder: open and check the label folder, match each label
shard to the image shard it was made from, and check both name the same classes.

A label folder (format ``mcis-labels/1``) holds ``labels-NNNNNN.tar`` shards, each made from one
image shard (its ``source``) and holding ``<key>.label.png`` (8-bit, the image's size) and
``<key>.json`` for a subsequence, in the same order, of that shard's keys. The join is planned
from the two manifests alone: which label shard goes with which image shard, how many images
have a label, and which do not (those are never read). A label folder made from another split or
for another class list is refused here, before any worker starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mcis_dist.data.loader import LoaderError
from mcis_dist.formats.labels import FORMAT as LABELS_FORMAT
from mcis_dist.formats.shards import FORMAT as SHARDS_FORMAT
from mcis_dist.formats.shards import MANIFEST_NAME
from mcis_dist.storage import StorageError, open_storage

__all__ = ["JoinPlan", "check_classes", "open_label_folder", "plan_join"]


def open_label_folder(url: str, endpoint_url: str | None = None, check_shards: bool = True):
    """The label folder's manifest and storage; with ``check_shards``, every listed shard must
    exist (a clear error at start, not a hang mid-epoch)."""
    storage = open_storage(url, endpoint_url=endpoint_url)
    where = storage.describe(MANIFEST_NAME)
    try:
        if not storage.exists(MANIFEST_NAME):
            raise LoaderError(
                f"{where} does not exist: no finished label folder here (the stage that writes "
                "it has not run, or has not finished)"
            )
        raw = storage.read_bytes(MANIFEST_NAME)
    except StorageError as e:
        raise LoaderError(str(e)) from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise LoaderError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != LABELS_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        hint = " (an image split: labels_url must name a label folder)" * (got == SHARDS_FORMAT)
        raise LoaderError(f"{where} has format {got!r}, expected {LABELS_FORMAT!r}{hint}")
    missing = [k for k in ("classes", "shards") if k not in manifest]
    if missing:
        raise LoaderError(f"{where} lacks {', '.join(missing)}")
    if check_shards:
        try:
            sizes = storage.sizes()
        except StorageError as e:
            raise LoaderError(str(e)) from None
        problems = []
        for shard in manifest["shards"]:
            got, want = sizes.get(shard["name"]), shard.get("bytes")
            if got is None:
                problems.append(f"{shard['name']} is missing")
            elif want and got != want:
                problems.append(f"{shard['name']} has {got} bytes, the manifest says {want}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise LoaderError(
                f"{storage.describe()}: the label shards do not match {MANIFEST_NAME}: "
                f"{'; '.join(problems[:5])}{more}"
            )
    return manifest, storage


def _show(names: list[str], limit: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{', '.join(names[:limit])}{more}]"


def check_classes(images: list[str], labels: list[str], image_where: str, label_where: str):
    if images == labels:
        return
    first = next((i for i, (a, b) in enumerate(zip(images, labels, strict=False)) if a != b), None)
    if first is None:
        why = f"{len(labels)} classes against {len(images)}"
    else:
        why = f"class {first} is {labels[first]!r} in the labels, {images[first]!r} in the images"
    raise LoaderError(
        f"the label folder {label_where} has classes {_show(labels)}, but the image split "
        f"{image_where} has {_show(images)} ({why}): the labels were made for another class list"
    )


@dataclass(frozen=True)
class JoinPlan:
    """Which label shard goes with which image shard, and what the join leaves out."""

    label_shards: tuple[str, ...]  # label shard names (non-empty ones), manifest order
    image_shards: tuple[str, ...]  # the image shard of each
    images: int  # images in the split
    labelled: int  # images with a label: the epoch's samples
    no_label_keys: tuple[str, ...]  # images without a label, split order


def _is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(k in it for k in sub)


def plan_join(images: dict, labels: dict, image_where: str, label_where: str) -> JoinPlan:
    """Match label shards to their source image shards; a label shard whose keys are not a
    subsequence of its source shard's keys is an error (labels of another split)."""
    by_name = {s["name"]: s for s in images["shards"]}
    problems, labelled, label_shards, image_shards = [], set(), [], []
    for ls in labels["shards"]:
        keys, src = ls.get("keys", []), by_name.get(ls.get("source"))
        if src is None:
            problems.append(f"{ls['name']} names source {ls.get('source')!r}, not in the split")
        elif not _is_subsequence(keys, src["keys"]):
            unknown = sorted(set(keys) - set(src["keys"]))
            problems.append(
                f"{ls['name']} holds keys {_show(unknown, 3)} that {src['name']} lacks"
                if unknown
                else f"{ls['name']} lists its keys in another order than {src['name']}"
            )
        elif labelled & set(keys):
            problems.append(f"{ls['name']} labels {_show(sorted(labelled & set(keys)), 3)} again")
        elif keys:
            labelled.update(keys)
            label_shards.append(ls["name"])
            image_shards.append(src["name"])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LoaderError(
            f"the label folder {label_where} does not match the image split {image_where}: "
            f"{'; '.join(problems[:5])}{more}; were the labels made from another split?"
        )
    all_keys = [k for s in images["shards"] for k in s["keys"]]
    return JoinPlan(
        tuple(label_shards),
        tuple(image_shards),
        len(all_keys),
        len(labelled),
        tuple(k for k in all_keys if k not in labelled),
    )
