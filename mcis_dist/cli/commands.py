"""The ``mcis`` command handlers: each takes the parsed arguments, calls the library and returns
the exit status. ``HANDLERS`` maps (command, action) to its handler.

Each handler imports the stage module it runs inside the function (``# lazy: per command``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from tqdm.auto import tqdm

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """An error whose message is the whole story: printed without a traceback."""


def _synthetic_spec(args):

    from mcis_dist.shards.synthetic import SyntheticSpec  # lazy: per command

    spec = SyntheticSpec()
    changes = {
        k: v
        for k, v in {
            "num_train": args.num_train,
            "num_val": args.num_val,
            "num_classes": args.num_classes,
            "seed": args.synthetic_seed,
        }.items()
        if v is not None
    }
    return replace(spec, **changes)


def cmd_shards_build(args) -> int:
    from mcis_dist.formats.shards import summarize  # lazy: per command
    from mcis_dist.shards.build import BuildOptions, build_dataset  # lazy: per command
    from mcis_dist.shards.images import DEFAULT_MAX_PIXELS  # lazy: per command
    from mcis_dist.storage import open_storage  # lazy: per command

    opts = BuildOptions(
        shard_size_mb=args.shard_size,
        max_samples_per_shard=args.max_samples_per_shard,
        workers=args.workers,
        seed=args.seed,
        verify=args.verify,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    source_args = {
        "list_file": args.list_file,
        "image_root": args.image_root,
        "mask_root": args.mask_root,
        "classes": args.classes,
        "voc_root": args.voc_root,
        "seg_aug": args.seg_aug,
        "saliency": args.saliency,
        "labels_from": args.labels_from,
        "folder_root": args.folder_root,
        "domain": args.domain,
        "boxes": args.boxes,
        "box_coords": args.box_coords,
    }
    if args.source == "synthetic":
        source_args["spec"] = _synthetic_spec(args)
    out = open_storage(args.out, endpoint_url=args.endpoint_url)
    manifests = build_dataset(args.source, out, opts, args.split, source_args)
    for split, manifest in manifests.items():
        print(summarize(manifest, out.child(split).describe()))
    return EXIT_OK


def _split_storages(url: str, endpoint_url: str | None):
    """(name, storage) for a split folder, or for every split under a dataset folder."""
    from mcis_dist.formats.shards import MANIFEST_NAME, PARTS_DIR, find_splits  # lazy: per command
    from mcis_dist.storage import open_storage  # lazy: per command

    root = open_storage(url, endpoint_url=endpoint_url)
    root.check_readable()
    if root.exists(MANIFEST_NAME) or root.list(PARTS_DIR):
        return [(root.describe(), root)]
    splits = find_splits(root)
    if not splits:
        raise UserError(f"{root.describe()}: no shards here (no manifest.json, no split folders)")
    return [(root.child(s).describe(), root.child(s)) for s in splits]


def cmd_shards_info(args) -> int:
    from mcis_dist.formats.shards import (  # lazy: per command
        ManifestError,
        read_manifest,
        summarize,
    )

    status = EXIT_OK
    for where, storage in _split_storages(args.url, args.endpoint_url):
        try:
            manifest = read_manifest(storage)
        except ManifestError as e:
            print(f"{where}: {e}")
            status = EXIT_FAILED
            continue
        print(json.dumps(manifest, indent=1) if args.json else summarize(manifest, where))
    return status


def cmd_shards_verify(args) -> int:

    from mcis_dist.formats.shards import read_manifest, verify_split  # lazy: per command

    status = EXIT_OK
    for where, storage in _split_storages(args.url, args.endpoint_url):
        manifest = read_manifest(storage)
        with tqdm(
            total=manifest["num_samples"],
            desc=f"verify {manifest['split']}",
            unit="img",
            mininterval=0.5,
        ) as bar:
            problems = verify_split(storage, manifest, progress=bar.update)
        if problems:
            status = EXIT_FAILED
            print(f"{where}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
        else:
            print(
                f"{where}: OK, {manifest['num_shards']} shards, {manifest['num_samples']:,} "
                "samples, hashes and counts match"
            )
    return status


def cmd_weights_convert(args) -> int:
    from mcis_dist.models.weights import convert_resnet38  # lazy: per command

    summary = convert_resnet38(args.src, args.dst)
    print(
        f"{summary['destination']}: {summary['tensors']} tensors, "
        f"{summary['parameters']:,} parameters from {summary['source']}"
    )
    if summary.get("dropped"):
        print(f"  dropped (classifier): {', '.join(summary['dropped'])}")
    return EXIT_OK


def _print_trained(stage: str, result) -> None:
    """One line on a finished Ray Train run: its last epoch, step and loss, and checkpoint."""
    m = result.metrics or {}
    print(
        f"{stage}: done, epoch {m.get('epoch')} step {m.get('step')}, loss {m.get('total')}; "
        f"checkpoint {result.checkpoint.path if result.checkpoint else None}"
    )


def cmd_train_cls(args) -> int:
    from mcis_dist.config import load_config, write_run_config  # lazy: per command
    from mcis_dist.runtime.paths import endpoint_url  # lazy: per command
    from mcis_dist.storage import open_storage  # lazy: per command
    from mcis_dist.train.classifier import run_url, train_classifier  # lazy: per command

    cfg = load_config(args.config, args.overrides)
    run = open_storage(run_url(cfg), endpoint_url=endpoint_url(cfg))
    run.check_writable()
    write_run_config(cfg, run)
    result = train_classifier(cfg)
    _print_trained("train-cls", result)
    return EXIT_OK


def cmd_cams(args) -> int:
    from mcis_dist.cams.stage import compute_cams  # lazy: per command
    from mcis_dist.config import load_config  # lazy: per command

    compute_cams(load_config(args.config, args.overrides), checkpoint=args.checkpoint)
    return EXIT_OK


def cmd_affinity(args) -> int:
    from mcis_dist.affinity.train import train_affinity  # lazy: per command
    from mcis_dist.config import load_config  # lazy: per command

    result = train_affinity(load_config(args.config, args.overrides))
    _print_trained("affinity", result)
    return EXIT_OK


def cmd_masks(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.masks.stage import make_masks  # lazy: per command

    make_masks(load_config(args.config, args.overrides), checkpoint=args.checkpoint)
    return EXIT_OK


def cmd_eval_masks(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.masks.evaluate import evaluate_masks  # lazy: per command

    evaluate_masks(load_config(args.config, args.overrides), masks_url=args.masks, out_url=args.out)
    return EXIT_OK


def cmd_seg(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.seg.train import train_seg  # lazy: per command

    result = train_seg(load_config(args.config, args.overrides))
    _print_trained("seg", result)
    return EXIT_OK


def cmd_eval_seg(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.seg.evaluate import evaluate_seg  # lazy: per command

    evaluate_seg(
        load_config(args.config, args.overrides),
        checkpoint=args.checkpoint,
        split_url=args.split,
        out_url=args.out,
    )
    return EXIT_OK


def cmd_predict(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.seg.predict import predict  # lazy: per command

    predict(
        load_config(args.config, args.overrides), args.input, args.out, checkpoint=args.checkpoint
    )
    return EXIT_OK


def cmd_eval_cams(args) -> int:
    from mcis_dist.cams.evaluate import evaluate_cams  # lazy: per command
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.evaluation import parse_thresholds  # lazy: per command

    cfg = load_config(args.config, args.overrides)
    try:
        thresholds = parse_thresholds(args.thresholds) if args.thresholds else None
    except ValueError as e:
        raise UserError(f"--thresholds: {e}") from None
    evaluate_cams(cfg, cams_url=args.cams, thresholds=thresholds, out_url=args.out)
    return EXIT_OK


def cmd_eval_compare(args) -> int:
    from mcis_dist.cams.evaluate import compare_cams  # lazy: per command
    from mcis_dist.config import load_config  # lazy: per command

    if len(args.a) != len(args.b):
        raise UserError(f"--a given {len(args.a)} times but --b {len(args.b)}: one pair per seed")
    if args.boot < 100:
        raise UserError(f"--boot {args.boot}: use at least 100 resamples")
    cfg = load_config(args.config, args.overrides)
    try:
        compare_cams(cfg, args.a, args.b, n_boot=args.boot, out_url=args.out)
    except ValueError as e:
        raise UserError(f"eval compare: {e}") from None
    return EXIT_OK


def cmd_export(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.seg.export import export_trained  # lazy: per command

    try:
        export_trained(
            load_config(args.config, args.overrides),
            args.out,
            checkpoint=args.checkpoint,
            size=args.size,
        )
    except ValueError as e:  # an export whose output differs from the model's
        raise UserError(str(e)) from None
    return EXIT_OK


def cmd_pipeline(args) -> int:
    from mcis_dist.config import load_config  # lazy: per command
    from mcis_dist.pipeline import run_pipeline  # lazy: per command
    from mcis_dist.report import summary_table  # lazy: per command

    report = run_pipeline(load_config(args.config, args.overrides))
    for what, value in summary_table(report):
        print(f"  {what:<40} {value:>6}")
    return EXIT_OK


def cmd_tune(args) -> int:
    from mcis_dist.tune import load_sweep, run_sweep  # lazy: per command

    sweep, base = load_sweep(args.config, args.overrides)
    result = run_sweep(sweep, base, restart=args.restart, retry_failed=args.retry_failed)
    if result.best is None:
        print(
            f"mcis: no trial of the sweep has a result; see {result.url}/results.md",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def cmd_demo(args) -> int:
    from mcis_dist.demo import run_demo  # lazy: per command

    return run_demo(args.config, args.overrides)


# (command, action) -> handler; the action is the sub-command of shards, weights and eval.
HANDLERS = {
    ("shards", "build"): cmd_shards_build,
    ("shards", "info"): cmd_shards_info,
    ("shards", "verify"): cmd_shards_verify,
    ("weights", "convert-resnet38"): cmd_weights_convert,
    ("train-cls", None): cmd_train_cls,
    ("cams", None): cmd_cams,
    ("affinity", None): cmd_affinity,
    ("eval", "cams"): cmd_eval_cams,
    ("eval", "compare"): cmd_eval_compare,
    ("masks", None): cmd_masks,
    ("eval", "masks"): cmd_eval_masks,
    ("seg", None): cmd_seg,
    ("pipeline", None): cmd_pipeline,
    ("export", None): cmd_export,
    ("eval", "seg"): cmd_eval_seg,
    ("predict", None): cmd_predict,
    ("demo", None): cmd_demo,
    ("tune", None): cmd_tune,
}
