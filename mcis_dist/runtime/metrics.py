"""Training metrics: JSONL and TensorBoard in the run folder, and a progress line.

A Ray Train ``UserCallback`` runs in the controller after every ``ray.train.report`` with the
metrics of all workers, so one writer sees the whole step: it averages the loss terms over
workers, sums the images, derives images/s and the share of time spent waiting for data, appends
one JSON line to ``<run>/cls/metrics.jsonl`` (local folder or S3), writes TensorBoard scalars
when the run folder is local, and prints a progress line (forwarded to the driver's console).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.train import UserCallback
from tensorboardX import SummaryWriter

from mcis_dist.storage import LocalStorage, open_storage

AVERAGED = ("total", "single", "coattention", "contrastive", "lr", "loader_bad_decode")
# counts over every rank (the rest, e.g. the pair pool's partner share and mean wait, averaged:
# every rank pairs the same number of samples per epoch)
SUMMED = (
    "images",
    "loader_bad_decode",
    "loader_bad_record",
    "loader_shard_errors",
    "pair_dropped",
    "pair_unshared",
)


def combine(per_worker: list[dict], seconds: float) -> dict:
    """One record from every worker's report (ranks report the same keys)."""
    first = per_worker[0]
    out = {k: first[k] for k in ("epoch", "step", "epoch_end", "skipped_steps") if k in first}
    for k in first:
        if isinstance(first[k], (int, float)) and k not in out:
            values = [w[k] for w in per_worker if k in w]
            out[k] = sum(values) if k in SUMMED else sum(values) / len(values)
    if seconds > 0 and "images" in out:
        out["images_per_s"] = out["images"] / seconds
        waits = [w.get("data_wait_s", 0.0) for w in per_worker]
        out["data_wait_share"] = min(1.0, (sum(waits) / len(waits)) / seconds)
    out["time"] = time.time()
    return out


class MetricsCallback(UserCallback):
    def __init__(
        self,
        run_url: str,
        endpoint_url: str | None = None,
        total_epochs: int = 0,
        label: str = "train-cls",
        terms=("single", "coattention", "contrastive"),
    ):
        self.run_url, self.endpoint_url, self.total_epochs = run_url, endpoint_url, total_epochs
        self.label, self.terms = label, tuple(terms)
        self._storage = None
        self._lines: list[str] | None = None
        self._tb = None
        self._last = None

    def _open(self):
        if self._storage is None:
            self._storage = open_storage(self.run_url, endpoint_url=self.endpoint_url)
            if isinstance(self._storage, LocalStorage):
                self._storage.root.mkdir(parents=True, exist_ok=True)

                self._tb = SummaryWriter(str(Path(self._storage.root) / "tensorboard"))
            else:  # S3: keep the file's lines and rewrite it (objects cannot be appended to)
                existing = b""
                if self._storage.exists("metrics.jsonl"):
                    existing = self._storage.read_bytes("metrics.jsonl")
                self._lines = existing.decode().splitlines()

    def after_report(self, run_context, metrics, checkpoint):
        now = time.perf_counter()
        seconds = now - self._last if self._last is not None else 0.0
        self._last = now
        record = combine(metrics, seconds)
        record["checkpoint"] = checkpoint.path if checkpoint is not None else None
        self._open()
        line = json.dumps(record, sort_keys=True)
        if self._lines is None:
            with open(Path(self._storage.root) / "metrics.jsonl", "a") as f:
                f.write(line + "\n")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time":
                    self._tb.add_scalar(f"train/{k}", v, record.get("step", 0))
            self._tb.flush()
        else:
            self._lines.append(line)
            self._storage.write_bytes("metrics.jsonl", ("\n".join(self._lines) + "\n").encode())
        print(progress_line(record, self.total_epochs, self.label, self.terms), flush=True)


def progress_line(
    r: dict,
    total_epochs: int,
    label: str = "train-cls",
    terms=("single", "coattention", "contrastive"),
) -> str:
    parts = [f"[{label}] epoch {r.get('epoch', 0)}/{total_epochs} step {r.get('step', 0)}"]
    if "total" in r:
        shown = ", ".join(f"{t} {r.get(t, 0):.3f}" for t in terms)
        parts.append(f"loss {r['total']:.4f}" + (f" ({shown})" if shown else ""))
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "images_per_s" in r:
        parts.append(f"{r['images_per_s']:.1f} img/s, data wait {r['data_wait_share']:.0%}")
    if r.get("epoch_end") and "pair_partner_share" in r:  # the pair pool (§3.1), per epoch
        parts.append(
            f"pairs {100 * r['pair_partner_share']:.1f}% with a partner, mean wait "
            f"{r['pair_mean_wait']:.1f}, {r['pair_dropped']:g} dropped, "
            f"{r['pair_unshared']:g} without a shared class"
        )
    if r.get("checkpoint"):
        parts.append("checkpoint saved")
    return "  ".join(parts)
