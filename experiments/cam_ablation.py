"""CAM ablations over seeds on the built-in dataset, in the shape of the paper's Tables 4 and 5.

Table 4 (training losses): the basic classifier (Eq. 1 only), co-attention only (Eq. 1 + 5) and
the full model (Eq. 10), each trained with ``mcis train-cls`` from the same config, once per
seed (``train.seed`` and ``data.seed``). Table 5 (inference): for every trained classifier,
single-round maps (K = 0) and co-attentive maps with K = 1 … 5 related images per class (the
basic classifier has no trained phi_co: single-round only), plus a control: the co-attention
classifiers' phi_co applied to the image's own features (no related image), which separates
what co-attention taught the class layer during training from what the related images add at
inference. Every map set is made by
``mcis cams`` and scored by ``mcis eval cams`` on a split with masks (default: val): mIoU at the
config's fixed background threshold, and at each row's best threshold of the sweep (reporting
only: choosing it looks at ground truth). ``eval cams`` also writes the attention diagnostics
of each classifier (hub mass, background/foreground attention ratio, gate, W_P drift).

    python experiments/cam_ablation.py [--seeds 0,1,2] [--ks 0,1,2,3,4,5] [--out runs/ablation]
                                       [--config configs/demo.yaml] [overrides ...]

Writes ``<out>/ablation.json`` (every score, every seed), ``<out>/ablation.md`` (mean ± sd over
seeds) and ``<out>/ablation.png`` (mIoU against K). Finished trainings and map sets are reused
when the command is run again (``mcis train-cls`` and ``mcis cams`` resume). On 2 CPU cores with
the demo config: ~10 minutes per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from mcis_dist.cams.evaluate import evaluate_cams
from mcis_dist.cams.stage import compute_cams
from mcis_dist.cli import main as mcis
from mcis_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONTROL = -1  # the "K" of the control row: phi_co on the image's own features
TRAININGS = {  # Table 4
    "basic": ["train.loss_coattention=0", "train.loss_contrastive=0"],
    "coatt_only": ["train.loss_contrastive=0"],
    "full": [],
}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (training, K): mean and sd over seeds of the fixed-threshold and best mIoU."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["training"], r["k"]), []).append(r)
    out = []
    for (training, k), rs in groups.items():
        fixed, best = _mean_sd([r["miou"] for r in rs]), _mean_sd([r["best_miou"] for r in rs])
        out.append(
            {
                "training": training,
                "k": k,
                "seeds": len(rs),
                "miou": fixed[0],
                "miou_sd": fixed[1],
                "best_miou": best[0],
                "best_miou_sd": best[1],
                "best_thresholds": [r["best_threshold"] for r in rs],
            }
        )
    return out


def table(summary: list[dict], threshold: float) -> str:
    lines = [
        f"| training (Table 4) | maps, K related (Table 5) | mIoU % at t={threshold:.2f} "
        "| mIoU % at the row's best t (oracle) | best t per seed |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        if r["k"] == CONTROL:
            maps = "control: phi_co on own features (K=0)"
        else:
            maps = "single-round (K=0)" if r["k"] == 0 else f"co-attentive, K={r['k']}"
        lines.append(
            f"| {r['training']} | {maps} | {100 * r['miou']:.1f} ± {100 * r['miou_sd']:.1f} "
            f"| {100 * r['best_miou']:.1f} ± {100 * r['best_miou_sd']:.1f} "
            f"| {', '.join(f'{t:.2f}' for t in r['best_thresholds'])} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for training in TRAININGS:
        rs = [r for r in summary if r["training"] == training and r["k"] != CONTROL]
        rs = sorted(rs, key=lambda r: r["k"])
        if not rs:
            continue
        ks = [r["k"] for r in rs]
        ax.errorbar(
            ks,
            [100 * r["miou"] for r in rs],
            yerr=[100 * r["miou_sd"] for r in rs],
            marker="o",
            capsize=3,
            label=training,
        )
    ax.set_xlabel("related images per class, K (0 = single-round)")
    ax.set_ylabel(f"CAM mIoU % at threshold {threshold:.2f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--split", default="val", help="split to map and score (needs masks)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ks", default="0,1,2,3,4,5", help="related images per class (0: single)")
    p.add_argument("--trainings", default=",".join(TRAININGS))
    p.add_argument(
        "--maps-tag",
        default="",
        help="suffix of the map folders, to score other inference settings of the "
        "same trained classifiers (e.g. --maps-tag feature cams.readout=feature)",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cfg0 = load_config(args.config, [f"run_root={out}", *args.overrides])
    split = f"{cfg0.shards.url.rstrip('/')}/{args.split}"
    if not Path(split, "manifest.json").exists() and "://" not in split:
        assert (
            mcis(
                [
                    "shards",
                    "build",
                    "--source",
                    "synthetic",
                    "--out",
                    cfg0.shards.url,
                    "--num-train",
                    str(cfg0.synthetic.num_train),
                    "--num-val",
                    str(cfg0.synthetic.num_val),
                    "--no-progress",
                ]
            )
            == 0
        )
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    rows, diagnostics, t0 = [], {}, time.time()
    for seed in seeds:
        for training in args.trainings.split(","):
            name = f"{training}_s{seed}"
            base = [
                f"run_root={out}",
                *args.overrides,
                f"name={name}",
                f"train.seed={seed}",
                f"data.seed={seed}",
                *TRAININGS[training],
                f"cams.split_url={split}",
            ]
            print(f"[seed {seed}] training {training} ({time.time() - t0:.0f} s) ...", flush=True)
            assert mcis(["train-cls", "--config", args.config, *base]) == 0
            # Table 5 on the full model; the others at K = 0 and 3 (basic: K = 0), plus the control
            todo = ks if training == "full" else [k for k in ks if k in (0, 3)]
            todo = [0] if training == "basic" else [*todo, CONTROL]
            for k in todo:
                if k == CONTROL:  # phi_co on the image's own features: no related image
                    maps = ["cams.mode=single", "cams.class_layer=phi_co"]
                elif k == 0:
                    maps = ["cams.mode=single"]
                else:
                    maps = ["cams.mode=coattentive", f"cams.related={k}"]
                folder = out / name / f"cams_k{k}{'_' + args.maps_tag if args.maps_tag else ''}"
                done = folder / "eval" / "eval.json"
                if done.exists():  # a finished map set of an earlier run (delete it to redo)
                    r = json.loads(done.read_text())
                else:
                    cfg = load_config(args.config, [*base, *maps, f"cams.out_url={folder}"])
                    compute_cams(cfg, log=lambda *_: None)
                    r = evaluate_cams(cfg, log=lambda *_: None)
                row = {
                    "training": training,
                    "seed": seed,
                    "k": k,
                    "miou": r["at_threshold"]["miou"],
                    "threshold": r["threshold"],
                    "best_miou": r["best"]["miou"],
                    "best_threshold": r["best_threshold"],
                }
                if r.get("attention") and name not in diagnostics:
                    diagnostics[name] = r["attention"]
                print(
                    f"  {name:>14}  K={k}  mIoU {100 * row['miou']:5.1f} at "
                    f"{row['threshold']:.2f}   best {100 * row['best_miou']:5.1f} at "
                    f"{row['best_threshold']:.2f}",
                    flush=True,
                )
                rows.append(row)
    order = list(TRAININGS)
    summary = sorted(summarise(rows), key=lambda r: (order.index(r["training"]), r["k"] % 99))
    threshold = cfg0.cams.bg_threshold
    doc = {
        "split": split,
        "config": args.config,
        "overrides": args.overrides,
        "seeds": seeds,
        "rows": rows,
        "summary": summary,
        "attention": diagnostics,
        "seconds": round(time.time() - t0, 1),
    }
    stem = f"ablation{'_' + args.maps_tag if args.maps_tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    md = table(summary, threshold)
    if diagnostics:
        keys = sorted({k for d in diagnostics.values() for k in d} - {"checkpoint", "pairs"})
        md += "\n\nAttention diagnostics (`mcis eval cams`, split " + args.split + ")\n\n"
        md += "| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
        for name, d in diagnostics.items():
            md += f"| {name} | " + " | ".join(str(d.get(k, "")) for k in keys) + " |\n"
    (out / f"{stem}.md").write_text(md + "\n")
    plot(summary, out / f"{stem}.png", threshold)
    print(md)
    print(f"written: {out}/{stem}.json, {stem}.md, {stem}.png ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
