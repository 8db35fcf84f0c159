"""Evaluation shared by CAM, pseudo-mask and segmentation evaluation: metrics and pictures."""

from mcis_dist.evaluation.metrics import (
    ConfusionMatrix,
    ThresholdSweep,
    format_table,
    parse_thresholds,
)
from mcis_dist.evaluation.overlay import (
    blend,
    cam_panel,
    colorize,
    heatmap,
    palette,
    save_grid,
    upload_grid,
)

__all__ = [
    "ConfusionMatrix",
    "ThresholdSweep",
    "blend",
    "cam_panel",
    "colorize",
    "format_table",
    "heatmap",
    "palette",
    "parse_thresholds",
    "save_grid",
    "upload_grid",
]
