"""Segmentation throughput: DeepLab training images/s (one process, the step the Ray workers run)
and evaluation images/s single-scale, multi-scale × flip, and with the dense CRF.

CPU: DeepLab-V3 on ResNet-18 (the demo's network) at 128×128 crops, batch 8, one thread;
evaluation on 128-176 px images (the built-in dataset's sizes), 21 classes. Ratios: fp32 is the
training baseline (bf16 autocast against it); single-scale is the evaluation baseline.
GPU (when torch sees one): DeepLab-V3 ResNet-101 at 512×512, batch 8, fp32 against AMP (fp16
autocast + GradScaler).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mcis_dist.crf import crf_inference
from mcis_dist.models.deeplab import deeplabv3
from mcis_dist.seg.infer import predict_labels

from common import parse_args, print_table, timeit, write_results


def train_case(name, backbone, size, batch, steps, device, amp=None) -> dict:
    torch.manual_seed(0)
    model = deeplabv3(backbone, num_classes=21).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 21, (batch, size, size), device=device)

    def run():
        for _ in range(steps):
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    t = timeit(run, repeat=2, warmup=1)
    return {"case": name, "images_per_s": steps * batch / t.best, "seconds": t.best}


def eval_case(name, model, images, scales, flip, crf) -> dict:
    def run():
        for rgb in images:
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
            predict_labels(
                model,
                x,
                scales=scales,
                flip=flip,
                crf=crf_inference if crf else None,
                rgb=rgb if crf else None,
            )

    t = timeit(run, repeat=2, warmup=0)
    return {"case": name, "images_per_s": len(images) / t.best, "seconds": t.best}


def main():
    args = parse_args("seg", __doc__)
    torch.set_num_threads(1)
    steps = 2 if args.quick else 6
    rows = [
        train_case("train_r18_128_fp32", "resnet18", 128, 8, steps, "cpu"),
        train_case("train_r18_128_bf16", "resnet18", 128, 8, steps, "cpu", torch.bfloat16),
    ]
    rng = np.random.default_rng(0)
    n = 4 if args.quick else 12
    images = [
        rng.integers(
            0, 255, (int(rng.integers(128, 177)), int(rng.integers(128, 177)), 3), dtype=np.uint8
        )
        for _ in range(n)
    ]
    model = deeplabv3("resnet18", num_classes=21).eval()
    rows += [
        eval_case("eval_single_scale", model, images, (1.0,), False, False),
        eval_case("eval_ms_x_flip", model, images, (0.5, 0.75, 1.0, 1.25, 1.5), True, False),
        eval_case("eval_single_crf", model, images, (1.0,), False, True),
    ]
    metrics = {"gpu": "not available"}
    if torch.cuda.is_available():
        metrics["gpu"] = torch.cuda.get_device_name()
        rows += [
            train_case("gpu_train_r101_512_fp32", "resnet101", 512, 8, 10, "cuda"),
            train_case("gpu_train_r101_512_amp", "resnet101", 512, 8, 10, "cuda", torch.float16),
        ]
    print_table(rows, ["case", "images_per_s", "seconds"], "DeepLab-V3 throughput, best of runs")
    by = {r["case"]: r["images_per_s"] for r in rows}
    ratios = {
        "train_bf16_vs_fp32": by["train_r18_128_bf16"] / by["train_r18_128_fp32"],
        "eval_ms_x_flip_vs_single": by["eval_ms_x_flip"] / by["eval_single_scale"],
        "eval_crf_vs_single": by["eval_single_crf"] / by["eval_single_scale"],
    }
    if "gpu_train_r101_512_amp" in by:
        ratios["gpu_amp_vs_fp32"] = by["gpu_train_r101_512_amp"] / by["gpu_train_r101_512_fp32"]
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    metrics["cases"] = rows
    write_results(args.out, "seg", metrics, ratios)


if __name__ == "__main__":
    main()
