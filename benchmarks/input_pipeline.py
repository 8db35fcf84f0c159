"""Benchmark: the pair loader (read + decode + augment + pair) against raw reads of its shards.

``PairLoader`` epochs over two shard sets, each built in the run (not timed):

* ``demo``: the built-in synthetic dataset (128-176 px images with masks), crop 128, long side
  resized to [128, 192];
* ``photo448``: a class-folder tree of photo-like JPEGs (~500x375, quality 90, ~60-150 KB, 6
  classes), crop 448, long side resized to [448, 768].

Cases per set: the webdataset backend with 0 and 2 loader workers, DALI on the CPU (2 threads),
and DALI with mixed (GPU) decoding when torch sees a GPU. Baseline, same shards, same run: the
raw read rate (every shard read sequentially with plain file reads) and webdataset's tar parse
(``mcis_dist.data.stream.iter_shard``). Throughput counts the m images of each pair (B per batch
of B pairs), first batch excluded (it holds the start-up, reported as ``first_batch_s``). Every
batch is checked (shapes, finite non-blank images, the manifest's labels, a shared class per
pair) and every epoch must give ``len(loader)`` batches, so a broken path cannot look fast.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from common import parse_args, print_table, timeit, write_results
from shards_build import make_jpeg  # the photo-like JPEGs of the shards_build benchmark

NAME = "input_pipeline"
BATCH = 8  # pairs per batch
PHOTO_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus")
SIZES = {  # images per set, shard size in MB (several shards, so that 2 workers split them)
    True: {"demo": (200, 0.5), "photo448": (120, 2.0)},  # --quick
    False: {"demo": (2000, 4.0), "photo448": (600, 8.0)},
}


@dataclass(frozen=True)
class ShardSet:
    name: str
    url: str  # the split folder (holds manifest.json and the shards)
    crop: int
    resize_long: tuple[int, int]
    manifest: dict

    @property
    def paths(self) -> list[str]:
        return [os.path.join(self.url, s["name"]) for s in self.manifest["shards"]]

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def bytes_per_sample(self) -> float:
        return self.manifest["total_bytes"] / self.num_samples

    def labels(self) -> dict[str, frozenset[int]]:
        """Every sample's classes, from the manifest (the truth the batches are checked with)."""
        keys = [k for s in self.manifest["shards"] for k in s["keys"]]
        truth: dict[str, set[int]] = {k: set() for k in keys}
        for c, members in enumerate(self.manifest["class_index"]):
            for g in members:
                truth[keys[g]].add(c)
        return {k: frozenset(v) for k, v in truth.items()}


# -- data (not timed) --------------------------------------------------------------------------
def _write_photo(job: tuple[str, int, int]) -> int:
    root, i, seed = job
    path = Path(root) / PHOTO_CLASSES[i % len(PHOTO_CLASSES)] / f"{i:06d}.jpg"
    data = make_jpeg(np.random.default_rng([seed, i]))  # per image: any order, same files
    path.write_bytes(data)
    return len(data)


def generate_photos(root: Path, count: int, seed: int = 0) -> int:
    """``root/<class>/<n>.jpg``, classes in turn; generated in 2 processes. Returns the bytes."""
    for c in PHOTO_CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        jobs = [(str(root), i, seed) for i in range(count)]
        return sum(pool.map(_write_photo, jobs, chunksize=8))


def build_sets(tmp: Path, quick: bool) -> list[ShardSet]:
    from mcis_dist.shards.build import BuildOptions, build_dataset
    from mcis_dist.shards.synthetic import SyntheticSpec
    from mcis_dist.storage import open_storage

    sizes = SIZES[quick]
    sets = []
    for name, crop, resize_long in (("demo", 128, (128, 192)), ("photo448", 448, (448, 768))):
        count, shard_mb = sizes[name]
        t0 = time.perf_counter()
        if name == "demo":
            source, args = "synthetic", {"spec": SyntheticSpec(num_train=count, num_val=1)}
            what = "synthetic images"
        else:
            jpeg_bytes = generate_photos(tmp / "photos", count)
            source, args = "folder", {"folder_root": str(tmp / "photos"), "domain": "target"}
            what = f"photo-like JPEGs ({jpeg_bytes / count / 1e3:.0f} KB each)"
        opts = BuildOptions(shard_size_mb=shard_mb, workers=1, progress=False)  # 1: no spawn
        m = build_dataset(
            source, open_storage(str(tmp / name)), opts, ["train"], args, log=lambda *a: None
        )["train"]
        assert m["num_samples"] == count, f"{name}: the build kept {m['num_samples']} of {count}"
        assert m["num_shards"] >= 2, f"{name}: {m['num_shards']} shard(s); 2 workers need 2+"
        print(
            f"{name}: {count} {what} in {m['num_shards']} shards, "
            f"{m['total_bytes'] / 1e6:.1f} MB; generated and built in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        sets.append(ShardSet(name, str(tmp / name / "train"), crop, resize_long, m))
    return sets


# -- baselines -----------------------------------------------------------------------------------
def read_raw(paths: list[str]) -> int:
    """Every shard's bytes, sequentially, with plain 1 MiB file reads."""
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def evict(paths: list[str]) -> None:
    """Drop these files (only) from the page cache, so that the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_samples(paths: list[str]) -> int:
    """Every sample of every shard through webdataset's tar iterator (no decoding)."""
    from mcis_dist.formats.shards import iter_shard

    n = 0
    for p in paths:
        for raw in iter_shard(p):
            assert "json" in raw and ("jpg" in raw or "png" in raw), f"{raw['__key__']}: no image"
            n += 1
    return n


def baselines(ss: ShardSet, repeat: int) -> dict[str, dict]:
    """raw_read (page cache: the state the loaders read in), raw_read_cold (each run after
    evicting the shards), iter_shard (page cache); best of ``repeat`` runs each."""
    nbytes, paths = ss.manifest["total_bytes"], ss.paths
    timings = {}
    if hasattr(os, "posix_fadvise"):
        timings["raw_read_cold"] = timeit(
            lambda _: read_raw(paths), repeat, setup=lambda: evict(paths)
        )
    timings["raw_read"] = timeit(lambda: read_raw(paths), repeat, warmup=1)
    timings["iter_shard"] = timeit(lambda: read_samples(paths), repeat)
    for name, t in timings.items():
        want = ss.num_samples if name == "iter_shard" else nbytes
        assert t.result == want, f"{ss.name} {name}: read {t.result}, expected {want}"
    return {
        name: {
            "seconds": t.best,
            "m_images_per_s": ss.num_samples / t.best,
            "mb_per_s": nbytes / 1e6 / t.best,
            "runs_s": t.runs,
        }
        for name, t in timings.items()
    }


# -- loader cases --------------------------------------------------------------------------------
def check_batch(batch: dict, ss: ShardSet, device: str, truth: dict) -> None:
    """Shapes, finite non-blank images, true labels, and pairs that share a class."""
    import torch

    for k in ("image_m", "image_n"):
        img = batch[k]
        assert img.shape == (BATCH, 3, ss.crop, ss.crop), f"{k}: shape {tuple(img.shape)}"
        assert img.dtype == torch.float32 and img.device.type == device, f"{k}: {img.dtype}"
        peak = img.abs().flatten(1).amax(1)
        assert torch.isfinite(peak).all() and (peak > 0).all(), f"{k}: a blank or NaN image"
    lm, ln = batch["labels_m"].cpu(), batch["labels_n"].cpu()
    assert ((lm * ln).sum(1) > 0).all(), "a pair shares no class"
    for i, (km, kn) in enumerate(zip(batch["key_m"], batch["key_n"], strict=True)):
        assert km != kn, f"{km} paired with itself"
        assert truth[km] & truth[kn], f"{km} and {kn} share no class in the manifest"
        for key, labels in ((km, lm[i]), (kn, ln[i])):
            assert set(labels.nonzero().flatten().tolist()) == truth[key], f"{key}: wrong labels"


def cpu_seconds() -> float:
    """CPU time of this process (DALI's threads included) and of its reaped children (loader
    workers): unlike wall time, it hardly depends on what else the machine runs."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def run_loader(ss: ShardSet, backend: str, workers: int, device: str, truth: dict) -> dict:
    """One epoch; seconds and images/s exclude the first batch (start-up)."""
    import torch

    from mcis_dist.config import DataConfig
    from mcis_dist.data.loader import PairLoader

    cfg = DataConfig(
        train_url=ss.url,
        backend=backend,
        batch_size=BATCH,
        num_workers=workers,
        mp_context="fork",
        crop_size=ss.crop,
        resize_long=list(ss.resize_long),
        dali_threads=2,
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    loader = PairLoader(cfg, rank=0, world_size=1, device=device)
    assert len(loader) >= 2, f"{ss.name}: {len(loader)} batch(es); need 2+ to time"
    stamps = []
    for batch in loader:
        sync()
        stamps.append(time.perf_counter())
        check_batch(batch, ss, device, truth)
    assert len(stamps) == len(loader), f"{len(stamps)} batches of {len(loader)}"
    cpu = cpu_seconds() - cpu0  # the whole epoch: the workers have exited (and been reaped)
    s = loader.stats
    assert s["bad_decode"] == s["bad_record"] == s["shard_errors"] == 0, f"loader skipped: {s}"
    assert s["pairs"] >= len(loader) * BATCH, f"{s['pairs']} pairs for {len(loader)} batches"
    seconds = stamps[-1] - stamps[0]
    images = BATCH * (len(stamps) - 1)
    return {
        "batches": len(stamps),
        "first_batch_s": stamps[0] - t0,
        "seconds": seconds,
        "m_images_per_s": images / seconds,
        "mb_per_s": images * ss.bytes_per_sample / 1e6 / seconds,
        "cpu_ms_per_image": 1e3 * cpu / (BATCH * len(stamps)),
        "decoded": s["samples"],
        "pairs": s["pairs"],
    }


def loader_cases(gpu: bool, dali: bool) -> dict[str, tuple[str, int, str]]:
    """name: (backend, loader workers, device)."""
    cases = {"webdataset_0w": ("webdataset", 0, "cpu"), "webdataset_2w": ("webdataset", 2, "cpu")}
    if dali:
        cases["dali_cpu"] = ("dali", 0, "cpu")
        if gpu:
            cases["dali_gpu"] = ("dali", 0, "cuda")
    return cases


def measure(ss: ShardSet, cases: dict, epochs: int) -> dict[str, dict]:
    """Each case for ``epochs`` epochs, round-robin (a passing load spike hits one epoch of a
    case, not all); the epoch with the best images/s is reported, with every epoch's rate."""
    truth = ss.labels()
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(epochs):
        for name, (backend, workers, device) in cases.items():
            runs[name].append(run_loader(ss, backend, workers, device, truth))
    out = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["m_images_per_s"])
        out[name] = {
            **best,
            "runs_m_images_per_s": [r["m_images_per_s"] for r in rs],
            "runs_first_batch_s": [r["first_batch_s"] for r in rs],
        }
    return out


def case_ratios(ss: ShardSet, res: dict[str, dict], cases: dict) -> dict[str, float]:
    ips = {k: v["m_images_per_s"] for k, v in res.items()}
    base = ips["raw_read"]
    ratios = {f"{ss.name}_{name}_vs_raw_read": ips[name] / base for name in ["iter_shard", *cases]}
    ratios[f"{ss.name}_webdataset_2w_vs_0w"] = ips["webdataset_2w"] / ips["webdataset_0w"]
    for name in ("dali_cpu", "dali_gpu"):
        if name in ips:
            ratios[f"{ss.name}_{name}_vs_webdataset_2w"] = ips[name] / ips["webdataset_2w"]
    if "dali_gpu" in ips:
        ratios[f"{ss.name}_dali_gpu_vs_dali_cpu"] = ips["dali_gpu"] / ips["dali_cpu"]
    return ratios


def main() -> None:
    args = parse_args(NAME, __doc__.splitlines()[0])
    import torch
    import torchvision.transforms.v2.functional  # noqa: F401  (imports are not start-up)
    import webdataset  # noqa: F401

    dali = importlib.util.find_spec("nvidia.dali") is not None
    if dali:
        import nvidia.dali.fn  # noqa: F401
    gpu = torch.cuda.is_available()
    gpu_desc = torch.cuda.get_device_name(0) if gpu else "not available"
    load = os.getloadavg()
    # One intra-op thread in this process, as DataLoader gives each worker: per-image ops are
    # too small to split, and a thread per core competes for the cores with DALI's threads and
    # with other work (see the README: 1.5x slower idle, up to 60x on a busy machine).
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(
        f"gpu: {gpu_desc}; dali: {'installed' if dali else 'not installed'}; torch threads "
        f"1 (default {default_threads}); load average {load[0]:.1f}"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if load[0] > (cores or 1):
        print(
            f"note: load average above the {cores} usable cores; other work may disturb the numbers"
        )
    cases = loader_cases(gpu, dali)
    repeat, epochs = (3, 1) if args.quick else (5, 2)
    metrics: dict = {
        "batch_size": BATCH,
        "gpu": gpu_desc,
        "dali": dali,
        "epochs": epochs,
        "torch_threads": 1,
        "torch_threads_default": default_threads,
        "load_avg_start": load,
    }
    ratios: dict = {}
    with tempfile.TemporaryDirectory(prefix="mcis-bench-") as tmpdir:
        sets = build_sets(Path(tmpdir), args.quick)
        for ss in sets:
            res = baselines(ss, repeat) | measure(ss, cases, epochs)
            for r in res.values():
                r["vs_raw_read"] = r["m_images_per_s"] / res["raw_read"]["m_images_per_s"]
            metrics[ss.name] = {
                "images": ss.num_samples,
                "shards": ss.manifest["num_shards"],
                "shard_mb": ss.manifest["total_bytes"] / 1e6,
                "crop": ss.crop,
                "resize_long": list(ss.resize_long),
                "cases": res,
            }
            ratios |= case_ratios(ss, res, cases)
    metrics["load_avg_end"] = os.getloadavg()

    columns = [
        "case",
        "batches",
        "first_batch_s",
        "seconds",
        "m_images_per_s",
        "mb_per_s",
        "vs_raw_read",
        "cpu_ms_per_image",
    ]
    for ss in sets:
        res = metrics[ss.name]["cases"]
        title = (
            f"\n{ss.name}: {ss.num_samples} images, crop {ss.crop}, long side "
            f"{list(ss.resize_long)}, {BATCH} pairs a batch. m_images_per_s counts the m "
            "image of each pair (B a batch), first batch excluded;\nMB = shard bytes; "
            f"baselines best of {repeat} runs, loaders best of {epochs} epoch(s)"
        )
        rows = [{"case": k, **v, "vs_raw_read": f"{v['vs_raw_read']:.3g}"} for k, v in res.items()]
        print_table(rows, columns, title=title)
    print()
    print_table([{"ratio": k, "value": f"{v:.3g}"} for k, v in ratios.items()], ["ratio", "value"])
    if not gpu:
        print("\ngpu: not available (no dali_gpu case)")
    write_results(args.out, NAME, metrics, ratios)


if __name__ == "__main__":
    main()
