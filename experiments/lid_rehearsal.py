"""LID rehearsal on real ImageNet photos: Tiny-ImageNet end to end, box-scored, with a scaling table.

From a ``tiny-imagenet-200`` folder (``train/<wnid>/images/*.JPEG`` with
``<wnid>_boxes.txt``, ``val/images`` with ``val_annotations.txt``, ``wnids.txt``), for every
``--scales`` value n (a class-balanced slice of n train photos: the first n / C of each class by
file name), with ``configs/tinyimagenet200.yaml``:

1. **shards** of the train slice (``mcis shards build --source folder ... --boxes per-class``)
   and, once, of the val photos (``--source list --boxes val_annotations.txt``);
2. **training** of the co-attention classifier (``mcis train-cls``, Eq. 10, paper §3.1);
3. **maps** of the val photos (``compute_cams``), related images from the train slice:
   ``single`` (S_n, Eq. 1), ``coatt`` (co-attentive, K = 3 related images per class, §3.2),
   ``control`` (phi_co on the photo's own features, no related image) and ``wrong`` (the same
   co-attention with related images of other classes);
4. **box scores** of each map set (``evaluate_cams``: GT-known loc, MaxBoxAccV2, top-1 loc and
   top-1 cls at held-out, fixed and oracle thresholds with 95% bootstrap intervals);
5. **paired comparisons** (``compare_cams``) coatt − single, coatt − control, coatt − wrong.

Every stage is timed, and the peak resident memory of the driver and of the largest Ray worker
is sampled from /proc every 0.2 s while it runs (``PeakRss``; the embedded Ray cluster is the
driver's process tree). The largest scale is the headline run.

    python experiments/lid_rehearsal.py --data /data/tiny-imagenet-200 --out runs/lid_rehearsal
    python experiments/lid_rehearsal.py --data /data/tiny-imagenet-200 --quick --out runs/lid_q

``--quick``: a 2,000-photo slice and 200 val photos, the whole pipeline in minutes on 2 cores.
A smaller ``--scales`` value maps the first ``--val-fraction`` x n val photos (at least 100), so
that every stage's cost grows with the data. Writes ``<out>/lid_rehearsal.json``, ``lid_rehearsal.md``
and ``overlays_<maps>.png`` (the box overlays of the headline run). Finished stages (recorded in
``<out>/stages.json``) are skipped when the command is run again with the same arguments.
The smaller scales map only ``--scaling-maps`` (default single and coatt: the val maps cost the
same at every scale; the largest maps all four).

Over 400 lines because it runs, times, measures and tabulates every stage at several scales.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray

from mcis_dist.cams.evaluate import compare_cams, evaluate_cams, mapped_images
from mcis_dist.cams.evaluate_boxes import BoxEvaluation
from mcis_dist.cams.stage import compute_cams
from mcis_dist.cli import main as mcis
from mcis_dist.config import load_config
from mcis_dist.evaluation.boxes import box_interval, box_iou_matrix, box_paired_difference
from mcis_dist.runtime.session import ensure_ray
from mcis_dist.train.validate import read_val_images

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tinyimagenet200.yaml"
MAPSETS = {
    "single": ["cams.mode=single"],
    "coatt": ["cams.mode=coattentive", "cams.related=3"],
    "control": ["cams.mode=single", "cams.class_layer=phi_co"],
    "wrong": ["cams.mode=coattentive", "cams.related=3", "cams.related_classes=other"],
}
COMPARISONS = (("coatt", "single"), ("coatt", "control"), ("coatt", "wrong"))
METRICS = ("gt_known_loc", "max_box_acc_v2", "top1_loc", "top1_cls")
KINDS = ("heldout", "fixed", "oracle")
QUICK = [  # --quick: the config's settings on a slice, no checkpoints within the epoch
    "train.checkpoint_every_steps=0",
    "train.report_every_steps=20",
]
QUIET = {"log": lambda *_: None}
ALL = 1 << 40  # --scales all: more than any train folder holds


# ------------------------------------------------------------------------------ memory and time
def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process (from /proc/<pid>/stat)."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _is_ray_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"ray::" in cmd or b"default_worker.py" in cmd


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


class PeakRss:
    """``with PeakRss() as peak:`` samples, every ``interval`` s, the RSS of this process
    (``peak.driver_mb``) and of the Ray workers among its descendants that work during the
    block (``peak.worker_mb``: the largest one). A worker counts if it started during the block
    or used ``ACTIVE_TICKS`` of CPU in it: Ray keeps idle workers of earlier stages alive, and
    their memory is not this stage's. Linux (/proc); elsewhere both stay 0."""

    ACTIVE_TICKS = 10  # 0.1 s of CPU at the usual 100 ticks a second

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.driver_mb = 0.0
        self._before: set[int] | None = None  # workers alive when the block started
        self._first: dict[int, int] = {}  # worker -> CPU ticks when first seen
        self._last: dict[int, int] = {}
        self._rss: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def worker_mb(self) -> float:
        before = self._before or set()
        active = [
            pid
            for pid in self._rss
            if pid not in before or self._last[pid] - self._first[pid] >= self.ACTIVE_TICKS
        ]
        return max((self._rss[pid] for pid in active), default=0.0)

    def sample(self) -> None:
        if not Path("/proc/self/status").exists():
            return
        me = os.getpid()
        self.driver_mb = max(self.driver_mb, _rss_mb(me))
        kids, todo, seen = _children(), [me], set()
        while todo:
            for child in kids.get(todo.pop(), []):
                todo.append(child)
                if _is_ray_worker(child):
                    seen.add(child)
                    ticks = _cpu_ticks(child)
                    self._first.setdefault(child, ticks)
                    self._last[child] = ticks
                    self._rss[child] = max(self._rss.get(child, 0.0), _rss_mb(child))
        if self._before is None:
            self._before = seen

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRss:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class Ledger:
    """Finished stages, their seconds and peak memory, in ``<out>/stages.json``."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") != settings:
                raise SystemExit(
                    f"{path}: written by a run with other settings ({saved.get('settings')}); "
                    f"use another --out, or remove it to start over"
                )
            self.rows = saved["stages"]
        self.settings = settings
        self.started_ray = False

    def run(self, key: str, images: int, fn, ray: bool = True) -> dict:
        """Run ``fn()`` unless ``key`` is done; record and return its row. ``ray``: the stage
        uses Ray; the first such stage starts the embedded Ray that every later one reuses
        (each would otherwise start its own), so a rerun with every stage done starts none."""
        if key in self.rows:
            print(f"  {key}: done before ({self.rows[key]['seconds']:.0f} s), skipped", flush=True)
            return self.rows[key]
        print(f"  {key} ...", flush=True)
        if ray:
            self.started_ray |= ensure_ray()  # not timed: once per command, not per stage
        t0 = time.perf_counter()
        with PeakRss() as peak:
            fn()
        seconds = time.perf_counter() - t0
        row = {
            "seconds": round(seconds, 2),
            "images": images,
            "s_per_image": round(seconds / max(images, 1), 5),
            "peak_rss_mb": {
                "driver": round(peak.driver_mb, 1),
                "largest_worker": round(peak.worker_mb, 1),
            },
        }
        self.rows[key] = row
        self.path.write_text(json.dumps({"settings": self.settings, "stages": self.rows}, indent=1))
        print(f"  {key}: {seconds:.1f} s, peak RSS {row['peak_rss_mb']}", flush=True)
        return row


# ------------------------------------------------------------------------------ data slices
def _file_index(name: str) -> tuple[int, str]:
    stem = name.rsplit(".", 1)[0].rsplit("_", 1)[-1]
    return (int(stem), name) if stem.isdigit() else (1 << 30, name)


def train_slice(data: Path, n: int, dest: Path) -> tuple[Path, int]:
    """A class-balanced slice of ``n`` train photos as a Tiny-ImageNet train folder of links
    (each class's first photos by number, the first ``n % C`` classes one more), with each
    class's box lines for them; the original folder when ``n`` covers it. (folder, photos)."""
    train = data / "train"
    classes = [c for c in (data / "wnids.txt").read_text().split() if c]
    files = {c: sorted(os.listdir(train / c / "images"), key=_file_index) for c in classes}
    total = sum(len(v) for v in files.values())
    if n >= total:
        return train, total
    per, extra = divmod(n, len(classes))
    if per == 0:
        raise SystemExit(f"--scales {n}: fewer photos than the {len(classes)} classes")
    done = dest / ".slice.json"  # written last: a rerun reuses a finished slice
    if done.exists() and json.loads(done.read_text()).get("n") == n:
        return dest, n
    if dest.exists():
        shutil.rmtree(dest)
    count = 0
    for i, c in enumerate(classes):
        take = files[c][: per + (i < extra)]
        (dest / c / "images").mkdir(parents=True)
        for name in take:
            os.symlink(train / c / "images" / name, dest / c / "images" / name)
        keep = set(take)
        box_file = train / c / f"{c}_boxes.txt"
        lines = box_file.read_text().splitlines() if box_file.exists() else []
        kept = [ln for ln in lines if ln.split("\t")[0].split()[0] in keep] if lines else []
        (dest / c / f"{c}_boxes.txt").write_text("".join(ln + "\n" for ln in kept))
        count += len(take)
    done.write_text(json.dumps({"n": count, "source": str(train)}))
    return dest, count


def val_slice(data: Path, n: int | None, dest: Path) -> tuple[Path, int]:
    """The first ``n`` lines of ``val_annotations.txt`` (Tiny-ImageNet lists val photos in
    mixed class order) as a box file; the original when ``n`` is None or covers it."""
    full = data / "val" / "val_annotations.txt"
    lines = [ln for ln in full.read_text().splitlines() if ln.strip()]
    if n is None or n >= len(lines):
        return full, len(lines)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(ln + "\n" for ln in lines[:n]))
    return dest, n


def _per_shard(n: int, shards: int = 8) -> str:
    """--max-samples-per-shard giving ~``shards`` shards: work for both workers and actors."""
    return str(max(1, -(-n // shards)))


# ------------------------------------------------------------------------------ results
def _box_entry(boxes: dict) -> dict:
    """metric -> {value, interval (held-out, the headline), fixed, oracle} from eval.json."""
    out = {}
    for m in METRICS:
        out[m] = {
            "value": boxes["heldout"][m],
            "interval": boxes["heldout"][f"{m}_interval"],
            "fixed": boxes["fixed"][m],
            "fixed_interval": boxes["fixed"][f"{m}_interval"],
            "oracle": boxes["oracle"][m],
        }
    out["images"] = boxes["images"]
    return out


def whole_image_baseline(val_url: str, n_classes: int, n_boot: int = 2000) -> dict:
    """The floor every map must beat: the box of the whole photo for every labelled class.
    GT-known loc (IoU >= 0.5 with a true box of the class) and MaxBoxAccV2 (mean over IoU
    0.3 / 0.5 / 0.7; a constant box has no threshold to choose), with 95% bootstrap intervals
    over the photos."""
    images, _ = read_val_images(val_url, None, 0, 1, n_classes, need_mask=False)
    best = []  # per photo: mean over its labelled classes of the best IoU of the whole box
    for im in images:
        if im.boxes is None or not len(im.boxes):
            continue
        h, w = im.rgb.shape[-2:]
        ious = []
        for k in im.labels:
            rows = im.boxes[im.boxes[:, 0] == k, 1:]
            ious.append(float(box_iou_matrix([[0, 0, w, h]], rows).max()) if len(rows) else 0.0)
        best.append(ious)
    flat = [(i, v) for i, ious in enumerate(best) for v in ious]
    iou = np.array([v for _, v in flat])
    photo = np.array([i for i, _ in flat])

    def scores(weights: np.ndarray) -> tuple[float, float]:
        wt = weights[photo]
        acc = [float((wt * (iou >= d)).sum() / wt.sum()) for d in (0.3, 0.5, 0.7)]
        return acc[1], float(np.mean(acc))

    gt_known, maxbox = scores(np.ones(len(best)))
    rng = np.random.default_rng(0)
    draws = np.array(
        [
            scores(rng.multinomial(len(best), np.full(len(best), 1 / len(best))))
            for _ in range(n_boot)
        ]
    )
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return {
        "images": len(best),
        "gt_known_loc": {"value": gt_known, "interval": [float(low[0]), float(high[0])]},
        "max_box_acc_v2": {"value": maxbox, "interval": [float(low[1]), float(high[1])]},
    }


def small_object_scores(
    cfgs: dict, cams_dirs: dict[str, Path], max_area: float = 0.5, n_boot: int = 2000
) -> dict:
    """Box scores on the photos whose every true box covers less than ``max_area`` of the
    photo, where the whole-photo box has IoU < 0.5 and so scores 0 (the maps must find the
    object to count). Per map set: GT-known loc and MaxBoxAccV2 at held-out thresholds (chosen
    within the subset) with 95% intervals; paired differences as ``COMPARISONS``."""
    subset: set[str] | None = None
    evals = {}
    for name, cams_dir in cams_dirs.items():
        ev = BoxEvaluation(cfgs[name].cams.bg_threshold)
        keep: set[str] = set()
        counts: dict = {}
        for key, _raw, meta, stored, scores, _gt, boxes in mapped_images(
            cfgs[name], str(cams_dir), counts, log=lambda *_: None
        ):
            if boxes is None:
                continue
            h, w = meta["size"]
            area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2]) / float(h * w)
            if float(area.max()) < max_area:
                ev.add(key, meta, stored, scores, boxes)
                keep.add(key)
        subset = keep if subset is None else subset & keep
        evals[name] = ev
    out: dict = {"max_area": max_area, "images": len(subset or ()), "maps": {}, "comparisons": []}
    for name, ev in evals.items():
        out["maps"][name] = {
            m: box_interval(ev.sweeps, m, "heldout", n_boot=n_boot).to_dict()
            for m in ("gt_known_loc", "max_box_acc_v2")
        }
    for a, b in COMPARISONS:
        if a in evals and b in evals:
            out["comparisons"].append(
                {
                    "a": a,
                    "b": b,
                    **{
                        m: box_paired_difference(
                            [evals[a].sweeps], [evals[b].sweeps], m, "heldout", n_boot=n_boot
                        ).to_dict()
                        for m in ("gt_known_loc", "max_box_acc_v2")
                    },
                }
            )
    return out


def pair_stats(metrics_path: Path) -> list[dict]:
    """Per epoch, the pair pool's figures from the run's end-of-epoch metrics records."""
    rows, speeds = [], []
    if not metrics_path.exists():
        return rows
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if not r.get("epoch_end"):
            if r.get("images_per_s"):
                speeds.append(r["images_per_s"])
            continue
        speed = sum(speeds) / len(speeds) if speeds else r.get("images_per_s")
        speeds = []
        rows.append(
            {
                "epoch": r.get("epoch"),
                "partner_share": r.get("pair_partner_share"),
                "mean_wait": r.get("pair_mean_wait"),
                "dropped": r.get("pair_dropped"),
                "unshared": r.get("pair_unshared"),
                "images_per_s": speed,  # the mean over the epoch's progress reports
                "loss": r.get("total"),
            }
        )
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _ci(iv) -> str:
    return "" if not iv or None in iv else f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def markdown(doc: dict) -> str:
    """The tables of ``lid_rehearsal.md``."""
    lines = [
        f"# LID rehearsal: Tiny-ImageNet, {doc['n_train']} train / {doc['n_val']} val photos, "
        f"{doc['n_classes']} classes, {doc['resolution']} px",
        "",
        f"CPU: {doc['cpu']} ({doc['cores']} cores). Box scores in %, at held-out thresholds with "
        "[95% bootstrap interval over images]; fixed = cams.bg_threshold; oracle = an upper bound.",
        "",
        f"Every stage of every scale: {doc.get('stage_seconds_total', 0) / 60:.1f} min.",
        "",
        "| maps | GT-known loc | MaxBoxAccV2 | top-1 loc | top-1 cls | GT-known loc (fixed) | "
        "GT-known loc (oracle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in doc["maps"].items():
        cells = [_pct(e[m]["value"]) + _ci(e[m]["interval"]) for m in METRICS]
        cells += [_pct(e["gt_known_loc"]["fixed"]), _pct(e["gt_known_loc"]["oracle"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    whole = doc.get("whole_image")
    if whole:
        cells = [_pct(whole[m]["value"]) + _ci(whole[m]["interval"]) for m in METRICS[:2]]
        lines.append(f"| whole photo (floor) | {cells[0]} | {cells[1]} | | | | |")
    lines += [
        "",
        "Paired differences A − B, points, [95% bootstrap interval over images]:",
        "",
        "| A − B | metric | held-out | fixed | oracle |",
        "|---|---|---|---|---|",
    ]
    for c in doc["comparisons"]:
        for metric in c["heldout"]:
            cells = []
            for kind in KINDS:
                r = c[kind][metric]
                cells.append(
                    f"{100 * r['diff']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
                )
            lines.append(f"| {c['a']} − {c['b']} | {metric} | " + " | ".join(cells) + " |")
    small = doc.get("small_objects")
    if small:
        lines += [
            "",
            f"Photos whose every object covers under {100 * small['max_area']:.0f}% of the photo "
            f"({small['images']} photos; the whole-photo box scores 0 on them), held-out "
            "thresholds chosen within them:",
            "",
            "| maps | GT-known loc | MaxBoxAccV2 |",
            "|---|---|---|",
        ]
        for name, e in small["maps"].items():
            cells = [_pct(e[m]["value"]) + _ci([e[m]["low"], e[m]["high"]]) for m in METRICS[:2]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for c in small["comparisons"]:
            cells = []
            for m in METRICS[:2]:
                r = c[m]
                cells.append(
                    f"{100 * r['diff']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
                )
            lines.append(f"| {c['a']} − {c['b']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Pair pool (per epoch of the headline run; partner share = pushed photos that found a "
        "class-sharing partner, wait in photos pushed meanwhile):",
        "",
        "| epoch | partner % | mean wait | dropped | unshared | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for p in doc["pairs"]:
        wait = "n/a" if p["mean_wait"] is None else f"{p['mean_wait']:.1f}"
        ips = "n/a" if p["images_per_s"] is None else f"{p['images_per_s']:.1f}"
        lines.append(
            f"| {p['epoch']} | {_pct(p['partner_share'])} | {wait} | {p['dropped']} | "
            f"{p['unshared']} | {ips} |"
        )
    lines += [
        "",
        "Scaling (seconds and peak RSS per stage; images: train photos for shards/training, val "
        "photos for maps/scores):",
        "",
        "| n_train | stage | seconds | images | s/image | driver RSS MB | largest worker RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["scaling"]:
        lines.append(
            f"| {r['n_train']} | {r['stage']} | {r['seconds']:.1f} | {r['images']} | "
            f"{r['s_per_image']:.4f} | {r['peak_rss_mb']['driver']:.0f} | "
            f"{r['peak_rss_mb']['largest_worker']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the run
def build_val(
    data: Path, n_val: int | None, out: Path, ledger: Ledger, key: str
) -> tuple[str, int]:
    """Shards of the first ``n_val`` val photos (all when None) under ``out``: (url, photos)."""
    box_file, n_val = val_slice(data, n_val, out / "val_annotations.txt")
    build = ["shards", "build", "--source", "list", "--split", "val"]
    build += ["--image-root", str(data / "val" / "images"), "--classes", str(data / "wnids.txt")]
    build += ["--boxes", str(box_file), "--out", str(out / "shards_val")]
    workers = "1"  # at every size (10,100 photos, 25 MB, take seconds): no pool start to time
    build += ["--max-samples-per-shard", _per_shard(n_val), "--workers", workers, "--no-progress"]
    ledger.run(key, n_val, lambda: _ok(mcis(build)), ray=False)
    return str(out / "shards_val" / "val"), n_val


def run_scale(
    n: int,
    args,
    out: Path,
    ledger: Ledger,
    n_val: int | None,
    overrides: list[str],
    mapsets: dict[str, list[str]] = MAPSETS,
) -> dict:
    """Every stage at one train size, maps of the first ``n_val`` val photos (the map sets
    ``mapsets``, and the comparisons among them); returns the scale's results."""
    data = Path(args.data)
    tag = _tag(n)
    val_url, n_val = build_val(data, n_val, out / tag, ledger, f"{tag}/shards_val")
    folder, n_train = train_slice(data, n, out / "data" / f"train_{n}")
    shards = out / tag / "shards"
    train_url = str(shards / "train")
    build = ["shards", "build", "--source", "folder", "--folder-root", str(folder)]
    build += ["--classes", str(data / "wnids.txt"), "--boxes", "per-class", "--domain", "target"]
    build += ["--out", str(shards), "--max-samples-per-shard", _per_shard(n_train)]
    build += ["--workers", "1" if n_train <= 5000 else "0", "--no-progress"]  # 0: every core
    ledger.run(f"{tag}/shards_train", n_train, lambda: _ok(mcis(build)), ray=False)
    base = [
        f"run_root={out}",
        f"name={tag}",
        f"shards.url={shards}",
        f"cams.split_url={val_url}",
        f"cams.related_url={train_url}",
        *overrides,
    ]
    config = str(args.config)
    ledger.run(
        f"{tag}/train_cls", n_train, lambda: _ok(mcis(["train-cls", "--config", config, *base]))
    )
    maps, cfgs = {}, {}
    for name, keys in mapsets.items():
        cams_dir = out / tag / f"cams_{name}"
        cfg = load_config(config, [*base, *keys, f"cams.out_url={cams_dir}"])
        cfgs[name] = cfg
        ledger.run(f"{tag}/cams_{name}", n_val, lambda cfg=cfg: compute_cams(cfg, **QUIET))
        ledger.run(
            f"{tag}/eval_{name}", n_val, lambda cfg=cfg: evaluate_cams(cfg, **QUIET), ray=False
        )
        ev = json.loads((cams_dir / "eval" / "eval.json").read_text())
        maps[name] = _box_entry(ev["boxes"])
    comparisons = []
    for a, b in COMPARISONS:
        if a not in mapsets or b not in mapsets:
            continue
        where = out / tag / f"compare_{a}_{b}"

        def compare(a=a, b=b, where=where):
            compare_cams(
                cfgs[a],
                [str(out / tag / f"cams_{a}")],
                [str(out / tag / f"cams_{b}")],
                n_boot=args.boot,
                out_url=str(where),
                **QUIET,
            )

        ledger.run(f"{tag}/compare_{a}_{b}", n_val, compare, ray=False)
        boxes = json.loads((where / "compare.json").read_text())["boxes"]
        comparisons.append({"a": a, "b": b, **boxes})
    small = None
    if args.small_objects and len(mapsets) == len(MAPSETS):  # the headline scale
        small_file = out / tag / "small_objects.json"
        if not small_file.exists():
            dirs = {name: out / tag / f"cams_{name}" for name in mapsets}
            small_file.write_text(json.dumps(small_object_scores(cfgs, dirs, n_boot=args.boot)))
        small = json.loads(small_file.read_text())
    return {
        "n_train": n_train,
        "n_val": n_val,
        "small_objects": small,
        "val_url": val_url,
        "classes": json.loads((Path(val_url) / "manifest.json").read_text())["classes"],
        "maps": maps,
        "comparisons": comparisons,
        "pairs": pair_stats(out / tag / "cls" / "metrics.jsonl"),
        "resolution": load_config(config, base).data.crop_size,
        "cams_scales": list(load_config(config, base).cams.scales),
    }


def _tag(n: int) -> str:
    """The folder and ledger prefix of a scale: n1000, ..., nall."""
    return "nall" if n == ALL else f"n{n}"


def _scaled_val(n: int, fraction: float, cap: int | None) -> int:
    """Val photos of a smaller scale: ``fraction`` of its ``n`` train photos, at least 100,
    at most ``cap``."""
    want = max(100, round(n * fraction))
    return want if cap is None else min(cap, want)


def _ok(code: int) -> None:
    if code != 0:
        raise SystemExit(f"a stage failed (exit {code}); see the lines above")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the tiny-imagenet-200 folder")
    p.add_argument("--out", default="runs/lid_rehearsal")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--quick", action="store_true", help="2,000 train / 200 val photos")
    p.add_argument(
        "--scales",
        default=None,
        help="train sizes, 'all' for every train photo (default 1000,10000,all; quick 2000)",
    )
    p.add_argument("--n-val", type=int, default=None, help="val photos (default all; quick 200)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="val photos mapped at a smaller --scales, per train photo (at most --n-val)",
    )
    p.add_argument(
        "--scaling-maps",
        default="single,coatt",
        help="map sets of the smaller --scales (the largest maps all four; 'none': train only)",
    )
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument(
        "--no-small-objects",
        dest="small_objects",
        action="store_false",
        help="skip the scores on photos whose objects cover under half the photo",
    )
    p.add_argument("overrides", nargs="*", help="key=value for every run (after --quick's)")
    args = p.parse_args(argv)
    data = Path(args.data)
    for need in ("wnids.txt", "train", "val/val_annotations.txt", "val/images"):
        if not (data / need).exists():
            raise SystemExit(f"--data {data}: no {need} (expected a tiny-imagenet-200 folder)")
    wanted_scales = (args.scales or ("2000" if args.quick else "1000,10000,all")).split(",")
    scales = sorted(ALL if s.strip() == "all" else int(s) for s in wanted_scales)
    n_val_wanted = args.n_val if args.n_val is not None else (200 if args.quick else None)
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    load_config(args.config, overrides)  # a bad override fails here, before any stage
    wanted = [] if args.scaling_maps == "none" else args.scaling_maps.split(",")
    unknown = sorted(set(wanted) - set(MAPSETS))
    if unknown:
        raise SystemExit(
            f"--scaling-maps {', '.join(unknown)}: not a map set ({', '.join(MAPSETS)})"
        )
    scaling_maps = {k: v for k, v in MAPSETS.items() if k in wanted}
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "data": str(data.absolute()),
        "config": str(Path(args.config).absolute()),
        # an edited config is another run: its stages are not reused
        "config_sha1": hashlib.sha1(Path(args.config).read_bytes()).hexdigest(),
        "quick": args.quick,
        "scales": scales,
        "scaling_maps": sorted(scaling_maps),
        "n_val": n_val_wanted,
        "val_fraction": args.val_fraction,
        "overrides": overrides,
    }
    ledger = Ledger(out / "stages.json", settings)
    t0 = time.time()
    try:
        results = {}
        for n in scales:
            print(f"[n_train {_tag(n)[1:]}] ({time.time() - t0:.0f} s)", flush=True)
            head = n == scales[-1]
            # the headline maps every val photo asked for; a smaller scale the first
            # --val-fraction of its train size, so its maps cost grows with it as well
            nv = n_val_wanted if head else _scaled_val(n, args.val_fraction, n_val_wanted)
            maps = MAPSETS if head else scaling_maps
            results[n] = run_scale(n, args, out, ledger, nv, overrides, maps)
    finally:
        if ledger.started_ray:
            ray.shutdown()
    head = results[scales[-1]]
    tag = _tag(scales[-1])
    classes, n_val = head["classes"], head["n_val"]
    scaling = []
    for n in scales:
        for key, row in ledger.rows.items():
            if key.startswith(f"{_tag(n)}/"):
                scaling.append(
                    {"n_train": results[n]["n_train"], "stage": key.split("/")[1], **row}
                )
    doc = {
        "data": str(data.absolute()),
        "config": settings["config"],
        "overrides": overrides,
        "quick": args.quick,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "n_train": head["n_train"],
        "n_val": n_val,
        "n_classes": len(classes),
        "resolution": head["resolution"],
        "cams_scales": head["cams_scales"],
        "stage_seconds": {
            r["stage"]: r["seconds"] for r in scaling if r["n_train"] == head["n_train"]
        },
        "scaling": scaling,
        "pairs": head["pairs"],
        "whole_image": whole_image_baseline(head["val_url"], len(classes), args.boot),
        "maps": head["maps"],
        "comparisons": head["comparisons"],
        "small_objects": head["small_objects"],
        "seconds": round(time.time() - t0, 1),
        # every stage's first run, all scales: the rehearsal's cost (without Ray's start)
        "stage_seconds_total": round(sum(r["seconds"] for r in ledger.rows.values()), 1),
        "note": "maps: box scores of the val photos (mcis eval cams), value and interval at "
        "held-out thresholds (95% bootstrap over images), fixed = cams.bg_threshold, oracle = "
        "chosen on the scored boxes (an upper bound); comparisons: compare_cams's paired "
        "differences; seconds of a stage skipped on a rerun are those of its first run; "
        "seconds: this invocation's wall time, stage_seconds_total: the sum over every stage "
        "of every scale",
    }
    (out / "lid_rehearsal.json").write_text(json.dumps(doc, indent=1))
    (out / "lid_rehearsal.md").write_text(markdown(doc))
    for name in MAPSETS:
        figure = out / tag / f"cams_{name}" / "eval" / "overlays.png"
        if figure.exists():
            shutil.copyfile(figure, out / f"overlays_{name}.png")
    print(markdown(doc))
    print(f"written: {out}/lid_rehearsal.json, lid_rehearsal.md ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
