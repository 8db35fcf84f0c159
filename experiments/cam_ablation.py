"""Co-attentive maps against single-round maps and against the controls, over seeds, with
held-out thresholds and paired 95% intervals.

For every seed (``train.seed`` = ``data.seed``) and every training (``--trainings``: the
paper's Table 4 rows ``basic`` (Eq. 1 only), ``coatt_only`` (Eq. 1 + 5), ``full`` (Eq. 10),
and any ``--variant NAME:key=value,...``), the classifier is trained with ``mcis train-cls``
and the images of ``--split`` are mapped with ``mcis cams`` into these map sets:

* ``single``: single-round maps S_n = phi(F_n) (Eq. 1);
* ``control``: phi_co (the class layer co-attention trains, Eq. 5) on the image's own
  features, no related image: what co-attention taught the class layer, without the
  cross-image part;
* ``coatt_kK``: co-attentive maps with K related images per class (§3.2), drawn from
  ``--related-split`` (default: the training split, so validation images never see each other);
* ``wrong_k3``: the same co-attention with 3 related images holding *none* of the image's
  classes: what the related images add when they share nothing with it;
* more with ``--mapset NAME:key=value,...`` (e.g. ``feature:cams.readout=feature``).

Each map set is scored on the split's masks three ways (``mcis_dist.evaluation.heldout``):
at **held-out** thresholds (the images split into two fixed halves by a hash of their key,
each half at the threshold best on the other half; the headline), at the config's **fixed**
threshold, and at the **oracle** threshold (chosen on the scored masks: an upper bound). The
comparisons co-attentive − single, co-attentive − control and co-attentive − wrong-class are
paired differences (the mean over seeds of the mIoU difference) with a 95% bootstrap interval
that resamples images and seeds.

    python experiments/cam_ablation.py --seeds 0,1,2 --out runs/ablation       # demo config
    python experiments/cam_ablation.py --photos --seeds 0,1,2 --out runs/ablation_photos

``--photos``: the 24 real photos of ``experiments/photos_compare.py`` with
``configs/photos_efficientnet.yaml`` (maps of the training photos, as WSSS papers score CAMs;
related images from the same photos). Writes ``<out>/ablation.json`` (every score, every seed,
every comparison), ``<out>/ablation.md`` and ``<out>/ablation.png``. Finished trainings and map
sets are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from mcis_dist.cams.evaluate import evaluate_cams, image_sweeps
from mcis_dist.cams.stage import compute_cams
from mcis_dist.cli import main as mcis
from mcis_dist.config import load_config
from mcis_dist.evaluation.heldout import KINDS, paired_difference

REPO = Path(__file__).resolve().parents[1]
TRAININGS = {  # Table 4
    "basic": ["train.loss_coattention=0", "train.loss_contrastive=0"],
    "coatt_only": ["train.loss_contrastive=0"],
    "full": [],
}
MAPSETS = {
    "single": ["cams.mode=single"],
    "control": ["cams.mode=single", "cams.class_layer=phi_co"],
    "wrong_k3": ["cams.mode=coattentive", "cams.related=3", "cams.related_classes=other"],
}
COMPARISONS = (("coatt_k3", "single"), ("coatt_k3", "control"), ("coatt_k3", "wrong_k3"))


def _parse_named(items: list[str], what: str) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, _, rest = item.partition(":")
        if not name or not rest:
            raise SystemExit(f"--{what} {item!r}: expected NAME:key=value[,key=value...]")
        out[name] = rest.split(",")
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def summary_table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["training"], r["maps"]), []).append(r)
    lines = [
        "| training | maps | mIoU % held-out t | mIoU % fixed t | mIoU % oracle t | "
        "held-out t per seed (half 0/1) |",
        "|---|---|---|---|---|---|",
    ]
    for (training, maps), rs in groups.items():
        cells = []
        for kind in KINDS:
            m, sd = _mean_sd([r[kind] for r in rs])
            cells.append(f"{_pct(m)} ± {_pct(sd)}")
        ts = ", ".join("/".join(f"{t:.2f}" for t in r["heldout_thresholds"].values()) for r in rs)
        lines.append(f"| {training} | {maps} | {' | '.join(cells)} | {ts} |")
    return "\n".join(lines)


def comparison_table(comparisons: list[dict]) -> str:
    lines = [
        "| training | A − B | held-out t: diff [95% CI] | fixed t: diff [95% CI] | "
        "oracle t: diff [95% CI] | per seed (held-out) |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        cells = [
            f"{100 * c[k]['diff']:+.1f} [{100 * c[k]['low']:+.1f}, {100 * c[k]['high']:+.1f}]"
            for k in KINDS
        ]
        seeds = ", ".join(f"{100 * d:+.1f}" for d in c["heldout"]["per_seed_diff"])
        lines.append(f"| {c['training']} | {c['a']} − {c['b']} | {' | '.join(cells)} | {seeds} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # lazy: Agg before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: Agg before pyplot

    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["training"], r["maps"]), []).append(100 * r["heldout"])
    labels = [f"{t}\n{m}" for t, m in groups]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups)), 4))
    for i, values in enumerate(groups.values()):
        ax.scatter([i] * len(values), values, color="tab:blue", s=14)
        ax.bar(i, statistics.fmean(values), color="tab:blue", alpha=0.3)
    ax.set_xticks(range(len(groups)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("CAM mIoU % at held-out thresholds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_photo_shards(out: Path) -> str:
    """The 24 real photos with hand-traced masks as a VOC folder, then shards; returns the URL."""
    from mcis_dist.shards.photos import make_photo_voc  # lazy: the photos extra

    voc, shards = out / "voc", out / "shards"
    if not (voc / "ImageSets" / "Segmentation" / "train.txt").exists():
        make_photo_voc(voc)
    if not (shards / "train" / "manifest.json").exists():
        args = ["shards", "build", "--source", "voc", "--voc-root", str(voc), "--split", "train"]
        args += ["--out", str(shards), "--max-samples-per-shard", "6", "--workers", "1"]
        assert mcis([*args, "--verify", "full", "--no-progress"]) == 0
    return str(shards)


def build_synthetic_shards(cfg) -> None:
    if Path(cfg.shards.url, "train", "manifest.json").exists() or "://" in cfg.shards.url:
        return
    args = ["shards", "build", "--source", "synthetic", "--out", cfg.shards.url]
    args += ["--num-train", str(cfg.synthetic.num_train), "--num-val", str(cfg.synthetic.num_val)]
    assert mcis([*args, "--no-progress"]) == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        default=None,
        help="default: configs/demo.yaml (photos: configs/photos_efficientnet.yaml)",
    )
    p.add_argument("--photos", action="store_true", help="the 24 real photos (see docstring)")
    p.add_argument(
        "--split", default=None, help="split to map and score (demo: val; photos: train)"
    )
    p.add_argument("--related-split", default="train", help="split related images come from")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ks", default="3", help="related images per class of the coatt_kK sets")
    p.add_argument("--trainings", default="full", help=f"of {list(TRAININGS)} and --variant")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... training")
    p.add_argument("--mapset", action="append", default=[], help="NAME:key=value,... map set")
    p.add_argument("--compare", action="append", default=[], help="A:B, more map-set pairs")
    p.add_argument("--only", default=None, help="NAME,NAME: map only these sets (of the above)")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = args.config or str(
        REPO / "configs" / ("photos_efficientnet.yaml" if args.photos else "demo.yaml")
    )
    split_name = args.split or ("train" if args.photos else "val")
    extra = [f"shards.url={build_photo_shards(out)}"] if args.photos else []
    overrides = [f"run_root={out}", *extra, *args.overrides]
    cfg0 = load_config(config, overrides)
    if not args.photos:
        build_synthetic_shards(cfg0)
    shards = cfg0.shards.url.rstrip("/")
    split, related = f"{shards}/{split_name}", f"{shards}/{args.related_split}"
    trainings = {**TRAININGS, **_parse_named(args.variant, "variant")}
    mapsets = dict(MAPSETS)
    for k in (int(k) for k in args.ks.split(",")):
        mapsets[f"coatt_k{k}"] = ["cams.mode=coattentive", f"cams.related={k}"]
    mapsets.update(_parse_named(args.mapset, "mapset"))
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(mapsets))
        if unknown:
            raise SystemExit(f"--only {', '.join(unknown)}: not a map set ({', '.join(mapsets)})")
        mapsets = {k: v for k, v in mapsets.items() if k in args.only.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, sweeps, diagnostics, t0 = [], {}, {}, time.time()
    for seed in seeds:
        for training in args.trainings.split(","):
            name = f"{training}_s{seed}"
            base = [*overrides, f"name={name}", f"train.seed={seed}", f"data.seed={seed}"]
            base += [*trainings[training], f"cams.split_url={split}"]
            print(f"[seed {seed}] training {training} ({time.time() - t0:.0f} s)", flush=True)
            assert mcis(["train-cls", "--config", config, *base]) == 0
            todo = ["single"] if training == "basic" else list(mapsets)
            for maps in todo:
                folder = out / name / f"cams_{maps}"
                cfg = load_config(
                    config,
                    [
                        *base,
                        *mapsets[maps],
                        f"cams.out_url={folder}",
                        f"cams.related_url={related}",
                        *([] if maps == "control" else ["cams.eval_attention_pairs=0"]),
                    ],
                )
                compute_cams(cfg, log=lambda *_: None)
                if not (folder / "eval" / "eval.json").exists():
                    evaluate_cams(cfg, log=lambda *_: None)
                ev = json.loads((folder / "eval" / "eval.json").read_text())
                if ev.get("attention") and name not in diagnostics:
                    diagnostics[name] = ev["attention"]
                s, _, _ = image_sweeps(cfg, log=lambda *_: None)
                sweeps.setdefault((training, maps), []).append(s)
                row = {
                    "training": training,
                    "seed": seed,
                    "maps": maps,
                    "images": len(s),
                    "heldout": s.matrix("heldout").miou(),
                    "fixed": s.matrix("fixed", cfg.cams.bg_threshold).miou(),
                    "oracle": s.matrix("oracle").miou(),
                    "heldout_thresholds": s.heldout_thresholds(),
                    "oracle_threshold": s.best_threshold(),
                    "fallback_classes": json.loads((folder / "manifest.json").read_text())[
                        "fallback"
                    ]["classes"],
                }
                rows.append(row)
                print(
                    f"  {name:>16} {maps:>10}  held-out {_pct(row['heldout']):>5}  fixed "
                    f"{_pct(row['fixed']):>5}  oracle {_pct(row['oracle']):>5}",
                    flush=True,
                )
    comparisons = []
    for training in args.trainings.split(","):
        for a, b in [*COMPARISONS, *(tuple(c.split(":", 1)) for c in args.compare)]:
            if (training, a) not in sweeps or (training, b) not in sweeps:
                continue
            c = {"training": training, "a": a, "b": b}
            for kind in KINDS:
                r = paired_difference(
                    sweeps[(training, a)],
                    sweeps[(training, b)],
                    kind,
                    fixed=cfg0.cams.bg_threshold,
                    n_boot=args.boot,
                )
                c[kind] = r.to_dict()
            comparisons.append(c)
    doc = {
        "config": config,
        "split": split,
        "related_split": related,
        "overrides": args.overrides,
        "seeds": seeds,
        "trainings": {t: trainings[t] for t in args.trainings.split(",")},
        "mapsets": mapsets,
        "rows": rows,
        "comparisons": comparisons,
        "attention": diagnostics,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "ablation.json").write_text(json.dumps(doc, indent=1))
    md = summary_table(rows) + "\n\nPaired differences, mIoU points (A − B), mean over seeds, "
    md += "95% bootstrap interval over images and seeds:\n\n" + comparison_table(comparisons)
    if diagnostics:
        keys = sorted({k for d in diagnostics.values() for k in d} - {"checkpoint", "pairs"})
        md += f"\n\nAttention diagnostics (`mcis eval cams`, split {split_name})\n\n"
        md += "| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
        for name, d in diagnostics.items():
            md += f"| {name} | " + " | ".join(str(d.get(k, "")) for k in keys) + " |\n"
    (out / "ablation.md").write_text(md + "\n")
    plot(rows, out / "ablation.png")
    print(md)
    print(f"written: {out}/ablation.json, ablation.md, ablation.png ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
