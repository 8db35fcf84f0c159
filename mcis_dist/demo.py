"""``mcis demo``: the whole pipeline, as far as it exists, on the built-in dataset.

Today that is the first stage: build the synthetic dataset's shards and print their summary.
Each later stage (classifier, localization maps, pseudo masks, segmentation) joins here.
"""

from __future__ import annotations

import time
from pathlib import Path

from mcis_dist.config import ExperimentConfig, dump_config, load_config
from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.manifest import summarize
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import open_storage

DEFAULT_CONFIG = Path("configs/demo.yaml")


def synthetic_spec(cfg: ExperimentConfig) -> SyntheticSpec:
    s = cfg.synthetic
    return SyntheticSpec(
        num_train=s.num_train,
        num_val=s.num_val,
        min_size=s.min_size,
        max_size=s.max_size,
        num_classes=s.num_classes,
        seed=s.seed,
    )


def build_options(cfg: ExperimentConfig, overwrite: bool = False) -> BuildOptions:
    sh = cfg.shards
    return BuildOptions(
        shard_size_mb=sh.shard_size_mb,
        workers=sh.workers,
        seed=sh.seed,
        verify=sh.verify,
        overwrite=overwrite,
    )


def run_demo(config_path: str | None = None, overrides: list[str] | tuple = ()) -> int:
    path = config_path or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path, overrides, schema=ExperimentConfig)
    run = open_storage(cfg.run_root, endpoint_url=cfg.shards.endpoint_url).child(cfg.name)
    run.check_writable()
    run.write_bytes("config.yaml", dump_config(cfg).encode())
    print(f"mcis demo: experiment '{cfg.name}' (config: {path or 'built-in defaults'})")
    print(f"  resolved config saved to {run.describe('config.yaml')}")
    print(
        "\n[1/1] Building the built-in dataset's WebDataset shards: "
        f"{cfg.synthetic.num_train} train images (image-level labels are all the classifier "
        f"will see) and {cfg.synthetic.num_val} val images with masks (for evaluation), "
        f"{cfg.synthetic.num_classes} classes, to {cfg.shards.url}"
    )
    t0 = time.perf_counter()
    shards = open_storage(cfg.shards.url, endpoint_url=cfg.shards.endpoint_url)
    manifests = build_dataset(
        "synthetic", shards, build_options(cfg), source_args={"spec": synthetic_spec(cfg)}
    )
    for split, manifest in manifests.items():
        print(summarize(manifest, shards.child(split).describe()))
    print(f"\nmcis demo: done in {time.perf_counter() - t0:.1f} s.")
    print(f"  Inspect the shards with `mcis shards info {cfg.shards.url}` and check them with")
    print(f"  `mcis shards verify {cfg.shards.url}`; the format is described in shards/README.md.")
    print(
        "  The next stages (classifier training, localization maps, pseudo masks, "
        "segmentation) are not built yet: see the Status table in the README."
    )
    return 0
