"""``PairLoader``: the classifier's per-rank input, whichever backend decodes it.

Output contract (both backends): an iterable of ``len(loader)`` batches per epoch, each a dict

===============  ==============================================================================
``image_m``      (B, 3, S, S) float32, ImageNet-normalised, on ``device``
``image_n``      (B, 3, S, S) the partner of each image (shares at least one class with it)
``labels_m/n``   (B, K) float32 multi-hot image-level labels
``domain_m/n``   (B,) int64: 0 target, 1 single-label, 2 web
``pair_type``    (B,) int64: 0 target–target, 1 extra–extra, 2 cross-domain (picks W_P)
``key_m/n``      list of B sample keys
===============  ==============================================================================

The loader counts what it skipped (undecodable images, malformed records, unreadable shards) and
its pairing statistics (``loader.stats``), and its position can be saved and restored
(``state_dict`` / ``load_state_dict``) so a resumed run continues at the next batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mcis_dist.data.dali import dali_pair_batches
from mcis_dist.data.pairs import PairStats
from mcis_dist.data.sharding import rank_and_world
from mcis_dist.data.stream import MAX_LISTED, PairStream, StreamSpec
from mcis_dist.data.transforms import AugmentSpec, normalize
from mcis_dist.formats.shards import ManifestError, read_manifest
from mcis_dist.storage import StorageError, open_storage

BACKENDS = ("auto", "webdataset", "dali")


def epoch_dataloader(stream, cfg, epoch: int, device: torch.device) -> DataLoader:
    """The DataLoader over an iterable stream that batches in its workers (``cfg``: the
    ``data`` config section: ``num_workers``, ``mp_context``, ``seed``)."""
    workers = cfg.num_workers
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=cfg.mp_context if workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # its own generator: creating the iterator must not draw from the global RNG, or a run
        # resumed mid-epoch would see different dropout masks than an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
    )


class LoaderError(ValueError):
    """The loader cannot start: a missing or inconsistent manifest, a bad option."""


def open_manifest(url: str, endpoint_url: str | None = None, check_shards: bool = True):
    """The split's manifest and storage; with ``check_shards``, every shard listed must exist
    with the size the manifest gives (a clear error at start, not a hang mid-epoch)."""
    storage = open_storage(url, endpoint_url=endpoint_url)
    try:
        manifest = read_manifest(storage)
    except ManifestError as e:
        raise LoaderError(str(e)) from None
    if check_shards:
        problems = []
        sizes = _sizes(storage)
        for shard in manifest["shards"]:
            for name, size in ((shard["name"], shard["bytes"]), (shard["index"], None)):
                got = sizes.get(name)
                if got is None:
                    problems.append(f"{name} is missing")
                elif size is not None and got != size:
                    problems.append(f"{name} has {got} bytes, the manifest says {size}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise LoaderError(
                f"{storage.describe()}: the shards do not match manifest.json: "
                f"{'; '.join(problems[:5])}{more}"
            )
    return manifest, storage


def _sizes(storage) -> dict[str, int]:
    try:
        return storage.sizes()
    except StorageError as e:
        raise LoaderError(str(e)) from None


def _brief(names: list[str]) -> str:
    return f"[{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}] ({len(names)})"


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise LoaderError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "dali" if torch.cuda.is_available() else "webdataset"
    return backend


class PairLoader:
    """Batches of image pairs for one rank (see the module docstring for the contract)."""

    def __init__(
        self,
        cfg,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
        backend: str | None = None,
    ):
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside a world of {world_size}")
        if not cfg.train_url:
            raise LoaderError("data.train_url is not set: name the training split's shard folder")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.backend = resolve_backend(backend or cfg.backend)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.manifest, self.storage = open_manifest(cfg.train_url, cfg.endpoint_url)
        self.num_classes = len(self.manifest["classes"])
        # Extra splits (single-label or web data, paper §3.2) join the same stream; their
        # samples carry their own domain tags, which pick the pair types.
        self.sources = [(self.manifest, self.storage)]
        for url in cfg.extra_urls:
            manifest, storage = open_manifest(url, cfg.endpoint_url)
            if manifest["classes"] != self.manifest["classes"]:
                raise LoaderError(
                    f"{storage.describe()} has classes {_brief(manifest['classes'])}, but "
                    f"{self.storage.describe()} has {_brief(self.manifest['classes'])}: extra "
                    "data must be built with the same class list (--classes)"
                )
            self.sources.append((manifest, storage))
        shard_urls = tuple(st.describe(s["name"]) for m, st in self.sources for s in m["shards"])
        self.augment = AugmentSpec(
            crop_size=cfg.crop_size,
            resize_long=tuple(cfg.resize_long),
            hflip=cfg.hflip,
            color_jitter=tuple(cfg.color_jitter),
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
        workers = cfg.num_workers if self.backend == "webdataset" else 1
        self.spec = StreamSpec(
            shard_urls=shard_urls,
            num_samples=sum(m["num_samples"] for m, _ in self.sources),
            num_classes=self.num_classes,
            batch_size=cfg.batch_size,
            augment=self.augment,
            rank=rank,
            world_size=world_size,
            num_workers=max(1, workers),
            seed=cfg.seed,
            pool_size=cfg.pool_size,
            max_wait=cfg.max_wait,
            cross_domain_share=cfg.cross_domain_share,
            shuffle_buffer=cfg.shuffle_buffer,
            endpoint_url=cfg.endpoint_url,
            pairing=cfg.pairing,
        )
        try:
            self._len = self.spec.batches_per_rank
        except ValueError as e:
            raise LoaderError(str(e)) from None
        self.epoch, self.position = 0, 0
        self._bad_keys: set[str] = set()
        self._worker_stats: dict[int, dict] = {}

    def __len__(self) -> int:
        return self._len

    # -- position -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start of an epoch (call before iterating, as with DistributedSampler)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._bad_keys.clear()

    def state_dict(self) -> dict:
        """Where the loader stands: the next batch is ``batches`` of ``epoch`` (0-based)."""
        return {
            "epoch": self.epoch,
            "batches": self.position,
            "bad_keys": sorted(self._bad_keys),
            "backend": self.backend,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise LoaderError(
                f"loader state is for {state['world_size']} ranks, this run has {self.world_size}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])
        self._bad_keys = set(state.get("bad_keys", ()))

    # -- statistics -----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Counts over this epoch so far (latest report of each worker)."""
        keys = ("samples", "bad_decode", "bad_record", "shard_errors")
        out = {k: sum(w["worker"][k] for w in self._worker_stats.values()) for k in keys}
        pairs = PairStats()
        for w in self._worker_stats.values():
            pairs = pairs.merge(PairStats(**w["pairs"]))
        out.update(pairs.summary())
        bad = {k for w in self._worker_stats.values() for k in w["worker"]["bad_keys"]}
        out["bad_keys"] = sorted(bad)[:MAX_LISTED]
        last = [w["worker"]["last_error"] for w in self._worker_stats.values()]
        out["last_error"] = next((e for e in reversed(last) if e), "")
        return out

    def _note(self, stats: dict) -> None:
        self._worker_stats[stats["worker"]["worker"]] = stats
        self._bad_keys.update(stats["worker"]["bad_keys"])

    # -- iteration ------------------------------------------------------------------------------
    def _finish(self, batch: dict) -> dict:
        self._note(batch.pop("stats"))
        for k in ("image_m", "image_n"):
            img = batch[k].to(self.device, non_blocking=True)
            batch[k] = (
                normalize(img, self.augment.mean, self.augment.std)
                if img.dtype == torch.uint8
                else img
            )
        for k in ("labels_m", "labels_n", "domain_m", "domain_n", "pair_type"):
            batch[k] = batch[k].to(self.device, non_blocking=True)
        return batch

    def _webdataset_batches(self):
        stream = PairStream(self.spec)
        stream.set_position(self.epoch, self.position, self._bad_keys)
        yield from epoch_dataloader(stream, self.cfg, self.epoch, self.device)

    def _dali_batches(self):

        yield from dali_pair_batches(self, self.epoch, self.position)

    def __iter__(self):
        self._worker_stats.clear()
        source = (
            self._webdataset_batches() if self.backend == "webdataset" else self._dali_batches()
        )
        for batch in source:
            if self.position >= self._len:
                break
            batch = self._finish(batch)
            self.position += 1
            yield batch
        if self.position >= self._len:  # the epoch is complete: the next one starts at 0
            self.epoch, self.position = self.epoch + 1, 0
            self._bad_keys.clear()
