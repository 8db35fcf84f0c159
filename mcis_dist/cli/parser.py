"""The ``mcis`` argument parser: every command, its options and their help text.

Only argparse and the package version are imported here, so ``mcis --help`` stays fast; what a
command runs is in :mod:`mcis_dist.cli.commands`.
"""

from __future__ import annotations

import argparse

from mcis_dist import __version__

__all__ = ["build_parser"]


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL[_S3] or AWS); credentials come "
        "from the standard AWS environment variables or profile, never from flags",
    )


def _config_command(
    sub, name: str, *, config_help: str = "experiment YAML", **kwargs
) -> argparse.ArgumentParser:
    """A sub-command that reads a config (``--config``) and ``a.b=c`` overrides; callers add the
    rest (argparse lists options and positionals separately, so the order of adding does not
    show in the help)."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("overrides", nargs="*", help="config overrides, a.b=c")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcis",
        description="mcis-dist: Mining Cross-Image Semantics for weakly supervised semantic "
        "segmentation, distributed.",
    )
    parser.add_argument("--version", action="version", version=f"mcis-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shards = sub.add_parser("shards", help="build, inspect and verify WebDataset shards")
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    b = ssub.add_parser(
        "build",
        help="build shards from a source",
        description="Build WebDataset shards (+ DALI .idx files and manifest.json) from a "
        "source, to a local folder or s3://bucket/prefix. Each split goes to OUT/<split>/. "
        "Re-running the same command finishes an interrupted build.",
    )
    b.add_argument("--source", required=True, choices=["list", "voc", "folder", "synthetic"])
    b.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    b.add_argument(
        "--split",
        action="append",
        default=None,
        help="split(s) to build (repeatable). Defaults: synthetic and voc: train, val; "
        "list and folder: train",
    )
    g = b.add_argument_group("list source (LID / ImageNet style)")
    g.add_argument(
        "--list",
        dest="list_file",
        help="text file: relative/path.jpg label [...] (optional with --boxes FILE: the box "
        "file then lists the images, labelled with their boxes' classes)",
    )
    g.add_argument("--image-root", help="folder the list's paths are relative to")
    g.add_argument("--mask-root", help="optional folder of <stem>.png masks")
    g.add_argument("--classes", help="class list file, one name per line (list, folder)")
    g = b.add_argument_group("voc source (PASCAL VOC2012 devkit)")
    g.add_argument("--voc-root", help="folder holding JPEGImages/, Annotations/, ImageSets/")
    g.add_argument("--seg-aug", help="SegmentationClassAug folder (optional)")
    g.add_argument("--saliency", help="folder of <id>.png saliency maps (optional)")
    g.add_argument("--labels-from", choices=["auto", "mask", "xml"], default="auto")
    g = b.add_argument_group("folder source (one sub-folder per class)")
    g.add_argument("--folder-root", help="folder of class sub-folders")
    g.add_argument(
        "--domain",
        choices=["target", "single", "web"],
        default=None,
        help="domain tag of every sample (default: target; folder: web)",
    )
    g = b.add_argument_group(
        "bounding boxes (list and folder sources)",
        "Boxes are stored per sample as <key>.boxes.json, [[class, x0, y0, x1, y1], ...] in "
        "half-open pixels (0 <= x0 < x1 <= width). A bad box line is listed as a rejection "
        "(file:line, what was expected) and its image kept with its other boxes. "
        "Tiny-ImageNet train: --source folder --folder-root tiny-imagenet-200/train "
        "--classes tiny-imagenet-200/wnids.txt --boxes per-class. "
        "Tiny-ImageNet val: --source list --split val --image-root tiny-imagenet-200/val/images "
        "--classes tiny-imagenet-200/wnids.txt --boxes tiny-imagenet-200/val/val_annotations.txt. "
        "Pass the same --classes to both, so that class indices agree.",
    )
    g.add_argument(
        "--boxes",
        default=None,
        metavar="FILE|per-class",
        help="a box file, one box per line, tab- or space-separated: 'file class x0 y0 x1 y1' "
        "(file relative to --image-root or --folder-root, class a name or 0-based index; "
        "Tiny-ImageNet's val_annotations.txt is one); or, for the folder source, 'per-class': "
        "each <class>/<class>_boxes.txt, lines 'file x0 y0 x1 y1' naming files in "
        "<class>/images/ or <class>/ (Tiny-ImageNet's train layout)",
    )
    g.add_argument(
        "--box-coords",
        choices=["inclusive", "half-open"],
        default="inclusive",
        help="how box files write x1, y1: inclusive (default; the last pixel inside the box, "
        "as Tiny-ImageNet does, 0..63 on its 64x64 images; stored as x1 + 1, y1 + 1) or "
        "half-open (one past it, stored as written)",
    )
    g = b.add_argument_group("synthetic source (the built-in dataset)")
    g.add_argument("--num-train", type=int, default=None)
    g.add_argument("--num-val", type=int, default=None)
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--synthetic-seed", type=int, default=None)
    g = b.add_argument_group("build options")
    g.add_argument("--shard-size", type=float, default=256.0, help="target MB per shard")
    g.add_argument("--max-samples-per-shard", type=int, default=0, help="0 = no limit")
    g.add_argument("--workers", type=int, default=0, help="processes (0 = one per core)")
    g.add_argument("--seed", type=int, default=0, help="shuffle seed for the shard cut")
    g.add_argument(
        "--verify",
        choices=["header", "full"],
        default="header",
        help="header: check headers and stream ends (fast); full: decode every image",
    )
    g.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")
    g.add_argument("--overwrite", action="store_true", help="replace a different build")
    g.add_argument("--no-progress", action="store_true")
    _add_storage_args(b)

    i = ssub.add_parser("info", help="print a shard set's manifest summary")
    i.add_argument("url", help="a split folder (OUT/train) or a dataset folder (OUT)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_storage_args(i)

    v = ssub.add_parser("verify", help="re-read every shard and check counts and hashes")
    v.add_argument("url", help="a split folder (OUT/train) or a dataset folder (OUT)")
    _add_storage_args(v)

    _config_command(
        sub,
        "train-cls",
        help="train the co-attention classifier on Ray Train",
        description="Train (or resume) the co-attention classifier with Ray Train: an embedded "
        "local Ray, or the cluster in RAY_ADDRESS / the one `ray job submit` runs in. Re-running "
        "the same command (same name and run_root) resumes from the newest checkpoint.",
    )

    m = _config_command(
        sub,
        "cams",
        help="localization maps of a split, sharded over Ray actors",
        description="Compute localization maps (single-round or co-attentive, multi-scale x "
        "flip) for every image of cams.split_url with the trained classifier, one CAM shard per "
        "input shard, on a pool of Ray actors. Re-running skips finished shards; a lost actor's "
        "shard is redone by another.",
    )
    m.add_argument(
        "--checkpoint",
        default=None,
        help="classifier checkpoint folder or .pt, local or s3:// (default: the "
        "newest of <run_root>/<name>/cls)",
    )

    _config_command(
        sub,
        "affinity",
        help="confident labels from the CAMs, then AffinityNet training on Ray Train",
        description="Turn the CAMs into confident labels (label shards in "
        "<affinity.out_url>/labels, on Ray actors, resumable), then train AffinityNet on them with "
        "Ray Train (checkpoints in <affinity.out_url>/run; re-running resumes).",
    )

    k = _config_command(
        sub,
        "masks",
        help="pseudo masks of a split from its CAMs, sharded over Ray actors",
        description="Turn the CAMs of masks.cams_url into pseudo masks (masks.mode: random_walk "
        "with the trained AffinityNet, saliency, or cams), one label shard per CAM shard, on a "
        "pool of Ray actors. Re-running skips finished shards; a lost actor's shard is redone by "
        "another.",
    )
    k.add_argument(
        "--checkpoint",
        default=None,
        help="AffinityNet checkpoint folder or .pt, local or s3:// (random_walk; "
        "default: masks.checkpoint, else the newest of <affinity.out_url>/run)",
    )

    g = _config_command(
        sub,
        "seg",
        help="train the segmentation network (DeepLab) on the pseudo masks with Ray Train",
        description="Train (or resume) DeepLab (seg.arch) on the images of the pseudo masks' "
        "split joined with the masks of seg.masks_url, with Ray Train (checkpoints in "
        "<seg.out_url>/run; re-running resumes).",
    )

    pr = _config_command(
        sub,
        "predict",
        help="label maps (palette PNGs) of a folder of images or an image split",
        description="Label every image of --input (a folder of .jpg/.png images, or an image "
        "split with manifest.json; local or s3://) with the trained segmentation network at "
        "seg.eval_scales x seg.eval_flip (+ CRF with seg.crf), on Ray actors: one palette PNG per "
        "image in --out, and predictions.json. Re-running skips images whose PNG exists.",
    )
    pr.add_argument(
        "--input", required=True, help="folder of images or image split, local or s3://"
    )
    pr.add_argument("--out", required=True, help="folder for the PNGs, local or s3://")
    pr.add_argument(
        "--checkpoint",
        default=None,
        help="segmentation checkpoint folder or .pt, local or s3:// (default: the "
        "newest of <seg.out_url>/run)",
    )

    ex = _config_command(
        sub,
        "export",
        help="the trained segmentation network as TorchScript and ONNX, checked against PyTorch",
        description="Write model.torchscript.pt, model.onnx (opset seg.export_opset, dynamic batch "
        "and size) and export.json (classes, normalisation) to --out; each export's output is "
        "compared with the PyTorch model on a sample batch and refused above tolerance.",
    )
    ex.add_argument("--out", required=True, help="local folder for the exported files")
    ex.add_argument("--checkpoint", default=None, help="segmentation checkpoint (default: newest)")
    ex.add_argument("--size", type=int, default=0, help="sample input side (default: crop size)")

    _config_command(
        sub,
        "pipeline",
        help="every stage, from shards to an evaluated segmentation network",
        description="Run train-cls -> cams -> affinity -> masks -> seg -> eval (building the "
        "built-in dataset's shards first when shards.source is synthetic). Every stage whose "
        "output is complete is skipped, so a killed pipeline started again goes on where it "
        "stopped. Writes report.json, report.md and figures to <run_root>/<name>/.",
    )

    tn = sub.add_parser(
        "tune",
        help="a Ray Tune sweep over a trained stage's settings (ASHA)",
        description="Sweep the settings of the classifier (stage cls) or of AffinityNet and the "
        "random walk (stage affinity) as a sweep file says (configs/tune/*.yaml): one Ray Train "
        "run per trial, scored on the validation split's masks after every epoch, weak trials "
        "stopped early by ASHA. Writes results.csv, results.md and best_config.yaml to the sweep "
        "folder. Running it again resumes the sweep (a finished one only rewrites its table).",
    )
    tn.add_argument("--config", required=True, help="sweep YAML (configs/tune/*.yaml)")
    tn.add_argument(
        "--restart", action="store_true", help="discard the sweep's trials and start it over"
    )
    tn.add_argument(
        "--retry-failed", action="store_true", help="when resuming, run the failed trials again"
    )
    tn.add_argument(
        "overrides",
        nargs="*",
        help="sweep keys (num_samples=4, scheduler.grace_period=2, space.KEY=...) or "
        "base-experiment keys (train.epochs=4, overrides.name=x), a.b=c",
    )

    e = sub.add_parser("eval", help="evaluate a stage's outputs against masks")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    ec = _config_command(
        esub,
        "cams",
        help="CAM mIoU with a background-threshold sweep, per-class IoU and an overlay grid; "
        "box localization on a split with boxes",
        description="CAM mIoU on the mapped split's masks at cams.bg_threshold, plus the sweep "
        "over cams.eval_thresholds (the sweep's best threshold looks at ground truth: reported, "
        "never used by a later stage). On a split with bounding boxes, also GT-known loc, "
        "MaxBoxAccV2, top-1 loc and top-1 cls (Choe et al., CVPR 2020) at held-out, fixed and "
        "oracle thresholds with 95% bootstrap intervals. Writes eval.json and overlays.png.",
    )
    ec.add_argument("--cams", default=None, help="CAM folder (default: cams.out_url)")
    ec.add_argument(
        "--thresholds",
        default=None,
        help="mIoU sweep, e.g. 0:0.6:0.05 or 0.1,0.2 (default: cams.eval_thresholds; boxes "
        "always sweep 0, 0.05, ..., 0.95 and cams.bg_threshold)",
    )
    ec.add_argument("--out", default=None, help="where eval.json goes (default: <cams>/eval)")

    cmp_ = _config_command(
        esub,
        "compare",
        help="paired difference of two CAM map sets of the same images, with a 95%% interval",
        description="Score map sets A and B (CAM folders of the same split; one of each per "
        "seed, --a and --b repeated in the same order) on the images both mapped, and give the "
        "mean over seeds of mIoU(A) - mIoU(B) (on a split with boxes: of MaxBoxAccV2 and "
        "GT-known loc) with a 95% bootstrap interval over images (and "
        "seeds), at held-out thresholds (each half of the images at the best threshold of the "
        "other half), at the fixed cams.bg_threshold, and at the oracle threshold.",
    )
    cmp_.add_argument("--a", action="append", required=True, help="CAM folder of map set A")
    cmp_.add_argument("--b", action="append", required=True, help="CAM folder of map set B")
    cmp_.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (2000)")
    cmp_.add_argument("--out", default=None, help="folder for compare.json (default: none)")

    em = _config_command(
        esub,
        "masks",
        help="pseudo-mask (or confident-label) mIoU, per-class IoU and an overlay grid",
        description="mIoU of a label folder against its split's masks: pixels the labels ignore "
        "(255) are left out (their share is reported), and also counted as background. Writes "
        "eval.json and overlays.png.",
    )
    em.add_argument("--masks", default=None, help="label folder (default: masks.out_url)")
    em.add_argument("--out", default=None, help="where eval.json goes (default: <masks>/eval)")

    es = _config_command(
        esub,
        "seg",
        help="segmentation mIoU on a split with masks, per-class IoU and an overlay grid",
        description="mIoU of the trained segmentation network on seg.val_url (or --split) at "
        "seg.eval_scales x seg.eval_flip (+ dense CRF with seg.crf), sharded over Ray actors; one "
        "confusion matrix summed over every shard. Writes eval.json and overlays.png.",
    )
    es.add_argument(
        "--checkpoint",
        default=None,
        help="segmentation checkpoint folder or .pt, local or s3:// (default: the "
        "newest of <seg.out_url>/run)",
    )
    es.add_argument("--split", default=None, help="image split with masks (default: seg.val_url)")
    es.add_argument(
        "--out", default=None, help="where eval.json goes (default: <seg.out_url>/eval)"
    )

    w = sub.add_parser("weights", help="convert pretrained weights")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    c = wsub.add_parser(
        "convert-resnet38",
        help="MXNet ImageNet ResNet-38 .params → PyTorch state dict",
        description="Read the MXNet NDArray file of the ImageNet ResNet-38 weights "
        "(ilsvrc-cls_rna-a1_cls1000_ep-0001.params) directly, without mxnet, map its keys onto "
        "mcis_dist's ResNet-38 and save a plain state dict (.pth).",
    )
    c.add_argument("src", help="the .params file")
    c.add_argument("dst", help="the .pth file to write")

    d = sub.add_parser(
        "demo",
        help="run the pipeline on the built-in dataset",
        description="Build the built-in dataset's shards and run what the pipeline has so far, "
        "on this machine.",
    )
    d.add_argument("--config", default=None, help="experiment YAML (default: configs/demo.yaml)")
    d.add_argument("overrides", nargs="*", help="config overrides, a.b=c")
    return parser
