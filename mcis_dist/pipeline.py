"""``mcis pipeline``: shards → classifier → CAMs → AffinityNet → pseudo masks → DeepLab → eval.

The shards are built first when missing: the built-in dataset from ``synthetic.*``, another
source from the per-split options in ``shards.splits`` (those of ``mcis shards build``).

Every stage is skipped when its output is complete (a trained stage whose newest checkpoint
reached its last epoch, a sharded stage whose manifest was written with the same settings, an
evaluation already run on those outputs), so a pipeline killed anywhere and started again goes on
where it stopped. One Ray serves every stage: the cluster in ``RAY_ADDRESS`` (``ray job
submit``) or an embedded local one. The run report (``report.json``, ``report.md`` and figures)
goes to ``<run_root>/<name>/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from mcis_dist.affinity.train import train_affinity
from mcis_dist.cams.evaluate import evaluate_cams
from mcis_dist.cams.stage import compute_cams
from mcis_dist.config import ExperimentConfig, write_run_config
from mcis_dist.data.loader import open_manifest
from mcis_dist.formats.shards import MANIFEST_NAME
from mcis_dist.masks.evaluate import evaluate_masks
from mcis_dist.masks.stage import make_masks
from mcis_dist.report import write_report
from mcis_dist.runtime.checkpoint import newest_checkpoint
from mcis_dist.runtime.paths import absolute_paths, affinity_run_url, endpoint_url
from mcis_dist.runtime.session import ray_session
from mcis_dist.runtime.sharded import StageError
from mcis_dist.seg.evaluate import evaluate_seg
from mcis_dist.seg.train import run_url as seg_run_url
from mcis_dist.seg.train import train_seg
from mcis_dist.shards.build import build_dataset, build_options
from mcis_dist.shards.synthetic import synthetic_spec
from mcis_dist.storage import open_storage
from mcis_dist.train.classifier import run_url as cls_run_url
from mcis_dist.train.classifier import train_classifier

__all__ = ["run_pipeline", "training_complete", "check_consistency", "build_shards", "STAGE_ORDER"]

STAGE_ORDER = ("shards", "train-cls", "cams", "affinity", "masks", "seg", "eval")
STATE_FILE = "pipeline_state.json"


def training_complete(run_url: str, epochs: int, endpoint_url: str | None = None) -> bool:
    """True when a Ray Train run's newest checkpoint reached ``epochs`` (read from Ray's
    checkpoint snapshot, so no checkpoint is downloaded)."""
    storage = open_storage(run_url, endpoint_url=endpoint_url)
    if not storage.exists("checkpoint_manager_snapshot.json"):
        return False
    try:
        snap = json.loads(storage.read_bytes("checkpoint_manager_snapshot.json"))
        results = snap.get("checkpoint_results") or []
        return bool(results) and results[-1]["metrics"].get("epoch", 0) >= epochs
    except (ValueError, KeyError, TypeError):
        return False


def check_consistency(cfg: ExperimentConfig) -> None:
    """Stages that disagree fail before any work, naming the disagreement."""

    problems = []
    train_url, val_url = cfg.data.train_url, cfg.seg.val_url
    if cfg.cams.split_url != train_url:
        problems.append(
            f"cams.split_url ({cfg.cams.split_url}) is not the classifier's training "
            f"split data.train_url ({train_url}): pseudo masks are for training images"
        )
    for name, url in (
        ("affinity.cams_url", cfg.affinity.cams_url),
        ("masks.cams_url", cfg.masks.cams_url),
    ):
        if url != cfg.cams.out_url:
            problems.append(f"{name} ({url}) is not cams.out_url ({cfg.cams.out_url})")
    if cfg.seg.masks_url != cfg.masks.out_url:
        problems.append(
            f"seg.masks_url ({cfg.seg.masks_url}) is not masks.out_url ({cfg.masks.out_url})"
        )
    try:
        train, _ = open_manifest(train_url, cfg.data.endpoint_url, check_shards=False)
        val, _ = open_manifest(val_url, cfg.data.endpoint_url, check_shards=False)
    except Exception:  # noqa: BLE001 - missing splits are reported by the stages themselves
        train = val = None
    if train and val and train["classes"] != val["classes"]:
        problems.append(
            f"the training split's classes {train['classes']} differ from the "
            f"evaluation split's {val['classes']} (seg.val_url={val_url})"
        )
    if problems:
        raise StageError("the pipeline's stages disagree: " + "; ".join(problems))


class _State:
    """What finished, with its results, in ``<run>/pipeline_state.json`` (evaluations only)."""

    def __init__(self, run):
        self.run = run
        self.data = json.loads(run.read_bytes(STATE_FILE)) if run.exists(STATE_FILE) else {}

    def cached(self, name: str, key: str, compute: Callable[[], dict]) -> dict:
        entry = self.data.get(name)
        if entry and entry.get("key") == key:
            return entry["result"]
        result = compute()
        self.data[name] = {"key": key, "result": result}
        self.save()
        return result

    def save(self) -> None:
        self.run.write_bytes(STATE_FILE, json.dumps(self.data, indent=1).encode())


def run_pipeline(cfg: ExperimentConfig, log=print, say=None) -> dict:
    """Run every stage that is not complete; return (and write) the run report.

    ``log`` gets the stages' own lines, ``say`` (default ``log``) the pipeline's narration."""

    say = say or log
    cfg = absolute_paths(cfg)
    endpoint = endpoint_url(cfg)
    run = open_storage(f"{cfg.run_root.rstrip('/')}/{cfg.name}", endpoint_url=endpoint)
    run.check_writable()
    write_run_config(cfg, run)
    seconds: dict[str, float] = {}
    results: dict = {}
    state = _State(run)

    def step(name: str, what: str, fn: Callable[[], object]):
        say(f"\n[{name}] {what}")
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t0, 1)
        return out

    step("shards", "the dataset's WebDataset shards", lambda: build_shards(cfg, say))
    _check_inputs(cfg)
    check_consistency(cfg)
    t0 = time.perf_counter()
    with ray_session():
        ray_start = round(time.perf_counter() - t0, 1)
        _stages(cfg, step, state, results, log, say, endpoint)
    report = _report(cfg, results, seconds)
    report["ray_start_seconds"] = ray_start  # connecting to (or starting) Ray, once

    write_report(run, cfg, report, endpoint)
    say(f"\nreport: {run.describe('report.md')}")
    return report


def build_shards(cfg: ExperimentConfig, say=print) -> None:
    """Build what is missing of the shards: the built-in dataset's splits, or the splits that
    ``shards.splits`` describes for another source. Complete splits are left alone."""

    shards = open_storage(cfg.shards.url, endpoint_url=cfg.shards.endpoint_url)
    wanted = ["train", "val"] if cfg.shards.source == "synthetic" else list(cfg.shards.splits)
    needed = {"train", "val"} if cfg.shards.source == "synthetic" else set()
    missing = [s for s in wanted if not shards.child(s).exists(MANIFEST_NAME)]
    if not missing:
        say(f"  {cfg.shards.url}: complete")
        return

    if needed:
        build_dataset(
            "synthetic",
            shards,
            build_options(cfg),
            missing,
            source_args={"spec": synthetic_spec(cfg)},
        )
        return
    for split in missing:
        say(f"  building {cfg.shards.url}/{split} from the {cfg.shards.source} source")
        build_dataset(
            cfg.shards.source,
            shards,
            build_options(cfg),
            [split],
            source_args=dict(cfg.shards.splits[split]),
        )


def _check_inputs(cfg: ExperimentConfig) -> None:
    """The splits the stages read exist: otherwise say how to make them."""

    for what, url in (("data.train_url", cfg.data.train_url), ("seg.val_url", cfg.seg.val_url)):
        if not open_storage(url, endpoint_url=cfg.data.endpoint_url).exists(MANIFEST_NAME):
            raise StageError(
                f"{what}={url} has no manifest.json: build it first with `mcis shards build "
                f"--source {cfg.shards.source} --out {cfg.shards.url} ...`, or describe the source's "
                f"splits in shards.splits so that the pipeline builds them"
            )


def _stages(cfg, step, state, results, log, say, endpoint) -> None:

    inputs: dict[str, str] = {}  # fingerprints of the sharded outputs the trained stages read

    def train(name, what, run_url, epochs, fn, trained_on: str | None = None):
        """``trained_on``: the input the stage trains on (``inputs`` key); a complete run made
        from another version of it is refused, never silently reused."""
        seen = state.data.setdefault("trained_on", {})

        def go():
            now = inputs.get(trained_on) if trained_on else None
            if training_complete(run_url, epochs, endpoint):
                before = seen.get(run_url)
                if now is not None and before is not None and before != now:
                    raise StageError(
                        f"{run_url} was trained on {trained_on} {before[:12]}, but "
                        f"{trained_on} are now {now[:12]} (their settings or inputs changed): "
                        f"delete {run_url} to retrain it, or give the experiment another name="
                    )
                say(f"  complete ({epochs} epochs): {run_url}")
            else:
                fn()
            if now is not None and seen.get(run_url) != now:
                seen[run_url] = now
                state.save()

        step(name, what, go)

    t = cfg.train
    if cfg.pipeline.basic_baseline:
        basic = _basic(cfg)
        train(
            "train-cls",
            f"the basic classifier (Eq. 1 only), {t.epochs} epochs, baseline",
            cls_run_url(basic),
            t.epochs,
            lambda: train_classifier(basic, log=log),
        )
    train(
        "train-cls",
        f"the co-attention classifier ({cfg.model.backbone}), {t.num_workers} "
        f"Ray Train workers, {t.epochs} epochs",
        cls_run_url(cfg),
        t.epochs,
        lambda: train_classifier(cfg, log=log),
    )

    def cams_of(c, label):
        manifest = compute_cams(c, log=log)
        if c is cfg:
            inputs["CAMs"] = manifest["fingerprint"]
        r = state.cached(
            f"eval_cams_{label}", manifest["fingerprint"], lambda: _slim(evaluate_cams(c, log=log))
        )
        say(
            f"  {label}: CAM mIoU {100 * r['miou_heldout']:.1f} at held-out thresholds, "
            f"{100 * r['at_threshold']['miou']:.1f} at the fixed cams.bg_threshold="
            f"{r['threshold']:.2f} (oracle: {100 * r['best']['miou']:.1f} at "
            f"{r['best_threshold']:.2f}, chosen on these masks)"
        )
        return r

    c = cfg.cams
    results["cams"] = step(
        "cams",
        f"{c.mode} localization maps of the training images, scales {c.scales}"
        f"{' x flip' if c.flip else ''}, Ray actors",
        lambda: cams_of(cfg, c.mode),
    )
    other = "single" if c.mode != "single" else "coattentive"
    other_cfg = cfg.model_copy(deep=True)
    other_cfg.cams.mode, other_cfg.cams.out_url = other, f"{c.out_url.rstrip('/')}_{other}"
    results[f"cams_{other}"] = step(
        "cams", f"{other} maps too, for the report", lambda: cams_of(other_cfg, other)
    )
    if cfg.pipeline.basic_baseline:
        basic = _basic(cfg)
        basic.cams.mode, basic.cams.out_url = "single", f"{c.out_url.rstrip('/')}_basic"
        results["cams_basic"] = step(
            "cams", "the basic classifier's maps (baseline)", lambda: cams_of(basic, "basic")
        )

    a = cfg.affinity
    train(
        "affinity",
        f"confident labels, then AffinityNet: {a.train.num_workers} workers, "
        f"{a.train.epochs} epochs",
        affinity_run_url(cfg),
        a.train.epochs,
        lambda: train_affinity(cfg, log=log),
        trained_on="CAMs",
    )

    def masks():
        manifest = make_masks(cfg, log=log)
        inputs["pseudo masks"] = manifest["fingerprint"]
        r = state.cached(
            "eval_masks", manifest["fingerprint"], lambda: _slim(evaluate_masks(cfg, log=log))
        )
        say(f"  pseudo-mask mIoU {100 * r['miou']:.1f} ({cfg.masks.mode})")
        return r

    results["masks"] = step("masks", f"{cfg.masks.mode} pseudo masks, Ray actors", masks)
    s = cfg.seg
    train(
        "seg",
        f"{s.arch} ({s.backbone}) on the pseudo masks: {s.train.num_workers} workers, "
        f"{s.train.epochs} epochs",
        seg_run_url(cfg),
        s.train.epochs,
        lambda: train_seg(cfg, log=log),
        trained_on="pseudo masks",
    )

    def seg_eval():

        newest = newest_checkpoint(open_storage(seg_run_url(cfg), endpoint_url=endpoint))
        key = json.dumps([newest, s.eval_scales, s.eval_flip, s.crf])
        r = state.cached("eval_seg", key, lambda: _slim(evaluate_seg(cfg, log=log)))
        say(f"  segmentation mIoU {100 * r['miou']:.1f} on {s.val_url}")
        return r

    results["seg"] = step("eval", "the segmentation network on the validation masks", seg_eval)


def _basic(cfg: ExperimentConfig) -> ExperimentConfig:
    basic = cfg.model_copy(deep=True)
    basic.name = f"{cfg.name}_basic"
    basic.train.loss_coattention = basic.train.loss_contrastive = 0.0
    return basic


def _slim(result: dict) -> dict:
    """An evaluation's result without its confusion matrices (kept in its own eval.json)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if kk != "matrix"}
        if k != "matrix":
            out[k] = v
    return out


def _report(cfg: ExperimentConfig, results: dict, seconds: dict) -> dict:
    cams = {results["cams"].get("mode", cfg.cams.mode): results["cams"]}
    for k in ("cams_single", "cams_coattentive", "cams_authors"):
        if k in results:
            cams[k.split("_", 1)[1]] = results[k]
    coatt = cams.get("coattentive", cams.get("authors"))
    report = {
        "cam_miou_single_heldout": cams["single"]["miou_heldout"],
        "cam_miou_coattentive_heldout": coatt["miou_heldout"],
        "cam_miou_single": cams["single"]["at_threshold"]["miou"],
        "cam_miou_coattentive": coatt["at_threshold"]["miou"],
        "cam_heldout_thresholds": {m: r["heldout"]["thresholds"] for m, r in cams.items()},
        "cam_best_threshold": {m: r["best_threshold"] for m, r in cams.items()},
        "cam_best_miou": {m: r["best"]["miou"] for m, r in cams.items()},
        "pseudo_miou": results["masks"]["miou"],
        "pseudo_miou_by_half": {h: v["miou"] for h, v in results["masks"]["by_half"].items()},
        "seg_miou": results["seg"]["miou"],
        "per_class": {
            "cams": cams[cfg.cams.mode]["at_threshold"]["per_class"],
            "pseudo": results["masks"]["per_class"],
            "seg": results["seg"]["per_class"],
        },
        "attention": cams[cfg.cams.mode].get("attention"),  # the classifier's diagnostics
        "stage_seconds": seconds,
        "config": json.loads(cfg.model_dump_json()),
    }
    if "cams_basic" in results:
        report["cam_miou_basic"] = results["cams_basic"]["at_threshold"]["miou"]
        report["cam_miou_basic_heldout"] = results["cams_basic"]["miou_heldout"]
    return report
