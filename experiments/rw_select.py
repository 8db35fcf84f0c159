"""Choose the random walk's settings on one half of the training images, report the other half.

Pseudo masks are made for the training images, whose masks (where a data set has them) are for
evaluation only. Picking ``masks.beta``, ``masks.steps`` and the background score by looking at
the same masks that are then reported would flatter the pseudo masks, and picking them on the
validation masks would flatter the segmentation network scored there. So: with a finished run's
CAMs and AffinityNet (``mcis pipeline`` or ``mcis affinity``), every setting of the grid makes
the pseudo masks of the whole training split (``mcis masks``), ``mcis eval masks`` scores them
on each fixed half of the images (a hash of the key), the setting best on half 0 is chosen and
its half-1 mIoU is the figure to report. The segmentation network is scored on the validation
split, which no choice here looked at.

    python experiments/rw_select.py --config configs/demo.yaml [--out runs/rw_select] [overrides]

Writes ``<out>/rw_select.json`` and ``.md``; each setting's masks go to ``<out>/<setting>/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from mcis_dist.config import load_config
from mcis_dist.masks.evaluate import evaluate_masks
from mcis_dist.masks.stage import make_masks

REPO = Path(__file__).resolve().parents[1]
GRID = {
    "masks.beta": [8, 16],
    "masks.steps": [16, 64, 256],
    "background": [
        ("masks.background=power", "masks.bg_power=8"),
        ("masks.background=power", "masks.bg_power=16"),
        ("masks.background=constant", "masks.bg_threshold=0.2"),
    ],
}


def settings() -> list[list[str]]:
    out = []
    for beta, steps, bg in itertools.product(*GRID.values()):
        out.append([f"masks.beta={beta}", f"masks.steps={steps}", *bg])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--out", default="runs/rw_select")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for setting in settings():
        tag = "_".join(s.split(".", 1)[1].replace("=", "") for s in setting)
        cfg = load_config(
            args.config,
            [*args.overrides, *setting, f"masks.out_url={out / tag}", "masks.crf=false"],
        )
        make_masks(cfg, log=lambda *_: None)
        r = evaluate_masks(cfg, log=lambda *_: None)
        rows.append(
            {
                "setting": setting,
                "half0": r["by_half"]["0"]["miou"],
                "half1": r["by_half"]["1"]["miou"],
                "all": r["miou"],
            }
        )
        print(
            f"  {' '.join(setting):70s} half 0 {100 * rows[-1]['half0']:.1f}  "
            f"half 1 {100 * rows[-1]['half1']:.1f}",
            flush=True,
        )
    best = max(rows, key=lambda r: r["half0"])
    doc = {
        "config": args.config,
        "overrides": args.overrides,
        "rows": rows,
        "chosen_on_half0": best["setting"],
        "reported_half1": best["half1"],
        "best_on_half1_oracle": max(r["half1"] for r in rows),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "rw_select.json").write_text(json.dumps(doc, indent=1))
    lines = ["| setting | mIoU % half 0 (chooses) | mIoU % half 1 (reported) |", "|---|---|---|"]
    for r in rows:
        mark = " **chosen**" if r is best else ""
        lines.append(
            f"| {' '.join(r['setting'])}{mark} | {100 * r['half0']:.1f} | {100 * r['half1']:.1f} |"
        )
    (out / "rw_select.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"chosen on half 0: {best['setting']}; half 1: {100 * best['half1']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
