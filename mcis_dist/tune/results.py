"""The sweep's results: one row per trial, the table, and the best trial's experiment config.

``write_results`` writes ``results.csv``, ``results.md`` and ``best_config.yaml`` (a full
experiment config for ``mcis pipeline``) to the sweep folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from mcis_dist.config import ExperimentConfig, dump_config, load_config
from mcis_dist.runtime.trainer import worker_error
from mcis_dist.tune.sweep import Sweep


@dataclass
class SweepResult:
    url: str  # the sweep folder
    rows: list[dict]  # one per trial, best first
    best: dict | None  # the best row (finished trials first), None when no trial has a result
    table: str  # the printed table


def result_rows(grid, sweep: Sweep, epochs: int) -> list[dict]:
    """One row per trial: status, its values, the objective (last and best epoch), epochs,
    seconds and the error line of a failed trial; best first, failed last."""

    analysis = getattr(grid, "_experiment_analysis", None)
    trials = {t.trial_id: t for t in getattr(analysis, "trials", None) or []}
    rows = []
    for r in grid:
        m = r.metrics or {}
        trial = Path(str(r.path)).name if r.path else str(m.get("trial_id", "?"))
        df = r.metrics_dataframe
        history = []
        if df is not None and sweep.metric in df:
            history = [float(v) for v in df[sweep.metric].dropna()]
        value = m.get(sweep.metric)
        if r.error is not None:
            state = "failed"
        elif getattr(trials.get(trial), "status", "TERMINATED") != "TERMINATED":
            state = "interrupted"
        elif value is None:
            state = "no result"
        elif m.get("epoch", 0) >= epochs:
            state = "finished"
        else:
            state = f"stopped at epoch {m.get('epoch')} (ASHA)"
        pick = max if sweep.mode == "max" else min
        rows.append(
            {
                "trial": trial,
                "status": state,
                **{
                    k: (r.config or getattr(trials.get(trial), "config", {})).get(k)
                    for k in sweep.space
                },
                sweep.metric: value,
                f"best_{sweep.metric}": pick(history) if history else None,
                "epochs": m.get("epoch"),
                "seconds": _round(m.get("time_total_s"), 1),
                "error": worker_error(r.error) if r.error is not None else "",
            }
        )
    sign = -1 if sweep.mode == "max" else 1

    def order(row):
        v = row[sweep.metric]
        return (
            row["status"] == "failed",
            v is None,
            sign * v if v is not None else 0,
            row["trial"],
        )

    return sorted(rows, key=order)


def _round(v, digits):
    return round(float(v), digits) if isinstance(v, int | float) else v


def _cell(key: str, v, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in (metric, f"best_{metric}"):
        return f"{100 * v:.1f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict], sweep: Sweep, markdown: bool = False, width: int = 100) -> str:
    """The rows as aligned text (or markdown); error lines cut to ``width`` (CSV: whole)."""
    keys = list(rows[0]) if rows else ["trial", "status"]
    head = [f"{k} (%)" if k in (sweep.metric, f"best_{sweep.metric}") else k for k in keys]
    cells = [[_cell(k, row[k], sweep.metric) for k in keys] for row in rows]
    for r in cells:
        r[-1] = r[-1] if len(r[-1]) <= width else r[-1][: width - 3] + "..."
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def best_config(sweep: Sweep, base: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The base experiment + the best trial's values, under a new name (so ``mcis pipeline``
    trains it instead of finding the base experiment's finished runs)."""

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{base.name}-{sweep.name}-best")
    values = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    return load_config(sweep.base, [*sweep.overrides, *values, f"name={name}"])


def write_results(sweep, base, url, folder, rows, log) -> SweepResult:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    folder.write_bytes("results.csv", buf.getvalue().encode())
    table = format_table(rows, sweep)
    scored = [r for r in rows if r[sweep.metric] is not None]
    best = next((r for r in scored if r["status"] == "finished"), scored[0] if scored else None)
    failed = sum(r["status"] == "failed" for r in rows)
    lines = [
        f"# Sweep {sweep.name}: {sweep.stage} stage, {sweep.metric} ({sweep.mode}) on the "
        f"validation split",
        "",
        f"Sweep file `{sweep.file}`, base `{sweep.base}`; {len(rows)} trials, {failed} failed.",
        "",
        format_table(rows, sweep, True),
        "",
    ]
    if best is not None:
        params = {k: best[k] for k in sweep.space}
        cfg = best_config(sweep, base, params)
        header = (
            f"# mcis tune: the best trial ({best['trial']}, {sweep.metric} "
            f"{100 * best[sweep.metric]:.1f}%) of the sweep {sweep.file}:\n"
            + "".join(f"#   {k}: {v}\n" for k, v in params.items())
            + "# Run it with: mcis pipeline --config <this file>\n"
        )
        folder.write_bytes("best_config.yaml", (header + dump_config(cfg)).encode())
        lines.append(
            f"Best: trial `{best['trial']}` "
            f"({', '.join(f'{k}={_cell(k, v, sweep.metric)}' for k, v in params.items())})"
            f": `best_config.yaml` (experiment `{cfg.name}`)."
        )
    folder.write_bytes("results.md", ("\n".join(lines) + "\n").encode())
    log(
        f"\ntune: {len(rows)} trials ({failed} failed); {sweep.metric} in % on the validation "
        f"split:\n{table}"
    )
    log(
        "tune: results.csv, results.md"
        + (", best_config.yaml" if best else "")
        + f" in {folder.describe()}"
    )
    return SweepResult(url, rows, best, table)
