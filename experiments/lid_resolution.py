"""Which input resolution for Tiny-ImageNet's 64x64 photos? Cost against a localization check.

EfficientNet-Lite0 at output stride 8 (``mcis_dist.models.efficientnet``) turns a 64x64 photo into
an 8x8 map: one cell is an eighth of the image, coarse for boxes that are often half of it. An
upscale gives finer maps at a cost that grows with the pixel count. Before training anything,
this measures both on the real val images, with the ImageNet weights alone (no fine-tuning):

* **cost**: seconds of one forward + backward of the backbone on a batch of ``--batch`` images
  at R x R with one torch thread (one Ray Train worker's core), median of ``--repeats``;
* **localization ceiling**: per val image, two training-free maps on the stride-8 grid at R,
  bilinearly resized to the 64x64 image and max-normalised: the mean of the 1280 head channels
  (class-agnostic objectness), and the class activation map of the ImageNet classifier's own
  top-1 class (the wheel's ``_fc`` on the same features: Zhou et al.'s CAM). Each is scored as
  ``mcis eval cams`` scores boxes (``BoxSweeps``: the largest region's box, GT-known loc at IoU
  0.5 and MaxBoxAccV2, at held-out thresholds) against the val box.

For scale, ``whole_image``: the same scores of a map that is one everywhere (its box is the
whole photo): Tiny-ImageNet's objects often fill most of the photo, so this is the floor a map
must beat.

These bound what map resolution allows, not what MCIS will reach; they are for choosing R.

    python experiments/lid_resolution.py --data /data/tiny-imagenet-200 --images 300 \
        --sizes 64,96,128,160 --out runs/lid_resolution.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mcis_dist.evaluation.boxes import BoxSweeps, box_metric
from mcis_dist.models.efficientnet import efficientnet_lite0, wheel_weights_path

METRICS = ("gt_known_loc", "max_box_acc_v2")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def val_images(data: Path, n: int) -> list[tuple[str, np.ndarray, list[int]]]:
    """The first ``n`` val images of ``val_annotations.txt`` (file, RGB, half-open box)."""
    path = data / "val" / "val_annotations.txt"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (--data must be a tiny-imagenet-200 folder)")
    out = []
    for line in path.read_text().splitlines()[:n]:
        name, _wnid, x0, y0, x1, y1 = line.split("\t")[:6]
        rgb = np.array(Image.open(data / "val" / "images" / name).convert("RGB"))
        out.append((name, rgb, [int(x0), int(y0), int(x1) + 1, int(y1) + 1]))  # inclusive
    return out


def _norm(m: torch.Tensor) -> np.ndarray:
    m = F.relu(m)
    return (m / m.amax().clamp_min(1e-8)).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the tiny-imagenet-200 folder")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sizes", default="64,96,128,160")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    images = val_images(Path(args.data), args.images)
    net = efficientnet_lite0(pretrained=True)
    fc = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    w_fc, b_fc = fc["_fc.weight"], fc["_fc.bias"]  # (1000, 1280), (1000,)
    whole = BoxSweeps()
    for name, rgb, box in images:
        whole.add(name, np.ones((1, *rgb.shape[:2]), np.float32), [0], [[0, *box]])
    baseline = {m: round(float(box_metric(whole, m, "heldout")), 4) for m in METRICS}
    print(json.dumps({"whole_image": baseline}), flush=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        net.train()  # BatchNorm stays frozen (the pretrained default); only timing
        x = torch.randn(args.batch, 3, size, size)
        times = []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            net(x).mean().backward()
            times.append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
        net.eval()
        sweeps = {"objectness": BoxSweeps(), "imagenet_top1_cam": BoxSweeps()}
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, rgb, box in images:
                img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
                h, w = rgb.shape[:2]
                img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
                f = net((img - MEAN) / STD)  # (1, 1280, size/8, size/8)
                top1 = int((f.mean((2, 3)) @ w_fc.T + b_fc).argmax())
                maps = {
                    "objectness": f[0].mean(0),
                    "imagenet_top1_cam": torch.einsum("chw,c->hw", f[0], w_fc[top1]),
                }
                for kind, m in maps.items():
                    m = F.interpolate(m[None, None], size=(h, w), mode="bilinear")[0]
                    sweeps[kind].add(name, _norm(m), [0], [[0, *box]])
        row = {
            "size": size,
            "map_cells": (size + 7) // 8,
            "train_step_s": round(statistics.median(times[1:]), 3),
            "train_s_per_image": round(statistics.median(times[1:]) / args.batch, 4),
            "map_s_per_image": round((time.perf_counter() - t0) / len(images), 4),
            "images": len(images),
        }
        for kind, sw in sweeps.items():
            for metric in METRICS:
                row[f"{kind}_{metric}"] = round(float(box_metric(sw, metric, "heldout")), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"rows": rows, "whole_image": baseline, "args": vars(args)}
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
