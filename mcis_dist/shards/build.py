"""Build WebDataset shards from a source plan, in parallel, resumably, locally or on S3.

How a build goes, and why:

1. **Plan** (``sources.py``): every sample's location, key and known labels; no decoding.
2. **Cut into shards**: the samples are shuffled with the build seed (so every shard mixes
   classes) and cut by their *estimated* size (file sizes from ``stat``) into shards of about
   ``shard_size_mb``. The cut depends only on the inputs and options, so a re-run reproduces
   it exactly and each shard is an independent task with a plan hash.
3. **Write shards** over a process pool: each task checks its samples and streams them into a
   staged tar (in place for a local folder, a temporary file uploaded afterwards for S3), with a
   fixed mtime so the same inputs give byte-identical tars, and the ``.idx`` that DALI's
   ``readers.webdataset`` needs, built from the writer's own offsets. The tar is published
   atomically, then the index, then the part record ``_parts/shard-NNNNNN.json``: a part record
   means that shard is complete.
4. **Manifest**: once every shard has a part record, ``manifest.json`` is assembled from them
   and written last. No manifest means "not finished"; a re-run skips the shards whose part
   record matches their plan hash and finishes only what is missing.

Over 400 lines because the four steps share one task record and one process pool, and read in
order here; the formats they write live in :mod:`mcis_dist.formats.shards`.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mcis_dist import __version__
from mcis_dist.config import ExperimentConfig
from mcis_dist.formats.manifest import write_manifest
from mcis_dist.formats.shards import (
    FORMAT,
    MANIFEST_NAME,
    PARTS_DIR,
    assemble_manifest,
    part_name,
    shard_name,
)
from mcis_dist.shards import sources
from mcis_dist.shards.boxes import BOXES_MEMBER, check_boxes, encode_boxes
from mcis_dist.shards.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_image,
    check_mask,
    check_saliency,
    encode_png,
    mask_labels,
)
from mcis_dist.shards.sources import DOMAINS, PlannedSample, SourceError, SourcePlan
from mcis_dist.shards.synthetic import SyntheticSpec, synthetic_sample
from mcis_dist.storage import Storage

__all__ = ["BuildOptions", "BuildError", "cut_shards", "build_split", "plan_hash"]

SHARD_MTIME = 1577836800  # 2020-01-01: a fixed tar mtime makes builds byte-reproducible
SYNTHETIC_JPEG_QUALITY = 90


class BuildError(RuntimeError):
    """The build cannot start or cannot finish (not a per-sample problem)."""


@dataclass(frozen=True)
class BuildOptions:
    shard_size_mb: float = 256.0
    max_samples_per_shard: int = 0  # 0 = no limit
    workers: int = 0  # 0 = one per CPU core
    seed: int = 0
    verify: str = "header"  # "header" (fast) or "full" (decode every pixel)
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.shard_size_mb <= 0:
            raise BuildError(f"shard_size_mb={self.shard_size_mb}: expected a positive size")
        if self.verify not in ("header", "full"):
            raise BuildError(f"verify={self.verify!r}: expected 'header' or 'full'")
        for name in ("max_samples_per_shard", "workers"):
            if getattr(self, name) < 0:
                raise BuildError(f"{name}={getattr(self, name)}: expected 0 or more")
        if self.max_pixels <= 0:
            raise BuildError(f"max_pixels={self.max_pixels}: expected a positive number")

    def content_options(self) -> dict:
        """The options that change what the shards contain (and so the plan hash)."""
        d = asdict(self)
        for k in ("workers", "overwrite", "progress"):
            d.pop(k)
        return d


def cut_shards(samples: list[PlannedSample], opts: BuildOptions) -> list[list[PlannedSample]]:
    """Shuffle with the build seed, then cut into shards of about ``shard_size_mb``."""
    opts.validate()
    order = sorted(samples, key=lambda s: s.key)
    random.Random(opts.seed).shuffle(order)
    limit = opts.shard_size_mb * 1e6
    shards: list[list[PlannedSample]] = []
    current: list[PlannedSample] = []
    size = 0
    for s in order:
        full = opts.max_samples_per_shard and len(current) >= opts.max_samples_per_shard
        if current and (size + s.est_bytes > limit or full):
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += s.est_bytes
    if current:
        shards.append(current)
    return shards


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Boxes join a sample's row only where it has some, so builds without boxes keep their hashes.
_SAMPLE_FIELDS = [f.name for f in fields(PlannedSample) if f.name != "boxes"]


def _row(s: PlannedSample) -> list:
    row = [getattr(s, f) for f in _SAMPLE_FIELDS]  # asdict() is 10x slower
    return row if s.boxes is None else [*row, s.boxes]


def plan_hash(plan: SourcePlan, opts: BuildOptions, shard: list[PlannedSample]) -> str:
    head = [FORMAT, plan.source, plan.split, plan.classes, plan.options, opts.content_options()]
    return _hash([head, [_row(s) for s in shard]])


@dataclass
class _ShardTask:
    index: int
    plan_hash: str
    samples: list[PlannedSample]
    source: str
    split: str
    num_classes: int
    storage: Storage
    verify: str
    max_pixels: int
    synthetic: SyntheticSpec | None


def _sample_json(task: _ShardTask, s: PlannedSample, labels, w, h, normalised) -> bytes:
    record = {
        "key": s.key,
        "labels": [int(x) for x in labels],
        "domain": s.domain,
        "source": task.source,
        "source_id": s.source_id,
        "split": task.split,
        "width": w,
        "height": h,
    }
    if normalised:
        record["normalised"] = normalised
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _encode_synthetic(task: _ShardTask, s: PlannedSample) -> tuple[dict, dict]:
    sample = synthetic_sample(task.synthetic, task.split, s.synthetic_index)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, format="JPEG", quality=SYNTHETIC_JPEG_QUALITY)
    h, w = sample.mask.shape
    entry = {
        "__key__": s.key,
        "jpg": buf.getvalue(),
        "mask.png": encode_png(sample.mask),
        "json": _sample_json(task, s, sample.labels, w, h, None),
    }
    return entry, {"labels": list(sample.labels), "mask": True, "saliency": False}


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {what} {path}: {e.strerror or e}") from None


def encode_sample(task: _ShardTask, s: PlannedSample) -> tuple[dict, dict]:
    """The tar entry for one sample, and what the part record keeps of it.

    Raises ImageError (or any exception) for a sample that cannot be used. A box that reaches
    past the image costs only that box: its reason is in ``kept["bad_boxes"]`` (the shard
    lists it as a rejection) and the sample is stored with its other boxes.
    """
    if s.synthetic_index is not None:
        return _encode_synthetic(task, s)
    image = check_image(_read(s.image, "image"), "image", task.max_pixels, task.verify)
    entry = {"__key__": s.key, image.ext: image.data}
    labels = list(s.labels) if s.labels is not None else None
    if s.mask:
        mask_png, mask = check_mask(_read(s.mask, "mask"), image, task.num_classes, "mask")
        entry["mask.png"] = mask_png
        if labels is None:
            labels = mask_labels(mask, task.num_classes)
            if not labels:
                raise ImageError("mask holds no foreground class (empty label list)")
    if labels is None:
        raise ImageError("no labels and no mask to derive them from")
    if s.saliency:
        entry["sal.png"] = check_saliency(_read(s.saliency, "saliency map"), image)
    entry["json"] = _sample_json(task, s, labels, image.width, image.height, image.normalised)
    kept = {"labels": labels, "mask": bool(s.mask), "saliency": bool(s.saliency)}
    if image.normalised:
        kept["normalised"] = image.normalised
    if s.boxes:
        boxes, bad = check_boxes(s.boxes, image.width, image.height, image.transpose)
        if boxes:
            entry[BOXES_MEMBER] = encode_boxes(boxes)
            kept["boxes"] = len(boxes)
        if bad:
            kept["bad_boxes"] = bad
    return entry, kept


class _HashingFile:
    """A write-only file that hashes what passes through (no second read of the shard)."""

    def __init__(self, f):
        self._f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.nbytes

    def close(self) -> None:
        self._f.close()


class ShardWriter:
    """Writes one WebDataset tar and, on the fly, the ``.idx`` that DALI's readers.webdataset
    takes (format v1.2: a header line ``v1.2 <samples>``, then per sample, per component,
    ``<ext> <data offset> <size> <member name>``). Offsets come from the tar writer itself, so no
    second pass over the tar is needed; tests check the result against DALI's own ``wds2idx``.

    Members are written in sorted extension order with a fixed mtime, owner and mode, so the
    same samples always give byte-identical tars (reproducible builds, comparable hashes).
    """

    def __init__(self, path: Path):
        self._file = _HashingFile(open(path, "wb"))  # noqa: SIM115 - closed in close()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._index_lines: list[str] = []

    def write(self, entry: dict) -> None:
        key = entry["__key__"]
        parts = []
        for ext in sorted(k for k in entry if k != "__key__"):
            data = entry[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), SHARD_MTIME, 0o444
            info.uname = info.gname = "mcis"
            self._tar.addfile(info, io.BytesIO(data))
            # After addfile, the writer stands at the end of the data, padded to 512 bytes.
            offset = self._tar.offset - ((len(data) + 511) // 512) * 512
            parts.append(f"{ext} {offset} {len(data)} {info.name}")
        self._index_lines.append(" ".join(parts))

    def close(self) -> str:
        """Finish the tar (the caller closes it: a context manager would hide the index text);
        return the index text."""
        self._tar.close()
        self._file.close()
        self.sha256, self.bytes = self._file.sha.hexdigest(), self._file.nbytes
        return f"v1.2 {len(self._index_lines)}\n" + "".join(f"{ln}\n" for ln in self._index_lines)


_PROGRESS = None  # a shared counter in pool workers


def _init_worker(counter) -> None:
    global _PROGRESS
    _PROGRESS = counter


def _bump(n: int = 1) -> None:
    if _PROGRESS is not None:
        with _PROGRESS.get_lock():
            _PROGRESS.value += n


def write_shard(task: _ShardTask, progress=_bump) -> dict:
    """Write one shard (tar, index, then its part record); return the part record."""
    name = shard_name(task.index)
    idx_name = name.replace(".tar", ".idx")
    rows, rejected, normalised = [], [], Counter()
    with task.storage.staged(name) as staged:
        writer = ShardWriter(staged.path)
        for s in task.samples:
            try:
                entry, kept = encode_sample(task, s)
            except Exception as e:  # one bad sample never stops the shard
                reason = str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"
                rejected.append({"source_id": s.source_id, "reason": reason})
            else:
                writer.write(entry)
                for reason in kept.pop("bad_boxes", ()):
                    rejected.append({"source_id": s.source_id, "reason": reason})
                rows.append({"key": s.key, "domain": s.domain, **kept})
                if kept.get("normalised"):
                    normalised[kept["normalised"]] += 1
            progress(1)
        index = writer.close().encode()
        record = {
            "format": FORMAT,
            "shard": task.index,
            "plan_hash": task.plan_hash,
            "samples": len(rows),
            "rows": rows,
            "rejected": rejected,
            "normalised": dict(sorted(normalised.items())),
        }
        if rows:
            record.update(
                name=name,
                index=idx_name,
                bytes=writer.bytes,
                sha256=writer.sha256,
                index_sha256=hashlib.sha256(index).hexdigest(),
            )
        else:  # an all-rejected shard has no tar (an empty tar is not a valid shard)
            staged.discard()
    if rows:
        task.storage.write_bytes(idx_name, index)
    part = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    task.storage.write_bytes(f"{PARTS_DIR}/{part_name(task.index)}", part)
    return record


def _existing_parts(storage: Storage) -> dict[str, dict]:
    parts = {}
    for n in storage.list(PARTS_DIR):
        if n.endswith(".json"):
            try:
                parts[n] = json.loads(storage.read_bytes(f"{PARTS_DIR}/{n}"))
            except (ValueError, OSError):
                continue  # unreadable: that shard is simply rebuilt
    return parts


def _run_tasks(tasks: list[_ShardTask], opts: BuildOptions, total: int, done: int, desc: str):

    workers = opts.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    records = []
    bar = tqdm(
        total=total,
        initial=done,
        desc=desc,
        unit="img",
        disable=not opts.progress,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    try:
        if workers == 1:
            for t in tasks:
                records.append(write_shard(t, progress=bar.update))
            return records
        ctx = mp.get_context("spawn")  # boto3 clients and threads are not fork-safe
        counter = ctx.Value("q", 0)
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)
        ) as pool:
            pending = {pool.submit(write_shard, t) for t in tasks}
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    for f in finished:
                        records.append(f.result())
                    bar.n = done + counter.value
                    bar.refresh()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        return records
    finally:
        bar.close()


def build_split(plan: SourcePlan, storage: Storage, opts: BuildOptions, log=print) -> dict:
    """Build (or finish) one split's shards under ``storage``; return its manifest."""
    opts.validate()
    storage.check_writable()
    shards = cut_shards(plan.samples, opts)
    hashes = [plan_hash(plan, opts, s) for s in shards]
    build_hash = _hash(hashes + [[asdict(r) for r in plan.rejected]])
    where = storage.describe()

    if storage.exists(MANIFEST_NAME):
        old = json.loads(storage.read_bytes(MANIFEST_NAME))
        if old.get("build", {}).get("build_hash") == build_hash and not opts.overwrite:
            log(f"{where}: already complete ({old['num_samples']} samples); nothing to do")
            return old
        if not opts.overwrite:
            raise BuildError(
                f"{where} already holds a finished build of different inputs or options; "
                "pass --overwrite to replace it"
            )
        storage.delete(MANIFEST_NAME)  # from here on the folder no longer claims completeness

    existing = _existing_parts(storage)
    stale = [n for n, r in existing.items() if r.get("plan_hash") not in hashes]
    if stale and not opts.overwrite:
        raise BuildError(
            f"{where} holds an unfinished build of different inputs or options "
            f"({len(stale)} shards); pass --overwrite to replace it"
        )
    records: dict[int, dict] = {}
    todo = []
    for i, (shard, h) in enumerate(zip(shards, hashes, strict=True)):
        rec = existing.get(part_name(i))
        if rec is not None and rec.get("plan_hash") == h:
            records[i] = rec
            continue
        todo.append(
            _ShardTask(
                i,
                h,
                shard,
                plan.source,
                plan.split,
                len(plan.classes),
                storage,
                opts.verify,
                opts.max_pixels,
                plan.synthetic,
            )
        )
    total = len(plan.samples)
    done = sum(len(shards[i]) for i in records)
    if records:
        log(f"{where}: resuming, {len(records)}/{len(shards)} shards already complete")
    t0 = time.perf_counter()
    for rec in _run_tasks(todo, opts, total, done, f"{plan.split}"):
        records[rec["shard"]] = rec
    elapsed = time.perf_counter() - t0

    # Files of an older, larger build that this one does not own any more, and temporary files
    # left by a killed process (a rename never happened).
    keep = {shard_name(i) for i in records} | {
        shard_name(i).replace(".tar", ".idx") for i in records
    }
    for n in storage.list():
        if (n.startswith("shard-") and n not in keep) or n.startswith(".shard-"):
            storage.delete(n)
    for n in storage.list(PARTS_DIR):
        if n not in {part_name(i) for i in records}:
            storage.delete(f"{PARTS_DIR}/{n}")

    build = {
        "build_hash": build_hash,
        "source": plan.source,
        "options": plan.options,
        "build_options": opts.content_options(),
        "mcis_version": __version__,
        "seconds": round(elapsed, 3),
    }
    ordered = [records[i] for i in range(len(shards))]
    manifest = assemble_manifest(plan, ordered, [asdict(r) for r in plan.rejected], build)
    write_manifest(storage, manifest)
    return manifest


DEFAULT_SPLITS = {
    "synthetic": ("train", "val"),
    "voc": ("train", "val"),
    "list": ("train",),
    "folder": ("train",),
}


def plan_source(source: str, split: str, args: dict) -> SourcePlan:
    """Plan one split of a source; ``args`` are the source's own options (paths, domain...)."""

    if args.get("boxes") and source not in ("list", "folder"):
        raise SourceError(f"--boxes is for the list and folder sources, not --source {source}")

    if source == "synthetic":
        return sources.plan_synthetic(args.get("spec") or SyntheticSpec(), split)
    if source == "list":
        boxes = args.get("boxes")
        return sources.plan_list(
            args.get("list_file") or (None if boxes else _missing("--list", source)),
            args.get("image_root"),
            args.get("classes") or _missing("--classes", source),
            args.get("mask_root"),
            split=split,
            domain=args.get("domain") or "target",
            boxes=boxes,
            box_coords=args.get("box_coords") or "inclusive",
        )
    if source == "voc":
        return sources.plan_voc(
            args.get("voc_root"),
            split,
            seg_aug=args.get("seg_aug"),
            saliency=args.get("saliency"),
            labels_from=args.get("labels_from") or "auto",
        )
    if source == "folder":
        return sources.plan_folder(
            args.get("folder_root"),
            args.get("classes"),
            split=split,
            domain=args.get("domain") or "web",
            boxes=args.get("boxes"),
            box_coords=args.get("box_coords") or "inclusive",
        )
    raise sources.SourceError(f"unknown source {source!r} (valid: {', '.join(DEFAULT_SPLITS)})")


def _missing(flag: str, source: str):

    also = " (or --boxes FILE, whose lines then list the images)" if flag == "--list" else ""
    raise SourceError(f"{flag} is required for --source {source}{also}")


def build_dataset(
    source: str,
    out: Storage,
    opts: BuildOptions,
    splits: list[str] | None = None,
    source_args: dict | None = None,
    log=print,
) -> dict[str, dict]:
    """Build every split of a source under ``out/<split>/``; return the manifests by split.

    All splits are planned and the output is checked for writing before any shard is written,
    so a bad path, split name or bucket fails at once.
    """

    opts.validate()
    args = dict(source_args or {})
    if args.get("domain") not in (None, *DOMAINS):
        raise SourceError(f"domain {args['domain']!r}: expected one of {', '.join(DOMAINS)}")
    splits = list(splits or DEFAULT_SPLITS.get(source, ("train",)))
    if len(set(splits)) != len(splits):
        raise SourceError(f"a split is named twice: {splits}")
    plans = [plan_source(source, split, args) for split in splits]
    out.check_writable()
    manifests = {}
    for plan in plans:
        log(
            f"{plan.split}: {len(plan.samples):,} samples planned, "
            f"{len(plan.rejected):,} rejected while planning"
        )
        manifests[plan.split] = build_split(plan, out.child(plan.split), opts, log=log)
    return manifests


def build_options(cfg: ExperimentConfig, overwrite: bool = False) -> BuildOptions:
    """Build options from an experiment's ``shards`` section (``mcis pipeline``, the demo)."""
    sh = cfg.shards
    return BuildOptions(
        shard_size_mb=sh.shard_size_mb,
        workers=sh.workers,
        seed=sh.seed,
        verify=sh.verify,
        overwrite=overwrite,
    )
