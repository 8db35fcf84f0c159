"""CAMs as label maps: upsampling to the image grid and thresholding (plain numpy / PyTorch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["cam_labels", "upsample_cams"]


def upsample_cams(maps: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """(L, h, w) maps at ``stride`` -> (L, H, W) float32 on the image's pixel grid."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.float32)
    if stride == 1 and maps.shape[1:] == tuple(size):
        return maps
    t = torch.from_numpy(maps)[None]  # (1, L, h, w)
    up = F.interpolate(
        t,
        size=(maps.shape[1] * stride, maps.shape[2] * stride),
        mode="bilinear",
        align_corners=False,
    )
    return up[0, :, : size[0], : size[1]].numpy()


def cam_labels(scores: np.ndarray, class_ids, threshold: float) -> np.ndarray:
    """(L, H, W) scores -> (H, W) label map: 0 where max < threshold... ties to background."""
    if len(class_ids) == 0:
        return np.zeros(scores.shape[1:], dtype=np.uint8)
    best = scores.argmax(axis=0)
    labels = np.asarray(class_ids, dtype=np.int64)[best] + 1
    labels[scores.max(axis=0) <= threshold] = 0
    return labels.astype(np.uint8)
