"""Shared pieces of the benchmarks (see benchmarks/README.md for the contract).

Every ``benchmarks/NAME.py`` runs as ``python benchmarks/NAME.py [--quick] [--out FILE]``,
prints a table and writes ``{"name", "device", "metrics", "ratios"}`` as JSON. Speed is
reported as ratios against a baseline measured in the same run, never as absolute asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(name: str, description: str = "") -> argparse.Namespace:
    """``--quick`` (under a minute on 2 CPU cores) and ``--out`` (default results/NAME.json)."""
    p = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in under a minute")
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help="where to write the JSON results (default: %(default)s)",
    )
    return p.parse_args()


def device_description() -> str:
    """CPU model and usable core count, plus the GPU name when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = f"{cpu}, {cores} cores"
    try:  # lazily: torch is heavy and optional here
        import torch

        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:
        pass
    return desc


@dataclass
class Timing:
    """Wall-clock seconds of every run of a callable, and the last run's return value."""

    runs: list[float] = field(default_factory=list)
    result: object = None

    best = property(lambda self: min(self.runs))
    median = property(lambda self: statistics.median(self.runs))


def timeit(fn: Callable, repeat: int = 3, warmup: int = 0, setup: Callable | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed (``time.perf_counter``).

    With ``setup``, each call is ``fn(setup())`` and only ``fn`` is timed: use it to give every
    run a fresh output folder. Take ``.best`` for throughput (the least disturbed run) or
    ``.median`` for a typical run.
    """
    t = Timing()
    for i in range(warmup + max(1, repeat)):
        args = (setup(),) if setup is not None else ()
        t0 = time.perf_counter()
        result = fn(*args)
        if i >= warmup:
            t.runs.append(time.perf_counter() - t0)
            t.result = result
    return t


def _fmt(v: object) -> str:
    return (f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}") if isinstance(v, float) else str(v)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
    """Print ``rows`` (dicts) as a fixed-width table; missing cells print as ``-``."""
    cells = [[_fmt(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:  # first column left-aligned, the others right
        pairs = enumerate(zip(vals, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    print(*([title] if title else []), line(columns), line(["-" * w for w in widths]), sep="\n")
    for row in cells:
        print(line(row))


def write_results(out: Path, name: str, metrics: dict, ratios: dict) -> dict:
    """Write ``{"name", "device", "metrics", "ratios"}`` to ``out`` atomically; return it."""
    doc = {"name": name, "device": device_description(), "metrics": metrics, "ratios": ratios}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"results: {out}")
    return doc
