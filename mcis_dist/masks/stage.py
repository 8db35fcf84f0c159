"""Per-pixel labels from CAMs, sharded over a pool of Ray actors: AffinityNet's confident labels
(:func:`make_labels`) and the pseudo masks (:func:`make_masks`, ``mcis masks``).

One :class:`LabelActor` walks a CAM shard together with its image shard (the CAM manifest's
``shards[i]["source"]``; joined by key) and turns each image's maps into a label map with the
function of the stage's mode (:data:`mcis_dist.masks.modes.MODES`: ``confident``,
``random_walk``, ``saliency``, ``cams``), writing one label shard (:mod:`mcis_dist.formats.labels`)
per CAM shard.

Inputs the stage cannot label (a CAM without its image, a CAM whose size differs from its
image's, an undecodable image, no saliency map, too little saliency foreground) are skipped,
counted and listed in the manifest; the stage finishes. Labels with no confident pixel (all 255)
are written all the same and counted as ``empty``. Resume, fault tolerance and fingerprints
follow :mod:`mcis_dist.runtime.sharded`, exactly as ``mcis cams`` does: the fingerprint of a label shard
is the mode's settings, the AffinityNet's weights (``random_walk``), the CAM manifest's
fingerprint and the checksums of the CAM shard and of its image shard.
"""

from __future__ import annotations

import json
import os
import time

import ray
import torch
from tqdm import tqdm

from mcis_dist.affinity.labels import is_empty
from mcis_dist.config import ExperimentConfig, config_from_dict
from mcis_dist.data.loader import open_manifest
from mcis_dist.errors import reason
from mcis_dist.formats.cams import iter_cam_shard, read_cam_manifest
from mcis_dist.formats.labels import (
    FORMAT,
    LABEL_MEMBER,
    assemble_manifest,
    encode_label,
    label_shard_name,
)
from mcis_dist.formats.manifest import write_manifest
from mcis_dist.formats.shards import iter_shard
from mcis_dist.masks.modes import MODES, SkipSample, make_sample
from mcis_dist.models.build import build_affinity_net
from mcis_dist.runtime import checkpoint as ckpt
from mcis_dist.runtime.paths import (
    absolute_paths,
    absolute_url,
    affinity_run_url,
    endpoint_url,
    labels_url,
)
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

__all__ = ["LabelActor", "make_labels", "make_masks", "resolve_affinity_checkpoint"]


# ---------------------------------------------------------------------------------- the worker
def _until_error(items, on_error):
    """The items of an iterator up to its first error, which goes to ``on_error`` (an
    unreadable or truncated shard: keep what was read). Errors of the caller's loop body are
    not caught here."""
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            on_error(e)
            return
        yield item


class LabelActor:
    """One labeller (and model) for the actor's life; ``run(job)`` labels one CAM shard."""

    def __init__(self, experiment: dict, spec: dict, state: dict | None) -> None:
        cfg = config_from_dict(experiment, ExperimentConfig, source="<labels config>")
        self.spec, self.mode = spec, MODES[spec["mode"]]
        self.device = torch.device(
            "cuda" if spec["use_gpu"] and torch.cuda.is_available() else "cpu"
        )
        if self.device.type == "cpu":
            torch.set_num_threads(spec["threads"])
        self.label = self.mode.build(cfg, state, self.device)
        endpoint = endpoint_url(cfg)
        self.cams = open_storage(spec["cams_url"], endpoint_url=endpoint)
        self.source = open_storage(spec["source_url"], endpoint_url=endpoint)
        self.out = open_storage(spec["out_url"], endpoint_url=endpoint)

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: dict) -> dict:

        start, name = time.perf_counter(), job["name"]
        keys, skipped, empty = [], [], 0

        def lost(shard):
            def note(e):
                skipped.append({"key": f"{shard}:*", "reason": f"shard: {reason(e)}"})
                broken.append(shard)

            return note

        broken: list[str] = []

        cams = {
            meta["key"]: (meta, maps)
            for meta, maps in _until_error(
                iter_cam_shard(self.cams, job["cams"]), lost(job["cams"])
            )
        }
        images = iter_shard(
            self.source.describe(job["source"]), getattr(self.source, "endpoint_url", None)
        )
        with self.out.staged(name) as staged:
            writer = ShardWriter(staged.path)
            for raw in _until_error(images, lost(job["source"])):
                key = raw.get("__key__", "?")
                if key not in cams:
                    continue  # the CAM stage left this image out (and listed it)
                meta, maps = cams.pop(key)
                try:
                    label = self.label(make_sample(raw, meta, maps, self.mode.needs_saliency))
                except SkipSample as e:
                    skipped.append({"key": key, "reason": str(e)})
                    continue
                info = {"key": key, "labels": meta["labels"], "size": list(label.shape)}
                writer.write(
                    {
                        "__key__": key,
                        LABEL_MEMBER: encode_label(label),
                        "json": json.dumps(info).encode(),
                    }
                )
                keys.append(key)
                empty += is_empty(label)
            index = writer.close().encode()
            if not keys:
                staged.discard()
        missing = (
            f"{job['source']} could not be read to its end"
            if job["source"] in broken
            else f"no image with this key in {job['source']}"
        )
        skipped += [{"key": k, "reason": missing} for k in cams]
        record = {
            "name": name,
            "index": job["index"],
            "source": job["source"],
            "cams": job["cams"],
            "fingerprint": job["fingerprint"],
            "samples": len(keys),
            "keys": keys,
            "skipped": skipped,
            "empty": empty,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if keys:
            idx_name = name.replace(".tar", ".idx")
            self.out.write_bytes(idx_name, index)
            record.update(index_name=idx_name, bytes=writer.bytes, sha256=writer.sha256)
        write_part(self.out, record)
        return record


# ---------------------------------------------------------------------------------- the driver
def resolve_affinity_checkpoint(cfg: ExperimentConfig, checkpoint: str | None) -> tuple[dict, str]:
    """(AffinityNet state dict, where), checked against the configured AffinityNet: the given
    URL, ``masks.checkpoint``, or the newest ``checkpoint_*`` of the affinity run."""

    url = checkpoint or cfg.masks.checkpoint
    if url is None:
        run = open_storage(affinity_run_url(cfg), endpoint_url=endpoint_url(cfg))
        newest = ckpt.newest_checkpoint(run)
        if newest is None:
            raise StageError(
                f"no AffinityNet checkpoint under {run.describe()}: train AffinityNet with this "
                f"config first, or name one with --checkpoint / masks.checkpoint"
            )
        url = run.describe(newest)
    state, where = ckpt.load_from(absolute_url(url), endpoint_url=endpoint_url(cfg))
    if not isinstance(state, dict) or "model" not in state:
        raise StageError(f"{where} is not an AffinityNet checkpoint (it has no 'model' entry)")
    try:
        ckpt.load_model_state(build_affinity_net(cfg), state["model"], where=f"checkpoint {where}")
    except ckpt.CheckpointError as e:
        net = {
            "backbone": cfg.affinity.backbone or cfg.model.backbone,
            "head_width": cfg.affinity.head_width,
        }
        raise StageError(f"{e} (affinity net: {net})") from None
    return state["model"], where


def _resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose local paths are absolute (the actors run in another working directory)."""

    cfg = absolute_paths(cfg)
    for section, names in (
        (cfg.cams, ("split_url", "out_url")),
        (cfg.affinity, ("cams_url", "out_url")),
        (cfg.masks, ("cams_url", "out_url", "checkpoint")),
    ):
        for n in names:
            setattr(section, n, absolute_url(getattr(section, n)))
    return cfg


def make_labels(cfg: ExperimentConfig, log=print) -> dict:
    """AffinityNet's confident labels of every CAM of ``affinity.cams_url`` into
    ``<affinity.out_url>/labels``; returns the manifest. Resumable and idempotent."""
    cfg = _resolved(cfg)
    a = cfg.affinity
    actors = {
        "num_actors": a.num_actors,
        "use_gpu": False,
        "cpus_per_actor": a.cpus_per_actor,
        "threads": a.cpus_per_actor,
        "max_failures": a.max_failures,
    }
    return _label_stage(cfg, "confident", a.cams_url, labels_url(cfg), actors, None, log)


def make_masks(cfg: ExperimentConfig, checkpoint: str | None = None, log=print) -> dict:
    """Pseudo masks (mode ``masks.mode``) of every CAM of ``masks.cams_url`` into
    ``masks.out_url``; returns the manifest. Resumable and idempotent."""
    cfg = _resolved(cfg)
    m = cfg.masks
    actors = {
        "num_actors": m.num_actors,
        "use_gpu": m.use_gpu,
        "cpus_per_actor": m.cpus_per_actor,
        "threads": m.torch_threads,
        "max_failures": m.max_failures,
    }
    return _label_stage(cfg, m.mode, m.cams_url, m.out_url, actors, absolute_url(checkpoint), log)


def _label_stage(cfg, mode, cams_url, out_url, actors, checkpoint, log) -> dict:

    what = "labels" if mode == "confident" else "masks"
    timer, endpoint = Timer(), endpoint_url(cfg)
    cam_manifest, _ = read_cam_manifest(cams_url, endpoint)
    source_url = cam_manifest["source"]["url"]
    source_manifest, _ = open_manifest(source_url, endpoint)
    position = {s["name"]: i for i, s in enumerate(source_manifest["shards"])}
    by_source = {s["name"]: s for s in source_manifest["shards"]}
    gone = [s["source"] for s in cam_manifest["shards"] if s["source"] not in position]
    if gone:
        raise StageError(
            f"{cams_url} was made from shards that {source_url} no longer has: "
            f"{', '.join(gone[:5])}; recompute the CAMs"
        )
    state = where = None
    if MODES[mode].needs_model:
        state, where = resolve_affinity_checkpoint(cfg, checkpoint)
    out = open_storage(out_url, endpoint_url=endpoint)
    out.check_writable()
    settings = {"mode": mode, **MODES[mode].settings(cfg)}
    model_id = None
    if state is not None:
        model_id = fingerprint(
            where, {k: list(v.shape) + [float(v.float().sum())] for k, v in state.items()}
        )
    base_fp = fingerprint(FORMAT, settings, model_id, cam_manifest.get("fingerprint"))
    planned = []
    for shard in cam_manifest["shards"]:
        i = position[shard["source"]]
        job_fp = fingerprint(base_fp, shard.get("sha256"), by_source[shard["source"]]["sha256"])
        planned.append(
            {
                "name": label_shard_name(i),
                "index": i,
                "source": shard["source"],
                "cams": shard["name"],
                "samples": shard["samples"],
                "fingerprint": job_fp,
            }
        )
    stage_fp = fingerprint(base_fp, [job["fingerprint"] for job in planned])
    done = stage_complete(out, stage_fp)
    if done is not None:
        log(f"{what}: {out.describe()} is complete ({done['samples']} labels); nothing to do")
        return done
    clean_temporaries(out)  # left by a killed earlier run
    parts = existing_parts(out)
    kept = {
        j["name"]: parts[j["name"]]
        for j in planned
        if parts.get(j["name"], {}).get("fingerprint") == j["fingerprint"]
    }
    jobs = [j for j in planned if j["name"] not in kept]
    total = cam_manifest["samples"]
    log(
        f"{what}: {mode} labels of {total} images in {len(cam_manifest['shards'])} shards "
        f"from {cams_url}"
        + (f", checkpoint {where}" if where else "")
        + (f"; {len(kept)} shards already done" if kept else "")
    )

    records = list(kept.values())
    if jobs:
        spec = {
            "mode": mode,
            "cams_url": cams_url,
            "source_url": source_url,
            "out_url": out_url,
            "use_gpu": actors["use_gpu"],
            "threads": actors["threads"],
        }
        todo = sum(j["samples"] for j in jobs)
        records += _run_actors(cfg, jobs, spec, actors, state, todo, what, log, tqdm)
        clean_temporaries(out)  # left by actors that died mid-shard
    manifest = assemble_manifest(
        records,
        kind=MODES[mode].kind,
        mode=mode,
        fingerprint=stage_fp,
        classes=cam_manifest["classes"],
        source={"url": source_url, "samples": source_manifest["num_samples"]},
        cams_url=cams_url,
        settings=settings,
        seconds=timer(),
    )
    if where:
        manifest["checkpoint"] = where
    write_manifest(out, manifest)
    log(
        f"{what}: {manifest['samples']} labels in {len(manifest['shards'])} shards at "
        f"{out.describe()} ({manifest['skipped_count']} skipped, {manifest['empty']} all "
        f"255) in {timer():.1f} s"
    )
    return manifest


def _run_actors(cfg, jobs, spec, actors, state, todo, what, log, tqdm) -> list[dict]:

    with ray_session():
        n = plan_actors(
            actors["num_actors"], actors["use_gpu"], actors["cpus_per_actor"], len(jobs)
        )
        experiment = json.loads(cfg.model_dump_json())
        state_ref = ray.put(state) if state is not None else None
        opts = actor_options(actors["use_gpu"], actors["cpus_per_actor"])
        remote = ray.remote(LabelActor).options(**opts)
        log(f"{what}: {len(jobs)} shards to label on {n} actors")
        with tqdm(total=todo, desc=what, unit="img", disable=None) as bar:
            return run_sharded(
                jobs,
                lambda: remote.remote(experiment, spec, state_ref),
                n,
                max_failures=actors["max_failures"],
                log=log,
                what="shard",
                progress=lambda r: bar.update(r["samples"] + len(r["skipped"])),
            )
