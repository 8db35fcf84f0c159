"""The run report: ``report.json``, ``report.md`` and its figures, in the run folder.

Figures (matplotlib, Agg): the loss curves of the three trained stages from their
``metrics.jsonl``, a per-class IoU chart of the CAMs, the pseudo masks and the segmentation, and
the evaluations' overlay grids (CAMs, pseudo masks, predictions) copied next to the report.
"""

from __future__ import annotations

import io
import json

import numpy as np

from mcis_dist.config import ExperimentConfig
from mcis_dist.runtime.paths import affinity_run_url
from mcis_dist.seg.train import run_url as seg_run_url
from mcis_dist.storage import StorageError, open_storage
from mcis_dist.train.classifier import run_url as cls_run_url

__all__ = ["write_report", "summary_table"]


def _metrics(url: str, endpoint: str | None) -> list[dict]:
    storage = open_storage(url, endpoint_url=endpoint)
    try:
        text = storage.read_bytes("metrics.jsonl").decode()
    except StorageError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_figure(runs: dict[str, list[dict]]) -> bytes:
    import matplotlib  # lazy: Agg before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: Agg before pyplot

    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(4.2 * max(1, len(runs)), 3.2))
    axes = list(axes) if len(runs) > 1 else [axes]
    for ax, (name, records) in zip(axes, runs.items(), strict=False):
        steps = [r for r in records if "total" in r]
        ax.plot([r["step"] for r in steps], [r["total"] for r in steps], label="total")
        for term in ("single", "coattention", "contrastive", "bg_pos", "fg_pos", "neg"):
            if steps and term in steps[0]:
                ax.plot(
                    [r["step"] for r in steps],
                    [r.get(term, 0) for r in steps],
                    label=term,
                    linewidth=0.8,
                )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    out = _png(fig)
    plt.close(fig)
    return out


def iou_figure(per_class: dict[str, dict[str, float | None]]) -> bytes:
    import matplotlib  # lazy: Agg before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: Agg before pyplot

    names = list(next(iter(per_class.values())))
    x = np.arange(len(names))
    width = 0.8 / len(per_class)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.2))
    for i, (what, ious) in enumerate(per_class.items()):
        ax.bar(x + i * width, [100 * (ious.get(n) or 0) for n in names], width, label=what)
    ax.set_xticks(x + width * (len(per_class) - 1) / 2, names, rotation=45, ha="right")
    ax.set_ylabel("IoU %")
    ax.legend(fontsize=8)
    out = _png(fig)
    plt.close(fig)
    return out


def summary_table(report: dict) -> list[tuple[str, str]]:
    """(what, value) rows of the headline numbers, in pipeline order."""

    def cam(key: str) -> str:  # held-out thresholds (the headline), then the fixed one
        held = report.get(f"{key}_heldout")
        fixed = f"{100 * report[key]:.1f}"
        return fixed if held is None else f"{100 * held:.1f} (fixed t: {fixed})"

    rows = []
    if "cam_miou_basic" in report:
        rows.append(("CAM mIoU, basic classifier (Eq. 1)", cam("cam_miou_basic")))
    rows += [
        ("CAM mIoU, single-round", cam("cam_miou_single")),
        ("CAM mIoU, co-attentive", cam("cam_miou_coattentive")),
        ("pseudo-mask mIoU", f"{100 * report['pseudo_miou']:.1f}"),
        ("segmentation mIoU (val)", f"{100 * report['seg_miou']:.1f}"),
    ]
    return rows


ATTENTION_ROWS = (
    ("hub_top1", "attention mass on the single most-attended position (hub, top-1)"),
    ("hub_top5", "attention mass on the 5 most-attended positions (hub, top-5)"),
    ("bg_to_fg", "background queries' attention on the other image's objects, x chance (< 1 good)"),
    ("fg_to_same", "object queries' attention on the same class in the other image, x chance"),
    ("gate_mean", "mean of the contrastive gate B (Eq. 6)"),
    ("gate_iou", "IoU of {B > 0.5} with the classes the pair shares"),
    ("w_p_drift", "||W_P - W_P(init)|| / ||W_P(init)||"),
    ("temperature", "temperature of the cosine affinity"),
)


def attention_lines(attention: dict | None) -> list[str]:
    """Markdown rows of the classifier's attention diagnostics (``mcis eval cams``)."""
    if not attention or not attention.get("pairs"):
        return []
    lines = [
        f"## Attention diagnostics ({attention.get('affinity')} affinity, "
        f"{attention['pairs']} pairs of the mapped split)",
        "",
        "| what | value |",
        "|---|---|",
    ]
    for key, what in ATTENTION_ROWS:
        if attention.get(key) is not None:
            lines.append(f"| {what} | {attention[key]} |")
    return [*lines, ""]


def write_report(run, cfg: ExperimentConfig, report: dict, endpoint: str | None) -> None:

    figures = []
    runs = {
        name: _metrics(url, endpoint)
        for name, url in (
            ("classifier", cls_run_url(cfg)),
            ("AffinityNet", affinity_run_url(cfg)),
            ("DeepLab", seg_run_url(cfg)),
        )
    }
    runs = {k: v for k, v in runs.items() if v}
    if runs:
        run.write_bytes("report_losses.png", loss_figure(runs))
        figures.append(("Loss curves", "report_losses.png"))
    run.write_bytes("report_iou.png", iou_figure(report["per_class"]))
    figures.append(
        ("IoU per class (CAMs at cams.bg_threshold, pseudo masks, segmentation)", "report_iou.png")
    )
    for label, url in (
        ("CAM overlays", f"{cfg.cams.out_url}/eval"),
        ("Pseudo-mask overlays", f"{cfg.masks.out_url}/eval"),
        ("Segmentation on the validation images", f"{cfg.seg.out_url}/eval"),
    ):
        src = open_storage(url, endpoint_url=endpoint)
        if src.exists("overlays.png"):
            name = f"report_{label.split()[0].lower()}_overlays.png"
            run.write_bytes(name, src.read_bytes("overlays.png"))
            figures.append((label, name))
    run.write_bytes("report.json", json.dumps(report, indent=1).encode())
    lines = [f"# Run report: {cfg.name}", "", "| what | value |", "|---|---|"]
    lines += [f"| {w} | {v} |" for w, v in summary_table(report)]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["stage_seconds"].items()]
    lines += [
        "",
        "CAM mIoU is at held-out thresholds: the images are split into two fixed halves by a "
        "hash of their key, each half scored at the threshold best on the other half "
        f"({report.get('cam_heldout_thresholds')}), pooled; in brackets, at the fixed "
        "`cams.bg_threshold`. The oracle threshold of the whole sweep (chosen on the scored "
        f"masks, an upper bound) was {report['cam_best_threshold']}.",
        "",
    ]
    lines += attention_lines(report.get("attention"))
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    run.write_bytes("report.md", "\n".join(lines).encode())
