"""CAM ablations on the built-in dataset, in the shape of the paper's Tables 4 and 5.

Table 4 (training losses): the basic classifier (Eq. 1 only), co-attention only (Eq. 1 + 5) and
the full model (Eq. 10), each trained with ``mcis train-cls`` from the same config and seed.
Table 5 (inference): the full model's single-round maps against co-attentive maps with K = 1 … 5
related images per class (and Table 2's contrastive variant). Every map set is made by
``mcis cams`` and scored by ``mcis eval cams`` on a split with masks: mIoU at the config's fixed
background threshold, and the best of the threshold sweep (reporting only).

    python experiments/cam_ablation.py [--split val] [--out runs/ablation] [overrides ...]

Writes ``<out>/ablation.json`` and ``<out>/ablation.md``. Expect ~15-25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mcis_dist.cams.evaluate import evaluate_cams
from mcis_dist.cams.stage import compute_cams
from mcis_dist.cli import main as mcis
from mcis_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
TRAININGS = {  # Table 4
    "basic": ["train.loss_coattention=0", "train.loss_contrastive=0"],
    "coatt_only": ["train.loss_contrastive=0"],
    "full": [],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--split", default="val", help="split to map and score (needs masks)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--ks", default="1,2,3,4,5", help="related images per class (Table 5)")
    p.add_argument("--full-run", default=None,
                   help="reuse a finished full-model run instead of training one: RUN_ROOT/NAME, "
                   "e.g. runs/demo (same config)")  # fmt: skip
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    base = [f"run_root={out}", *args.overrides]
    cfg0 = load_config(args.config, base)
    split = f"{cfg0.shards.url.rstrip('/')}/{args.split}"
    if not Path(split, "manifest.json").exists() and "://" not in split:
        assert mcis(["shards", "build", "--source", "synthetic", "--out", cfg0.shards.url,
                     "--num-train", str(cfg0.synthetic.num_train),
                     "--num-val", str(cfg0.synthetic.num_val), "--no-progress"]) == 0  # fmt: skip
    rows, t0 = [], time.time()

    def names(training: str) -> list[str]:
        if training == "full" and args.full_run:
            root, name = str(Path(args.full_run).absolute()).rsplit("/", 1)
            return [f"run_root={root}", f"name={name}"]
        return [f"name={training}"]

    def score(name: str, training: str, overrides: list[str]) -> dict:
        cfg = load_config(args.config, [*base, *names(training), f"cams.split_url={split}",
                                        f"cams.out_url={out}/{training}/cams_{name}", *overrides])  # fmt: skip
        compute_cams(cfg, log=lambda *_: None)
        r = evaluate_cams(cfg, log=lambda *_: None)
        row = {"training": training, "maps": name, "miou": r["at_threshold"]["miou"],
               "threshold": r["threshold"], "best_miou": r["best"]["miou"],
               "best_threshold": r["best_threshold"]}  # fmt: skip
        print(f"  {training:>10}  {name:<18} mIoU {100 * row['miou']:5.1f} at "
              f"{row['threshold']:.2f}   best {100 * row['best_miou']:5.1f} at "
              f"{row['best_threshold']:.2f}", flush=True)  # fmt: skip
        rows.append(row)
        return row

    for training, extra in TRAININGS.items():
        print(f"training the {training} classifier ...", flush=True)
        assert mcis(["train-cls", "--config", args.config, *base, *names(training), *extra]) == 0
        score("single", training, ["cams.mode=single"])
        if training != "basic":  # the basic classifier has no trained phi_co
            score("coattentive_k3", training, ["cams.mode=coattentive", "cams.related=3"])
    for k in [int(x) for x in args.ks.split(",")]:  # Table 5, full model
        if k != 3:
            score(f"coattentive_k{k}", "full", ["cams.mode=coattentive", f"cams.related={k}"])
    score("coatt_contrast_k3", "full", ["cams.mode=coattentive", "cams.contrastive=true"])

    doc = {"split": split, "config": args.config, "overrides": args.overrides, "rows": rows,
           "seconds": round(time.time() - t0, 1)}  # fmt: skip
    (out / "ablation.json").write_text(json.dumps(doc, indent=1))
    lines = ["| training (Table 4) | maps (Table 2/5) | mIoU % at fixed threshold | best of sweep % |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['training']} | {r['maps']} | {100 * r['miou']:.1f} (t={r['threshold']:.2f}) "
                     f"| {100 * r['best_miou']:.1f} (t={r['best_threshold']:.2f}) |")  # fmt: skip
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
