"""The ``dali`` backend: NVIDIA DALI reads the shards (``readers.webdataset`` with the ``.idx``
files), decodes (``mixed``, i.e. nvJPEG on the GPU, when the loader's device is a GPU; ``cpu``
otherwise) and augments; the pairs are then formed by the same :class:`PairPool` as the
webdataset backend, so both meet one contract.

Augmentation mirrors ``transforms.augment`` with DALI operators (random long-side resize,
brightness/contrast, hue/saturation, mirror, crop padded with the mean colour, normalisation):
the same distributions, not the same pixels.

Robustness: DALI stops its whole pipeline on an undecodable image, so a guard checks each
encoded image before the decoder (``dali_guard``: ``header`` = the shard builder's header and
stream-end check; ``full`` = a complete decode on the CPU) and swaps a failing one for a tiny
placeholder that is dropped after the pipeline and counted. With ``header``, corruption inside
the compressed data can still stop the pipeline; the loader then says which shard set to rebuild
with ``mcis shards build --verify full``.

Ranks: each rank reads its own slice of the samples (``shard_id``/``num_shards``), rotated every
epoch; every rank takes exactly ``len(loader)`` batches from DALI's endless stream, so the
equal-batches guarantee holds. Resume replays the epoch's first batches (decoding them), which
gives exactly the same pairs on the CPU.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcis_dist.data.pairs import PairPool, PoolItem
from mcis_dist.data.stream import WorkerStats, collate_pairs, parse_record
from mcis_dist.shards.images import ImageError, check_image
from mcis_dist.storage import is_s3_url


def _placeholder() -> np.ndarray:

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (124, 116, 104)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class _Guard:
    """Runs inside DALI (python_function): (encoded image) → (image or placeholder, ok flag)."""

    def __init__(self, verify: str):
        self.verify = verify
        self.placeholder = _placeholder()

    def __call__(self, data: np.ndarray):
        try:
            check_image(data.tobytes(), verify=self.verify)
            return data, np.ones(1, np.uint8)
        except ImageError:
            return self.placeholder.copy(), np.zeros(1, np.uint8)


def local_index_paths(loader) -> list[str]:
    """The ``.idx`` of every shard as a local path (downloaded once into ``index_cache`` for
    s3:// shards: DALI 2.4 reads tars from S3 but wants local index files)."""
    cache = Path(os.path.expanduser(loader.cfg.index_cache))
    paths = []
    for manifest, storage in loader.sources:
        for s in manifest["shards"]:
            if not is_s3_url(storage.describe()):
                paths.append(storage.describe(s["index"]))
                continue
            local = cache / s["index_sha256"][:2] / f"{s['index_sha256']}.idx"  # by content
            if not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(storage.read_bytes(s["index"]))
                os.replace(tmp, local)
            paths.append(str(local))
    return paths


#: the S3 endpoint DALI's reader was first given in this process ("" for AWS itself)
_DALI_S3_ENDPOINT: list[str] = []


def use_s3_endpoint(endpoint_url: str | None) -> None:
    """Point DALI's S3 reader at the run's endpoint (None: AWS itself, or the environment's).

    DALI takes the endpoint from ``AWS_ENDPOINT_URL`` only, and its S3 client keeps the one it
    met first for the life of the process, so a later pipeline with another endpoint would read
    from the first one; that is refused here instead."""
    wanted = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    if _DALI_S3_ENDPOINT and _DALI_S3_ENDPOINT[0] != wanted:
        raise ValueError(
            f"DALI's S3 reader in this process already reads from "
            f"{_DALI_S3_ENDPOINT[0] or 'AWS'}; it keeps that endpoint for the life of the "
            f"process and cannot read from {wanted or 'AWS'}: read the second split in another "
            "process, or with data.backend=webdataset"
        )
    if endpoint_url:  # the run's endpoint (config first) wins over the environment's
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    _DALI_S3_ENDPOINT[:] = [wanted]


def build_pipeline(loader, epoch: int):
    from nvidia.dali import fn, pipeline_def, types  # lazy: loads CUDA libraries

    spec, aug, cfg = loader.spec, loader.augment, loader.cfg
    gpu = loader.device.type == "cuda"
    if is_s3_url(spec.shard_urls[0]):
        use_s3_endpoint(spec.endpoint_url)
    lo, hi = aug.resize_long
    b, c, s, hue = aug.color_jitter
    size = aug.crop_size
    guard = _Guard(cfg.dali_guard)

    @pipeline_def(exec_dynamic=True)
    def pipeline():
        data, meta = fn.readers.webdataset(
            paths=list(spec.shard_urls),
            index_paths=local_index_paths(loader),
            ext=["jpg;png", "json"],
            missing_component_behavior="error",
            shard_id=(spec.rank + epoch) % spec.world_size,
            num_shards=spec.world_size,
            stick_to_shard=True,  # a rank re-reads its own slice when it wraps: still disjoint
            random_shuffle=True,
            initial_fill=max(2, spec.shuffle_buffer),
            name="reader",
        )
        data, ok = fn.python_function(data, function=guard, num_outputs=2)
        images = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_longer=fn.random.uniform(range=[lo, hi]), antialias=True)
        if b or c:
            images = fn.brightness_contrast(
                images,
                brightness=fn.random.uniform(range=[max(0, 1 - b), 1 + b]),
                contrast=fn.random.uniform(range=[max(0, 1 - c), 1 + c]),
            )
        if s or hue:
            images = fn.hsv(
                images,
                hue=fn.random.uniform(range=[-hue * 360, hue * 360]),
                saturation=fn.random.uniform(range=[max(0, 1 - s), 1 + s]),
            )
        images = fn.crop_mirror_normalize(
            images,
            crop=(size, size),
            crop_pos_x=fn.random.uniform(range=[0, 1]),
            crop_pos_y=fn.random.uniform(range=[0, 1]),
            out_of_bounds_policy="pad",
            fill_values=[0.0, 0.0, 0.0],
            mean=[m * 255 for m in aug.mean],
            std=[v * 255 for v in aug.std],
            dtype=types.FLOAT,
            output_layout="CHW",
            mirror=fn.random.coin_flip(probability=0.5 if aug.hflip else 0.0),
        )
        return images, meta, ok

    device_id = torch.cuda.current_device() if gpu else None
    pipe = pipeline(
        batch_size=spec.batch_size,
        num_threads=cfg.dali_threads,
        device_id=device_id,
        seed=int(np.random.default_rng([spec.seed, epoch, spec.rank, 3]).integers(1 << 31)),
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


def _to_torch(images, device: torch.device) -> torch.Tensor:
    """A dense DALI batch (B, 3, S, S) → a torch tensor on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray  # lazy: loads CUDA libraries

    dense = images.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out)
    return out


class DaliReadError(RuntimeError):
    """DALI's reader could not read a shard (a network or storage error, not a bad image)."""


def _reader_failed(e: Exception) -> bool:
    """Whether a DALI pipeline error came from the shard reader (its message names the operator
    that failed) rather than from the decoder or another operator."""
    return "readers.webdataset" in str(e)


def _last_line(e: Exception) -> str:
    lines = [ln.strip(" :") for ln in str(e).splitlines() if ln.strip(" :")]
    lines = [ln for ln in lines if ln != "Current pipeline object is no longer valid."]
    return lines[-1] if lines else type(e).__name__


def dali_pair_batches(loader, epoch: int, skip: int):
    """Yield the epoch's batches (from batch ``skip`` on), in the loader's raw batch format.

    DALI's S3 reader stops the whole pipeline when a connection breaks mid-object (it retries
    refused and throttled requests, but does not resume a broken body). Such a read error
    rebuilds the pipeline, which replays the epoch to the batch it stopped at (the same pairs on
    the CPU), up to ``data.dali_restarts`` times with a growing pause; the restarts are counted
    in ``shard_errors``."""
    done, restarts, last = skip, 0, ""
    while True:
        try:
            for batch in _epoch_batches(loader, epoch, done, restarts, last):
                done += 1
                yield batch
            return
        except DaliReadError as e:
            restarts, last = restarts + 1, str(e)
            if restarts > loader.cfg.dali_restarts:
                raise DaliReadError(
                    f"DALI could not read the shards of {loader.storage.describe()} "
                    f"({e.__cause__ and _last_line(e.__cause__)}), {restarts} times in this "
                    f"epoch (data.dali_restarts={loader.cfg.dali_restarts})"
                ) from e.__cause__
            time.sleep(min(30.0, 0.5 * 2 ** (restarts - 1)))


def _epoch_batches(loader, epoch: int, skip: int, restarts: int, last_error: str):
    spec = loader.spec
    where = loader.storage.describe()
    try:
        pipe = build_pipeline(loader, epoch)
    except Exception as e:
        if _reader_failed(e):
            raise DaliReadError(f"{where}: {_last_line(e)}") from e
        raise RuntimeError(f"DALI pipeline for {where} failed: {e}") from e
    pool = PairPool(
        spec.pool_size,
        spec.max_wait,
        spec.cross_domain_share,
        np.random.default_rng([spec.seed, epoch, spec.rank, 1]),
        pairing=spec.pairing,
    )
    stats = WorkerStats(worker=0, shard_errors=restarts, last_error=last_error)
    pending, emitted, total = [], 0, len(loader)
    while emitted < total:
        try:
            images, metas, oks = pipe.run()
        except Exception as e:
            if _reader_failed(e):
                raise DaliReadError(f"{where}: {_last_line(e)}") from e
            raise RuntimeError(
                f"DALI stopped on an image it could not decode in {where} ({_last_line(e)}); "
                "rebuild the shards with `mcis shards build --verify full` or set "
                "data.dali_guard=full"
            ) from e
        batch = _to_torch(images, loader.device)  # (B, 3, S, S) float32
        for i in range(len(metas)):
            # source_info is "<shard path>:<offset>:<member name>"; the key is the member's stem
            member = metas[i].source_info().rsplit(":", 1)[-1]
            raw = {"__key__": member.split(".", 1)[0], "json": bytes(np.asarray(metas.at(i)))}
            raw["jpg"] = b"(decoded by DALI)"
            try:
                key, labels, domain, _ = parse_record(raw, spec.num_classes)
            except ValueError:
                stats.bad_record += 1
                stats.note_bad(raw["__key__"])
                continue
            if not int(np.asarray(oks.at(i))[0]):
                stats.bad_decode += 1
                stats.note_bad(key)
                continue
            stats.samples += 1
            # clone: a view would keep the whole DALI batch alive while the pool holds the image
            for m, n in pool.push(PoolItem(key, labels, domain, batch[i].clone())):
                pending.append((m, n))
                if len(pending) < spec.batch_size:
                    continue
                ready, pending = pending, []
                emitted += 1
                if emitted > skip:
                    yield collate_pairs(ready, spec.num_classes, lambda it: it.payload, pool, stats)
                if emitted == total:
                    return
