"""Test-time inference of a segmentation network on one image: multi-scale × flip, optional CRF.

Plain PyTorch + NumPy, no Ray. For every scale s the normalised image is resized to
round(s·(H, W)) and run together with its mirror image (one batch of 2 when ``flip``); the
mirrored logits are flipped back, all logits are resized to (H, W), turned into softmax
probabilities and averaged over scales × flips (the authors' VOC code: scales 0.5–1.5 × flip + CRF).
``predict_labels`` optionally refines the averaged probabilities with a dense CRF (the project's
:func:`mcis_dist.crf.crf_inference`, paper §3.3) before the arg-max.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrfFn", "predict_labels", "predict_scores"]

CrfFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rgb (H, W, 3) u8, probs (C, H, W))


def _check_image(image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a normalised (1, 3, H, W) tensor, got {shape}")


def _device(model: nn.Module, image: Tensor) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else image.device


def predict_scores(
    model: nn.Module,
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    *,
    amp: bool = True,
) -> Tensor:
    """Class probabilities of one image, averaged over ``scales`` × (flip).

    Args:
        model: maps (B, 3, h, w) to (B, C, h', w') logits (any h', w': resized here).
        image: (1, 3, H, W) normalised image; moved to the model's device.
        scales: test scales (each > 0); 1.0 runs the image as it is.
        flip: also run the horizontally mirrored image and flip its logits back.
        amp: fp16 autocast when the model is on CUDA (ignored on the CPU).
    Returns:
        (C, H, W) float32 probabilities on the model's device, summing to 1 over C.
    The model runs in eval mode under ``torch.no_grad()``; its train/eval mode is restored.
    """
    _check_image(image)
    scales = [float(s) for s in scales]
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
    device = _device(model, image)
    image = image.to(device, torch.float32)
    h, w = image.shape[-2:]
    was_training = model.training
    model.eval()
    total, views = None, 0
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"),
        ):
            for s in scales:
                size = (max(1, round(h * s)), max(1, round(w * s)))
                x = image  # (1, 3, hs, ws)
                if size != (h, w):
                    x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
                if flip:
                    x = torch.cat([x, x.flip(-1)])  # (2, 3, hs, ws)
                logits = model(x).float()  # (V, C, h', w')
                if flip:
                    logits = torch.cat([logits[:1], logits[1:].flip(-1)])
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(
                        logits, size=(h, w), mode="bilinear", align_corners=False
                    )
                probs = logits.softmax(dim=1).sum(dim=0)  # (C, H, W)
                total = probs if total is None else total + probs
                views += logits.shape[0]
    finally:
        model.train(was_training)
    return total / views  # (C, H, W)


def predict_labels(
    model: nn.Module,
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: CrfFn | None = None,
    rgb: np.ndarray | None = None,
    *,
    amp: bool = True,
) -> np.ndarray:
    """(H, W) int64 labels of one image: arg-max of :func:`predict_scores`, after
    ``crf(rgb, probs)`` when ``crf`` is given (e.g. :func:`mcis_dist.crf.crf_inference`), which
    then needs ``rgb``, the image's (H, W, 3) uint8 RGB pixels."""
    probs = predict_scores(model, image, scales, flip, amp=amp)  # (C, H, W)
    if crf is None:
        return probs.argmax(dim=0).cpu().numpy().astype(np.int64)
    h, w = probs.shape[-2:]
    if rgb is None:
        raise ValueError("crf needs rgb: the (H, W, 3) uint8 image the scores belong to")
    rgb = np.asarray(rgb)
    if rgb.shape != (h, w, 3) or rgb.dtype != np.uint8:
        raise ValueError(
            f"rgb must be ({h}, {w}, 3) uint8 like the image, got {rgb.shape} {rgb.dtype}"
        )
    refined = np.asarray(crf(rgb, probs.cpu().numpy()))
    if refined.shape != tuple(probs.shape):
        raise ValueError(f"crf returned {refined.shape}, expected {tuple(probs.shape)}")
    return refined.argmax(axis=0).astype(np.int64)
