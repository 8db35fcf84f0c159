"""``mcis cams``: localization maps for a whole split, sharded over a pool of Ray actors.

One output shard per input shard (``cams-NNNNNN.tar``, same keys in the same order, minus the
images that could not be read), each sample holding

* ``<key>.cam.npy``: float16 (L, ceil(H/s), ceil(W/s)) maps in [0, 1], one per labelled class,
  in the order of ``labels`` (s = ``cams.out_stride``);
* ``<key>.json``: ``{"key", "labels", "size": [H, W], "stride", "fallback": [classes mapped
  single-round because no other image holds them], "top1", "top5"}``; ``top1`` / ``top5`` are
  the classifier's highest single-image class scores over all classes (GAP of phi, Eq. 1, at
  scale 1; ``CamEngine.last_scores``), for top-1 localization in ``mcis eval cams``.

Plus the DALI-style ``.idx`` of each tar, a part record per shard and ``manifest.json``
(format ``mcis-cams/1``) written last. See ``mcis_dist.runtime.sharded`` for the resume and fault rules.
"""

from __future__ import annotations

import json
import os
import time

import ray
import torch
from tqdm import tqdm

from mcis_dist.cams.infer import CamEngine, CamSettings, top_classes
from mcis_dist.config import ExperimentConfig, config_from_dict
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.stream import parse_record
from mcis_dist.data.transforms import decode_rgb
from mcis_dist.errors import reason
from mcis_dist.formats.cams import (
    FORMAT,
    cam_shard_name,
    encode_cam,
)
from mcis_dist.formats.manifest import shard_entries, write_manifest
from mcis_dist.formats.shards import iter_shard
from mcis_dist.models.build import build_model
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.paths import absolute_paths, absolute_url, endpoint_url
from mcis_dist.runtime.session import ray_session
from mcis_dist.runtime.sharded import (
    StageError,
    Timer,
    actor_options,
    clean_temporaries,
    existing_parts,
    fingerprint,
    plan_actors,
    run_sharded,
    stage_complete,
    write_part,
)
from mcis_dist.shards.build import ShardWriter
from mcis_dist.storage import open_storage

MAX_LISTED = 1000  # skipped samples listed by key in a manifest (all are counted)

__all__ = ["CamActor", "compute_cams"]


# ------------------------------------------------------------------------------------ settings
def stage_settings(cfg: ExperimentConfig) -> dict:
    """What the maps depend on (the fingerprint's settings): not where or how fast they run."""
    c = cfg.cams
    keep = (
        "mode",
        "related",
        "related_pool",
        "related_size",
        "contrastive",
        "self_pairs",
        "scales",
        "flip",
        "out_stride",
        "seed",
    )
    out = {k: getattr(c, k) for k in keep}
    # later settings count only away from their defaults, so older outputs stay valid
    later = ("class_layer", "readout", "square", "authors_gate", "related_url", "related_classes")
    for k in (*later, "readout_layer", "normalize"):
        if getattr(c, k) != type(c).model_fields[k].default:
            out[k] = getattr(c, k)
    out["related_size"] = c.related_size or cfg.data.crop_size
    out["mean"], out["std"] = cfg.data.mean, cfg.data.std
    out["model"] = cfg.model.model_dump()
    if not out["model"]["freeze_backbone"]:  # a later setting: older outputs stay valid
        del out["model"]["freeze_backbone"]
    return out


def check_model_state(cfg: ExperimentConfig, state: dict, num_classes: int, where: str) -> None:
    """Build the configured model and load the state: a mismatch names the keys."""

    model = build_model(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}),
        num_classes,
    )
    try:
        ckpt.load_model_state(model, state, where=f"checkpoint {where}")
    except ckpt.CheckpointError as e:
        raise StageError(f"{e} (model section: {cfg.model.model_dump()})") from None


# ---------------------------------------------------------------------------------- the worker
class CamActor:
    """One model for the actor's life; ``run(job)`` maps one input shard to one CAM shard."""

    def __init__(self, experiment: dict, state: dict, num_classes: int) -> None:

        cfg = config_from_dict(experiment, ExperimentConfig, source="<cams config>")
        cfg.model.weights = None  # the checkpoint has every weight
        self.cfg, self.num_classes = cfg, num_classes
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cams.torch_threads)
        model = build_model(cfg, num_classes)
        model.load_state_dict(state)
        self.model = model.to(self.device).eval()
        endpoint = endpoint_url(cfg)
        manifest, self.source = open_manifest(cfg.cams.split_url, endpoint, check_shards=False)
        self.out = open_storage(cfg.cams.out_url, endpoint_url=endpoint)
        sampler = None
        if cfg.cams.mode in ("coattentive", "authors"):
            related, related_source = manifest, self.source
            if cfg.cams.related_url:
                related, related_source = open_manifest(
                    cfg.cams.related_url, endpoint, check_shards=False
                )
            sampler = RelatedSampler(
                related, related_source, seed=cfg.cams.seed, pool=cfg.cams.related_pool
            )
        self.engine = CamEngine(
            self.model,
            CamSettings.from_config(cfg),
            sampler,
            self.device,
            cache_bytes=cfg.cams.feature_cache_mb * 2**20,
            class_scores=True,
        )

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: dict) -> dict:

        start, name = time.perf_counter(), job["name"]
        keys, skipped, fallback = [], [], {}
        counts_before = dict(self.engine.counts)
        cache_before = (self.engine.cache.hits, self.engine.cache.misses)
        endpoint = getattr(self.source, "endpoint_url", None)
        with self.out.staged(name) as staged:
            writer = ShardWriter(staged.path)
            try:
                for raw in iter_shard(self.source.describe(job["source"]), endpoint):
                    key = raw.get("__key__", "?")
                    try:
                        key, labels, domain, data = parse_record(raw, self.num_classes)
                        rgb = decode_rgb(data)
                    except Exception as e:  # a bad sample is skipped and listed
                        skipped.append({"key": key, "reason": reason(e)})
                        continue
                    maps, fell = self.engine.cams(rgb, labels, key, domain)
                    meta = {
                        "key": key,
                        "labels": list(labels),
                        "size": list(rgb.shape[-2:]),
                        "stride": self.cfg.cams.out_stride,
                        "fallback": fell,
                    }
                    if self.engine.last_scores is not None:
                        top = top_classes(self.engine.last_scores, 5)
                        meta.update(top1=top[0], top5=top)
                    writer.write(
                        {
                            "__key__": key,
                            "cam.npy": encode_cam(maps.cpu().numpy()),
                            "json": json.dumps(meta).encode(),
                        }
                    )
                    keys.append(key)
                    for k in fell:
                        fallback[str(k)] = fallback.get(str(k), 0) + 1
            except Exception as e:  # an unreadable or truncated input shard: keep what was read
                skipped.append({"key": f"{job['source']}:*", "reason": f"shard: {reason(e)}"})
            index = writer.close().encode()
            if not keys:
                staged.discard()
        record = {
            "name": name,
            "index": job["index"],
            "source": job["source"],
            "fingerprint": job["fingerprint"],
            "samples": len(keys),
            "keys": keys,
            "skipped": skipped,
            "fallback_by_class": fallback,
            "fallback_images": self.engine.counts["fallback_images"]
            - counts_before["fallback_images"],
            "related_bad": self.engine.counts["related_bad"] - counts_before["related_bad"],
            "cache_hits": self.engine.cache.hits - cache_before[0],
            "cache_misses": self.engine.cache.misses - cache_before[1],
            "seconds": round(time.perf_counter() - start, 3),
        }
        if keys:
            idx_name = name.replace(".tar", ".idx")
            self.out.write_bytes(idx_name, index)
            record.update(index_name=idx_name, bytes=writer.bytes, sha256=writer.sha256)
        write_part(self.out, record)
        return record


# ---------------------------------------------------------------------------------- the driver
def compute_cams(cfg: ExperimentConfig, checkpoint: str | None = None, log=print) -> dict:
    """Maps for every image of ``cams.split_url`` into ``cams.out_url``; returns the manifest.
    Skips finished shards (and the whole stage when its manifest is complete)."""

    cfg = absolute_paths(cfg)
    cfg.cams.split_url, cfg.cams.out_url = (
        absolute_url(cfg.cams.split_url),
        absolute_url(cfg.cams.out_url),
    )
    cfg.cams.checkpoint = absolute_url(checkpoint or cfg.cams.checkpoint)
    timer, endpoint = Timer(), endpoint_url(cfg)
    source_manifest, _ = open_manifest(cfg.cams.split_url, endpoint)
    classes = source_manifest["classes"]
    if cfg.cams.related_url:
        cfg.cams.related_url = absolute_url(cfg.cams.related_url)
        related_classes = open_manifest(cfg.cams.related_url, endpoint)[0]["classes"]
        if related_classes != classes:
            raise StageError(
                f"cams.related_url={cfg.cams.related_url} has classes {related_classes[:5]}... "
                f"but the mapped split {cfg.cams.split_url} has {classes[:5]}...: related "
                "images must come from a split built with the same class list"
            )
    state, where = ckpt.classifier_checkpoint(cfg, cfg.cams.checkpoint)
    check_model_state(cfg, state, len(classes), where)
    out = open_storage(cfg.cams.out_url, endpoint_url=endpoint)
    out.check_writable()
    model_id = fingerprint(
        where, {k: list(v.shape) + [float(v.float().sum())] for k, v in state.items()}
    )
    source_id = [s["sha256"] for s in source_manifest["shards"]]
    stage_fp = fingerprint(stage_settings(cfg), model_id, source_id)
    done = stage_complete(out, stage_fp)
    if done is not None:
        log(f"cams: {out.describe()} is complete ({done['samples']} maps); nothing to do")
        return done

    clean_temporaries(out)  # left by a killed earlier run
    parts = existing_parts(out)
    jobs, kept = [], {}
    for i, shard in enumerate(source_manifest["shards"]):
        name = cam_shard_name(i)
        job_fp = fingerprint(stage_fp, shard["sha256"])
        record = parts.get(name)
        if record is not None and record.get("fingerprint") == job_fp:
            kept[name] = record
        else:
            jobs.append(
                {
                    "name": name,
                    "index": i,
                    "source": shard["name"],
                    "samples": shard["samples"],
                    "fingerprint": job_fp,
                }
            )
    total = sum(s["samples"] for s in source_manifest["shards"])
    log(
        f"cams: {cfg.cams.mode} maps of {total} images in {len(source_manifest['shards'])} "
        f"shards from {cfg.cams.split_url}, checkpoint {where}"
        + (f"; {len(kept)} shards already done" if kept else "")
    )

    records = list(kept.values())
    if jobs:
        records += _run_actors(cfg, jobs, state, len(classes), total - _done(kept), log, tqdm)
        clean_temporaries(out)  # left by actors that died mid-shard
    manifest = assemble_manifest(cfg, records, source_manifest, stage_fp, where, timer())
    write_manifest(out, manifest)
    log(
        f"cams: {manifest['samples']} maps in {len(manifest['shards'])} shards at "
        f"{out.describe()} ({manifest['skipped_count']} skipped, "
        f"{manifest['fallback']['images']} images with single-round fallbacks) in {timer():.1f} s"
    )
    return manifest


def _done(kept: dict) -> int:
    return sum(r["samples"] + len(r["skipped"]) for r in kept.values())


def _run_actors(cfg, jobs, state, num_classes, todo, log, tqdm) -> list[dict]:

    with ray_session():
        c = cfg.cams
        n = plan_actors(c.num_actors, c.use_gpu, c.cpus_per_actor, len(jobs))
        experiment, state_ref = json.loads(cfg.model_dump_json()), ray.put(state)
        remote = ray.remote(CamActor).options(**actor_options(c.use_gpu, c.cpus_per_actor))
        log(f"cams: {len(jobs)} shards to map on {n} actors")
        with tqdm(total=todo, desc="cams", unit="img", disable=None) as bar:
            return run_sharded(
                jobs,
                lambda: remote.remote(experiment, state_ref, num_classes),
                n,
                max_failures=c.max_failures,
                log=log,
                what="shard",
                progress=lambda r: bar.update(r["samples"] + len(r["skipped"])),
            )


def assemble_manifest(cfg, records, source_manifest, stage_fp, where, seconds) -> dict:
    records = sorted(records, key=lambda r: r["index"])
    skipped = [{**s, "shard": r["source"]} for r in records for s in r["skipped"]]
    by_class: dict[str, int] = {}
    for r in records:
        for k, n in r["fallback_by_class"].items():
            by_class[k] = by_class.get(k, 0) + n
    compute = sum(r["seconds"] for r in records)
    samples = sum(r["samples"] for r in records)
    hits, misses = sum(r["cache_hits"] for r in records), sum(r["cache_misses"] for r in records)
    return {
        "format": FORMAT,
        "fingerprint": stage_fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"url": cfg.cams.split_url, "samples": source_manifest["num_samples"]},
        "checkpoint": where,
        "classes": source_manifest["classes"],
        "settings": stage_settings(cfg),
        "shards": shard_entries(records),
        "samples": samples,
        "skipped_count": len(skipped),
        "skipped": skipped[:MAX_LISTED],
        "fallback": {
            "images": sum(r["fallback_images"] for r in records),
            "classes": sum(by_class.values()),
            "by_class": by_class,
        },
        "related_bad": sum(r["related_bad"] for r in records),
        "feature_cache": {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        },
        "seconds": {
            "wall": seconds,
            "compute": round(compute, 3),
            "images_per_s_per_actor": round(samples / compute, 3) if compute else None,
        },
    }
