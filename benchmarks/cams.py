"""Localization-map throughput (images/s of one actor): single-round maps against co-attentive
maps with K = 3 related images per class, without and with the related-feature cache, and with a
small per-class related pool (``cams.related_pool``) that makes the cache hit. All cases map the
same images with the same model in the same run; ratios are against single-round.

CPU: the demo backbone on the built-in dataset (128-176 px images), scales 1.0 and 0.5 x flip.
The cache rows show what the cache buys when the same related images recur: with draws from all
images of a class its hit rate depends on the data set's size, with a pool it is near 1.
"""

from __future__ import annotations

import tempfile
import time

import torch

from mcis_dist.cams.infer import CamEngine, CamSettings
from mcis_dist.cli import main as mcis
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.stream import parse_record
from mcis_dist.data.transforms import decode_rgb
from mcis_dist.formats.shards import iter_shard
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier

from common import parse_args, print_table, write_results


def images(manifest, storage, n):
    out = []
    for shard in manifest["shards"]:
        for raw in iter_shard(storage.describe(shard["name"])):
            key, labels, _, data = parse_record(raw, len(manifest["classes"]))
            out.append((key, labels, decode_rgb(data)))
            if len(out) == n:
                return out
    return out


def run(engine, batch) -> tuple[float, dict]:
    t0 = time.perf_counter()
    for key, labels, rgb in batch:
        engine.cams(rgb, labels, key)
    return time.perf_counter() - t0, engine.cache.stats()


def main():
    args = parse_args("cams", __doc__)
    torch.set_num_threads(1)
    n_train, n_img = (120, 24) if args.quick else (600, 96)
    with tempfile.TemporaryDirectory() as tmp:
        assert (
            mcis(
                [
                    "shards",
                    "build",
                    "--source",
                    "synthetic",
                    "--num-train",
                    str(n_train),
                    "--num-val",
                    "1",
                    "--workers",
                    "1",
                    "--no-progress",
                    "--out",
                    tmp,
                ]
            )
            == 0
        )
        manifest, storage = open_manifest(f"{tmp}/train")
        batch = images(manifest, storage, n_img)
        torch.manual_seed(0)
        model = MCISClassifier(build_backbone("resnet38_tiny"), num_classes=8).eval()
        base = dict(scales=(1.0, 0.5), flip=True, related=3, related_size=128)
        cases = [
            ("single", dict(mode="single"), 0, 0),
            ("coatt_k3_nocache", dict(mode="coattentive"), 0, 0),
            ("coatt_k3_cache", dict(mode="coattentive"), 256, 0),
            ("coatt_k3_cache_pool8", dict(mode="coattentive"), 256, 8),
        ]
        rows = []
        for name, over, cache_mb, pool in cases:
            sampler = RelatedSampler(manifest, storage, seed=0, pool=pool)
            engine = CamEngine(
                model, CamSettings(**{**base, **over}), sampler, cache_bytes=cache_mb * 2**20
            )
            seconds, stats = run(engine, batch)
            hit = stats["hits"] / max(1, stats["hits"] + stats["misses"])
            rows.append(
                {
                    "case": name,
                    "images": len(batch),
                    "seconds": seconds,
                    "images_per_s": len(batch) / seconds,
                    "cache_hit_rate": hit if cache_mb else "-",
                }
            )
    print_table(
        rows,
        ["case", "images", "seconds", "images_per_s", "cache_hit_rate"],
        f"maps of {len(batch)} images, one process, 1 thread; data set {n_train} images",
    )
    by = {r["case"]: r["images_per_s"] for r in rows}
    ratios = {f"{k}_vs_single": by[k] / by["single"] for k in by if k != "single"}
    ratios["cache_vs_nocache"] = by["coatt_k3_cache"] / by["coatt_k3_nocache"]
    ratios["cache_pool8_vs_nocache"] = by["coatt_k3_cache_pool8"] / by["coatt_k3_nocache"]
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    write_results(args.out, "cams", {"cases": rows}, ratios)


if __name__ == "__main__":
    main()
