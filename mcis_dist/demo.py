"""``mcis demo``: the whole pipeline on the built-in dataset, explained as it goes.

Builds the synthetic dataset's shards, shows a batch of training pairs, then runs
``mcis pipeline`` (classifier, CAMs, AffinityNet, pseudo masks, DeepLab, evaluation) on an
embedded local Ray and prints the table of the run report.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mcis_dist.config import ExperimentConfig, load_config, write_run_config
from mcis_dist.data.loader import PairLoader
from mcis_dist.formats.shards import summarize
from mcis_dist.pipeline import run_pipeline
from mcis_dist.report import summary_table
from mcis_dist.shards.build import build_dataset, build_options
from mcis_dist.shards.synthetic import synthetic_spec
from mcis_dist.storage import open_storage

DEFAULT_CONFIG = Path("configs/demo.yaml")


def pair_grid(batch: dict, classes: list[str], mean, std, rows: int = 4) -> bytes:
    """PNG bytes: ``rows`` pairs side by side, each image captioned with its classes."""

    def to_uint8(x):  # (3, S, S) normalised → (S, S, 3) uint8
        x = x.cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        return (x.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()

    n = min(rows, len(batch["key_m"]))
    size = batch["image_m"].shape[-1]
    canvas = Image.new("RGB", (2 * size + 12, n * (size + 16)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        for j, side in enumerate(("m", "n")):
            x, y = j * (size + 12), i * (size + 16)
            canvas.paste(Image.fromarray(to_uint8(batch[f"image_{side}"][i])), (x, y))
            names = [classes[k] for k in np.nonzero(batch[f"labels_{side}"][i].cpu().numpy())[0]]
            draw.text((x + 2, y + size + 2), ", ".join(names), fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def run_demo(config_path: str | None = None, overrides: list[str] | tuple = ()) -> int:
    path = config_path or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path, overrides, schema=ExperimentConfig)
    run = open_storage(cfg.run_root, endpoint_url=cfg.shards.endpoint_url).child(cfg.name)
    run.check_writable()
    write_run_config(cfg, run)
    t0 = time.perf_counter()
    print(f"mcis demo: experiment '{cfg.name}' (config: {path or 'built-in defaults'})")
    print(f"  resolved config saved to {run.describe('config.yaml')}")
    print(
        "\nMCIS learns segmentation from image-level labels only. The demo runs every stage on a "
        "built-in dataset of shapes, on this machine, with an embedded Ray:\n"
        "  1. shards      the images as WebDataset shards (labels: which classes each image holds)\n"
        "  2. train-cls   a classifier trained on *pairs* of images with co-attention (Eq. 1-10)\n"
        "  3. cams        its localization maps (single-round and co-attentive), scored on masks\n"
        "  4. affinity    confident labels from the maps, then AffinityNet on them\n"
        "  5. masks       the random walk with AffinityNet's affinities: pseudo masks\n"
        "  6. seg         DeepLab trained on the pseudo masks, evaluated on the val masks\n"
        "Masks are used for evaluation only, never for training. Each stage is skipped when its "
        "output is complete: run the demo again and it picks up where it stopped."
    )
    print(
        f"\n[shards] {cfg.synthetic.num_train} train images and {cfg.synthetic.num_val} val "
        f"images, {cfg.synthetic.num_classes} classes, to {cfg.shards.url}"
    )
    shards = open_storage(cfg.shards.url, endpoint_url=cfg.shards.endpoint_url)
    manifests = build_dataset(
        "synthetic", shards, build_options(cfg), source_args={"spec": synthetic_spec(cfg)}
    )
    for split, manifest in manifests.items():
        print(summarize(manifest, shards.child(split).describe()))
    loader = PairLoader(cfg.data, rank=0, world_size=1)
    first = next(iter(loader))
    grid = pair_grid(first, loader.manifest["classes"], cfg.data.mean, cfg.data.std)
    run.write_bytes("pairs.png", grid)
    print(
        f"  training pairs share at least one class; a batch of them: {run.describe('pairs.png')}"
    )

    report = run_pipeline(cfg, log=lambda *_: None, say=print)
    print(f"\nmcis demo: done in {time.perf_counter() - t0:.0f} s.")
    width = max(len(w) for w, _ in summary_table(report))
    print(f"  {'what':<{width}}  value")
    for what, value in summary_table(report):
        print(f"  {what:<{width}}  {value:>5}")
    print(f"  seconds per stage: {report['stage_seconds']}")
    print(f"  the report with figures: {run.describe('report.md')}")
    print(
        "  Every stage has its own command (mcis train-cls, cams, affinity, masks, seg, eval, "
        "predict, export): see the README."
    )
    return 0
