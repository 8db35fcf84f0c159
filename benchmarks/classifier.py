"""Forward+backward throughput of the full co-attention classifier against the basic classifier
(backbone + φ + GAP, Eq. 1 only) on the same backbone and inputs, measured in the same run.

CPU: the demo backbone (ResNet-38 tiny) at the demo crop, also with ``freeze_backbone`` (the head
trained alone, the backbone without autograd: the LID rehearsal's setting). GPU (when torch sees
one): ResNet-38 at 448×448 in fp32 and under bf16 autocast. Images/s counts both images of each
pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcis_dist.losses import mcis_loss
from mcis_dist.models.backbones import build_backbone
from mcis_dist.models.mcis import MCISClassifier

from common import parse_args, print_table, timeit, write_results


def step_fn(model, batch, basic: bool, amp_dtype=None):
    xm, xn, ym, yn = batch
    device_type = xm.device.type

    def step():
        with torch.autocast(
            device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
        ):
            if basic:  # Eq. 1 only: each image through backbone, φ, GAP
                feats = model.backbone(torch.cat([xm, xn]))
                logits = model.phi(feats).mean(dim=(2, 3))
                loss = F.multilabel_soft_margin_loss(logits.float(), torch.cat([ym, yn]))
            else:
                out = model(xm, xn)
                loss = mcis_loss(out, ym, yn, epoch=5)["total"]
        model.zero_grad(set_to_none=True)
        loss.backward()
        if device_type == "cuda":
            torch.cuda.synchronize()

    return step


def run_case(
    name, backbone_name, size, batch, repeat, device, amp_dtype=None, frozen=False
) -> list[dict]:
    torch.manual_seed(0)
    model = MCISClassifier(build_backbone(backbone_name), num_classes=20, freeze_backbone=frozen)
    model = model.to(device).train()
    k = 20
    xm, xn = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
    ym = (torch.rand(batch, k, device=device) < 0.15).float()
    yn = ym.clone()
    rows = []
    for basic in (False,) if frozen else (True, False):
        t = timeit(step_fn(model, (xm, xn, ym, yn), basic, amp_dtype), repeat=repeat, warmup=1)
        rows.append(
            {
                "case": f"{name}_{'basic' if basic else 'mcis'}",
                "backbone": backbone_name,
                "size": size,
                "pairs": batch,
                "seconds": t.best,
                "images_per_s": 2 * batch / t.best,
            }
        )
    return rows


def main():
    args = parse_args("classifier", __doc__)
    repeat = 2 if args.quick else 5
    rows = run_case("cpu_tiny", "resnet38_tiny", 128, 8, repeat, "cpu")
    rows += run_case("cpu_tiny_frozen", "resnet38_tiny", 128, 8, repeat, "cpu", frozen=True)
    metrics = {"gpu": "not available"}
    if torch.cuda.is_available():
        metrics["gpu"] = torch.cuda.get_device_name()
        n = 2 if args.quick else 10
        rows += run_case("gpu_r38_fp32", "resnet38", 448, 4, n, "cuda")
        rows += run_case("gpu_r38_bf16", "resnet38", 448, 4, n, "cuda", torch.bfloat16)
    print_table(
        rows,
        ["case", "backbone", "size", "pairs", "seconds", "images_per_s"],
        "forward+backward, best of runs; images/s counts both images of a pair",
    )
    by = {r["case"]: r for r in rows}
    ratios = {
        "cpu_tiny_mcis_vs_basic": by["cpu_tiny_mcis"]["images_per_s"]
        / by["cpu_tiny_basic"]["images_per_s"],
        "cpu_tiny_frozen_vs_full": by["cpu_tiny_frozen_mcis"]["images_per_s"]
        / by["cpu_tiny_mcis"]["images_per_s"],
    }
    if "gpu_r38_fp32_mcis" in by:
        ratios["gpu_r38_bf16_vs_fp32"] = (
            by["gpu_r38_bf16_mcis"]["images_per_s"] / by["gpu_r38_fp32_mcis"]["images_per_s"]
        )
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    metrics["cases"] = rows
    write_results(args.out, "classifier", metrics, ratios)


if __name__ == "__main__":
    main()
