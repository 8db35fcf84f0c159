"""Benchmark: training throughput of ``mcis train-cls`` on Ray Train with 1 and 2 workers.

The demo model (ResNet-38 tiny, co-attention classifier, the full Eq. 10 loss) is trained on the
CPU by ``python -m mcis_dist.cli train-cls`` subprocesses (each starts its own local Ray) on
synthetic shards built in the run (not timed): 8 pairs a batch per worker, crop 128, in-process
loading (``data.num_workers=0``), 1 torch thread per worker. Throughput comes from the run's
``metrics.jsonl``: every report window after the first (start-up) that trained images, images
summed over workers, divided by the windows' summed seconds (the controller's time between
reports; consecutive windows telescope, so the 0.2 s report polling only blurs the ends). Per
worker = all workers' images/s / workers; scaling efficiency = 2-worker per-worker images/s /
1-worker images/s.

Baseline, same run: the same model, loss and optimiser stepping (``train_one_epoch`` of
``mcis_dist.train.classifier``) in a plain torch loop in this process on random tensors of the
same shape, 1 torch thread: pure compute, so 1-worker Ray / baseline is what Ray + DDP + the
loader cost. Each run's wall time (Ray start-up included) is reported too.

On a GPU also ResNet-38 at 448x448 (1 worker, 4 pairs a batch), fp32 against bf16 autocast with
channels_last, and their share of the GPU's dense bf16 peak (FLOPs counted by torch's
FlopCounterMode on one training step).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mcis_dist.config import load_config
from mcis_dist.losses import mcis_loss
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.build import build_model
from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.runtime.optim import build_optimizer, make_scheduler
from mcis_dist.train.classifier import LossView, train_one_epoch

from common import parse_args, print_table, timeit, write_results

NAME = "train_throughput"
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "PYTHONUNBUFFERED": "1",
}
BATCH = 8  # pairs per batch per worker (CPU)
CROP = 128
# the full loss from the first step (the demo's default starts the contrastive term at epoch 2;
# real runs spend most epochs with it), so no epoch runs a partial model
CPU = [
    "data.num_workers=0",
    f"data.batch_size={BATCH}",
    f"data.crop_size={CROP}",
    "data.resize_long=[128,192]",
    "train.torch_threads=1",
    "train.contrastive_from_epoch=0",
]
GPU_BATCH = 4
GPU = [
    "train.use_gpu=true",
    "model.backbone=resnet38",
    "data.crop_size=448",
    "data.resize_long=[448,512]",
    f"data.batch_size={GPU_BATCH}",
    "train.contrastive_from_epoch=0",
]
# train images, epochs, report every K steps (K divides the steps of an epoch for 1 and 2
# workers, so the epoch-end report, which writes a checkpoint, trains no images)
SIZES = {True: (256, 1, 4), False: (640, 2, 5)}
# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name
BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def build_shards(out: Path, num_train: int) -> int:
    """Synthetic train shards (not timed); returns the number of classes."""
    cmd = [
        sys.executable,
        "-m",
        "mcis_dist.cli",
        "shards",
        "build",
        "--source",
        "synthetic",
        "--split",
        "train",
        "--num-train",
        str(num_train),
        "--shard-size",
        "0.5",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == num_train, manifest["num_samples"]
    return len(manifest["classes"])


def overrides(shards: Path, run_root: Path, workers: int, epochs: int, every: int) -> list[str]:
    return [
        f"shards.url={shards}",
        f"run_root={run_root}",
        f"train.num_workers={workers}",
        f"train.epochs={epochs}",
        f"train.report_every_steps={every}",
        "train.max_failures=0",
        "train.checkpoint_every_steps=0",
    ]


def ray_run(case, shards, tmp, *, workers, epochs, every, num_train, batch, extra) -> dict:
    """One ``train-cls`` subprocess; checks it and returns its throughput row."""
    run_root = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=tmp))
    cmd = [
        sys.executable,
        "-m",
        "mcis_dist.cli",
        "train-cls",
        "--config",
        str(CONFIG),
        *overrides(shards, run_root, workers, epochs, every),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ENV  # a local Ray
    start, t0 = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    wall = time.perf_counter() - t0
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"{case}: exit {proc.returncode}\n{tail}"
    lines = (run_root / "demo" / "cls" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]

    steps = epochs * (num_train // (workers * batch))  # every rank's batches per epoch
    last = records[-1]
    assert last["step"] == steps and last["epoch"] == epochs, (case, last, steps)
    assert f"train-cls: done, epoch {epochs} step {steps}," in proc.stdout, tail
    images = sum(r.get("images", 0) for r in records)
    assert images == steps * workers * 2 * batch, (case, images, steps)  # m and n images
    for r in records:
        assert r["skipped_steps"] == 0, (case, r)
        assert r["loader_bad_decode"] == r["loader_bad_record"] == r["loader_shard_errors"] == 0
    assert math.isfinite(last["total"]), (case, last)

    timed = [r for r in records[1:] if r.get("images")]  # the first window holds the start-up
    assert len(timed) >= 2, (case, len(timed))
    seconds = [r["images"] / r["images_per_s"] for r in timed]
    ips = sum(r["images"] for r in timed) / sum(seconds)
    wait = sum(r["data_wait_share"] * s for r, s in zip(timed, seconds, strict=True))
    return {
        "case": case,
        "workers": workers,
        "steps": steps,
        "images": images,
        "windows": len(timed),
        "images_per_s": ips,
        "per_worker_images_per_s": ips / workers,
        "data_wait_share": wait / sum(seconds),
        "timed_s": sum(seconds),
        "first_report_s": records[0]["time"] - start,
        "wall_s": wall,
        "end_to_end_images_per_s": images / wall,
    }


class RandomBatches:
    """What ``train_one_epoch`` needs of a loader: ``device`` and an iterable of batches."""

    def __init__(self, steps: int, batch: int, size: int, num_classes: int, device="cpu"):
        g = torch.Generator().manual_seed(0)
        self.device = torch.device(device)
        self.batches = []
        for _ in range(steps):
            ym = (torch.rand(batch, num_classes, generator=g) < 0.2).float()
            yn = (torch.rand(batch, num_classes, generator=g) < 0.2).float()
            shared = torch.randint(num_classes, (batch,), generator=g)
            ym[torch.arange(batch), shared] = yn[torch.arange(batch), shared] = 1.0  # a pair
            self.batches.append(
                {
                    "image_m": torch.randn(batch, 3, size, size, generator=g).to(device),
                    "image_n": torch.randn(batch, 3, size, size, generator=g).to(device),
                    "labels_m": ym.to(device),
                    "labels_n": yn.to(device),
                    "pair_type": torch.zeros(batch, dtype=torch.long, device=device),
                }
            )

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def baseline(
    shards: Path,
    tmp: Path,
    num_classes: int,
    steps: int,
    repeat: int,
    case: str = "plain_torch_1thread",
    extra: tuple[str, ...] = (),
) -> dict:
    """The training step without Ray, DDP or loader: 1 thread, random tensors, same code."""
    cfg = load_config(CONFIG, [*overrides(shards, tmp, 1, 1, 1), *CPU, *extra])
    torch.manual_seed(cfg.train.seed)
    model = LossView(build_model(cfg, num_classes))
    loader = RandomBatches(steps, BATCH, CROP, num_classes)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, iters_per_epoch=len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"epoch": 0, "step": 0, "skipped": 0}
    losses: list[float] = []

    def epoch():
        train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            scaler,
            cfg,
            0,
            state,
            lambda m: losses.append(m["total"]),
        )

    t = timeit(epoch, repeat=repeat, warmup=1)
    assert state["step"] == steps * (repeat + 1) == len(losses) and state["skipped"] == 0
    assert all(math.isfinite(v) for v in losses), losses
    images = 2 * BATCH * steps
    return {
        "case": case,
        "workers": 1,
        "steps": steps * repeat,
        "images": images * repeat,
        "images_per_s": images / t.median,
        "per_worker_images_per_s": images / t.median,
        "best_images_per_s": images / t.best,
        "timed_s": sum(t.runs),
    }


def _baseline_process(barrier, queue, *args) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    queue.put(baseline(*args))


def baseline_concurrent(processes: int, *args) -> dict:
    """``baseline`` in ``processes`` spawned processes at once: what the cores give two
    independent trainings (shared caches, memory bandwidth, clocks), no Ray, no DDP."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_baseline_process, args=(barrier, queue, *args))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0, p.exitcode
    ips = sum(r["images_per_s"] for r in rows)
    return {
        "case": f"plain_torch_{processes}proc",
        "workers": processes,
        "steps": sum(r["steps"] for r in rows),
        "images": sum(r["images"] for r in rows),
        "images_per_s": ips,
        "per_worker_images_per_s": ips / processes,
        "timed_s": max(r["timed_s"] for r in rows),
    }


def train_flops_per_image(backbone: str, size: int, pairs: int, num_classes: int, device) -> float:
    """FLOPs of one forward+backward of the full classifier and loss, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MCISClassifier(build_backbone(backbone), num_classes=num_classes).to(device).train()
    xm, xn = (torch.randn(pairs, 3, size, size, device=device) for _ in range(2))
    ym = torch.zeros(pairs, num_classes, device=device)
    ym[:, 0] = 1.0
    with FlopCounterMode(display=False) as counter:
        out = model(xm, xn)
        mcis_loss(out, ym, ym.clone(), epoch=0, contrastive_from_epoch=0)["total"].backward()
    del model, out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counter.get_total_flops() / (2 * pairs)


def gpu_cases(shards, tmp, num_train, num_classes, quick) -> tuple[list[dict], dict, dict]:
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in BF16_PEAK if key in name), None)
    flops = train_flops_per_image("resnet38", 448, GPU_BATCH, num_classes, "cuda")
    every = 8 if quick else 10
    rows = []
    for case, amp in (
        ("gpu_r38_448_fp32", ["train.amp=none"]),
        ("gpu_r38_448_bf16_cl", ["train.amp=bf16", "train.channels_last=true"]),
    ):
        row = ray_run(
            case,
            shards,
            tmp,
            workers=1,
            epochs=1,
            every=every,
            num_train=num_train,
            batch=GPU_BATCH,
            extra=[*GPU, *amp],
        )
        row["tflop_per_s"] = flops * row["images_per_s"] / 1e12
        if peak:
            row["share_of_bf16_peak"] = flops * row["images_per_s"] / peak
        rows.append(row)
    by = {r["case"]: r for r in rows}
    ratios = {
        "gpu_bf16_cl_vs_fp32": by["gpu_r38_448_bf16_cl"]["images_per_s"]
        / by["gpu_r38_448_fp32"]["images_per_s"]
    }
    info = {
        "gpu": name,
        "gpu_bf16_peak_tflop_per_s": peak and peak / 1e12,
        "gpu_train_gflop_per_image": flops / 1e9,
    }
    return rows, ratios, info


def main():
    args = parse_args(NAME, __doc__)
    torch.set_num_threads(1)
    num_train, epochs, every = SIZES[args.quick]
    t_start = time.perf_counter()
    metrics: dict = {
        "gpu": "not available",
        "train_images": num_train,
        "epochs": epochs,
        "report_every_steps": every,
        "pairs_per_batch": BATCH,
        "crop": CROP,
    }
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-") as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        num_classes = build_shards(shards, num_train)
        sizes = (8, 3) if args.quick else (16, 5)  # baseline steps per epoch, timed epochs
        rows = [
            baseline(shards, tmp, num_classes, *sizes),
            # the attention diagnostics (one pair per step) cost, against the same loop without
            baseline(
                shards,
                tmp,
                num_classes,
                *sizes,
                case="plain_torch_no_diagnostics",
                extra=("train.diagnostics=false",),
            ),
            baseline_concurrent(2, shards, tmp, num_classes, *sizes),
        ]
        for workers in (1, 2):
            rows.append(
                ray_run(
                    f"ray_{workers}w",
                    shards,
                    tmp,
                    workers=workers,
                    epochs=epochs,
                    every=every,
                    num_train=num_train,
                    batch=BATCH,
                    extra=CPU,
                )
            )
        gpu_rows, gpu_ratios = [], {}
        if torch.cuda.is_available():
            gpu_rows, gpu_ratios, info = gpu_cases(shards, tmp, num_train, num_classes, args.quick)
            metrics.update(info)

    columns = [
        "case",
        "workers",
        "steps",
        "windows",
        "images_per_s",
        "per_worker_images_per_s",
        "data_wait_share",
        "timed_s",
        "first_report_s",
        "wall_s",
    ]
    print_table(
        rows,
        columns,
        "CPU, ResNet-38 tiny at 128x128, 8 pairs a batch per worker, "
        "1 torch thread per worker; images/s counts both images of a pair",
    )
    if gpu_rows:
        print_table(
            gpu_rows,
            [
                "case",
                "steps",
                "images_per_s",
                "data_wait_share",
                "tflop_per_s",
                "share_of_bf16_peak",
                "first_report_s",
                "wall_s",
            ],
            f"{metrics['gpu']}: ResNet-38 at 448x448, 4 pairs a batch, 1 worker",
        )
    by = {r["case"]: r for r in rows}
    base, one, two = by["plain_torch_1thread"], by["ray_1w"], by["ray_2w"]
    plain_scaling = by["plain_torch_2proc"]["per_worker_images_per_s"] / base["images_per_s"]
    ratios = {
        "scaling_efficiency_2w": two["per_worker_images_per_s"] / one["images_per_s"],
        "plain_torch_2proc_scaling": plain_scaling,
        "scaling_efficiency_2w_vs_plain": two["per_worker_images_per_s"]
        / one["images_per_s"]
        / plain_scaling,
        "ray_2w_vs_1w": two["images_per_s"] / one["images_per_s"],
        "ray_1w_vs_plain_torch": one["images_per_s"] / base["images_per_s"],
        "diagnostics_on_vs_off": base["images_per_s"]
        / by["plain_torch_no_diagnostics"]["images_per_s"],
        "ray_2w_per_worker_vs_plain_torch": two["per_worker_images_per_s"] / base["images_per_s"],
        "ray_1w_end_to_end_vs_plain_torch": one["end_to_end_images_per_s"] / base["images_per_s"],
        **gpu_ratios,
    }
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    metrics["cases"] = rows + gpu_rows
    metrics["benchmark_s"] = time.perf_counter() - t_start
    print(f"benchmark wall time {metrics['benchmark_s']:.1f} s")
    write_results(args.out, NAME, metrics, ratios)


if __name__ == "__main__":
    main()
