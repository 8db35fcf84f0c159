"""Per-image training labels for AffinityNet and the saliency route (psa; paper §3.2).

Label ids, used throughout :mod:`mcis_dist.affinity`: 0 background, ``k + 1`` foreground class
k (0-based foreground class index, as in the classifier's K outputs), :data:`IGNORE` (255)
neither. Maps are uint8 numpy arrays.

* :func:`confident_labels` -- psa's confident foreground / background from CAMs with two
  background scores (psa): a weak background (1 - max_k CAM)^alpha_low, against which
  a class that still wins is confident foreground, and a strong one (1 - max_k CAM)^alpha_high,
  which only wins where every CAM is near 0 (confident background). Or constant backgrounds
  (``fg_threshold`` / ``bg_threshold``, IRN's form). Each stack optionally CRF-refined.
* :func:`saliency_labels` -- the MCIS VOC route: saliency map + CAMs -> pseudo label (paper §3.2).
* :func:`downsample_labels` -- to the stride-8 grid of the affinity net, as psa does.

Inputs may be numpy arrays or torch tensors (moved to the CPU); work is done in numpy because
the CRF (pydensecrf) is numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

__all__ = [
    "IGNORE",
    "confident_labels",
    "downsample_labels",
    "is_empty",
    "saliency_labels",
]

IGNORE = 255

#: ``crf(image (H, W, 3) uint8 RGB, probs (C, H, W) float32 summing to 1 over C) -> probs``;
#: :func:`mcis_dist.crf.crf_inference` is one.
CRF = Callable[[np.ndarray, np.ndarray], np.ndarray]
ArrayLike = np.ndarray | torch.Tensor


def _numpy(x: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _class_labels(class_ids: ArrayLike | Sequence[int], n_maps: int) -> np.ndarray:
    """Label id of each CAM: (L,) class index k -> k + 1, checked to fit uint8 below 255."""
    ids = _numpy(class_ids).astype(np.int64).reshape(-1)
    if ids.size != n_maps:
        raise ValueError(f"class_ids has {ids.size} entries for {n_maps} CAMs: {ids.tolist()}")
    if ids.size and (ids.min() < 0 or ids.max() > IGNORE - 2):
        raise ValueError(f"class_ids must be in [0, {IGNORE - 2}], got {ids.tolist()}")
    return ids + 1


def _with_background(
    background: np.ndarray, cams: np.ndarray, crf: CRF | None, image: np.ndarray | None
) -> np.ndarray:
    """argmax over [background, cams] (L+1, h, w) -> (h, w) index 0..L; with a CRF, the stack
    is normalised to a distribution over the L+1 labels and refined first."""
    scores = np.concatenate([background[None], cams], axis=0).astype(np.float32)  # (L+1, h, w)
    if crf is not None:
        probs = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-5)
        scores = _numpy(crf(image, probs), np.float32)
        if scores.shape != probs.shape:
            raise ValueError(f"crf returned shape {scores.shape}, expected {probs.shape}")
    return scores.argmax(axis=0)  # (h, w)


def confident_labels(
    cams: ArrayLike,
    class_ids: ArrayLike | Sequence[int],
    alpha_low: float = 4.0,
    alpha_high: float = 32.0,
    *,
    fg_threshold: float | None = None,
    bg_threshold: float | None = None,
    crf: CRF | None = None,
    image: ArrayLike | None = None,
    on_conflict: Literal["ignore", "background"] = "ignore",
) -> np.ndarray:
    """AffinityNet's training label from CAMs (psa).

    With m = max_k CAM_k at each pixel:

    * confident foreground: argmax of [(1 - m)^alpha_low, CAMs] is a class -> that class;
    * confident background: argmax of [(1 - m)^alpha_high, CAMs] is the background -> 0;
    * neither -> 255 (ignore). So is both, which only a CRF can cause (alpha_high > alpha_low
      makes the second background smaller), with ``on_conflict="ignore"`` (default: the two
      cues disagree); ``"background"`` gives such pixels 0 as psa's code does.

    Threshold form (IRN; ``fg_threshold`` and ``bg_threshold`` both set): the constant
    backgrounds fg_threshold (confident foreground where some CAM beats it) and bg_threshold
    (confident background where all CAMs stay below it) replace the two powers.

    Args:
        cams: (L, h, w) max-normalised CAMs in [0, 1] of the image's L labelled classes.
        class_ids: (L,) 0-based class index of each CAM; labels are class index + 1.
        alpha_low: power of the weak background (psa: 4).
        alpha_high: power of the strong background (psa: 32).
        fg_threshold: constant weak background (IRN: 0.30), with ``bg_threshold``.
        bg_threshold: constant strong background (IRN: 0.05), with ``fg_threshold``.
        crf: ``crf(image, probs)`` applied to both score stacks (normalised to sum to 1 per
            pixel) before their argmax, e.g. ``mcis_dist.crf.crf_inference``.
        image: (h, w, 3) uint8 RGB, required with ``crf``.
        on_conflict: label of pixels both confident foreground and confident background.
    Returns:
        (h, w) uint8: 0 background, k + 1 class k, 255 ignore.
    """
    cams = _numpy(cams, np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (L, h, w), got shape {cams.shape}")
    labels = _class_labels(class_ids, cams.shape[0])
    if on_conflict not in ("ignore", "background"):
        raise ValueError(f"on_conflict must be 'ignore' or 'background', got {on_conflict!r}")
    img = None
    if crf is not None:
        if image is None:
            raise ValueError("crf needs the image (h, w, 3) uint8 RGB")
        img = _numpy(image, np.uint8)
        if img.shape != (*cams.shape[1:], 3):
            raise ValueError(f"image shape {img.shape} does not match cams {cams.shape}")

    peak = cams.max(axis=0) if cams.shape[0] else np.zeros(cams.shape[1:], np.float32)
    if (fg_threshold is None) != (bg_threshold is None):
        raise ValueError(
            f"the threshold form needs both fg_threshold and bg_threshold, got "
            f"fg_threshold={fg_threshold}, bg_threshold={bg_threshold}"
        )
    if fg_threshold is not None:
        if not 0 <= bg_threshold <= fg_threshold <= 1:
            raise ValueError(
                f"need 0 <= bg_threshold <= fg_threshold <= 1, got "
                f"bg_threshold={bg_threshold}, fg_threshold={fg_threshold}"
            )
        bg_weak = np.full_like(peak, fg_threshold)
        bg_strong = np.full_like(peak, bg_threshold)
    else:
        if not 0 < alpha_low <= alpha_high:
            raise ValueError(
                f"need 0 < alpha_low <= alpha_high, got alpha_low={alpha_low}, "
                f"alpha_high={alpha_high}"
            )
        base = np.clip(1.0 - peak, 0.0, 1.0)
        bg_weak, bg_strong = base**alpha_low, base**alpha_high  # (h, w) each

    fg_index = _with_background(bg_weak, cams, crf, img)  # (h, w): 0 bg, l+1 CAM l
    bg_index = _with_background(bg_strong, cams, crf, img)
    conf_fg, conf_bg = fg_index > 0, bg_index == 0

    out = np.full(cams.shape[1:], IGNORE, dtype=np.uint8)
    lut = np.concatenate([[0], labels]).astype(np.uint8)  # CAM index + 1 -> label id
    out[conf_fg & ~conf_bg] = lut[fg_index[conf_fg & ~conf_bg]]
    out[conf_bg & ~conf_fg] = 0
    if on_conflict == "background":
        out[conf_bg & conf_fg] = 0
    return out


def saliency_labels(
    cams: ArrayLike,
    class_ids: ArrayLike | Sequence[int],
    saliency: ArrayLike,
    *,
    class_threshold: float = 0.3,
    multi_class_threshold: float = 0.99,
    background_class_threshold: float = 0.95,
    background_saliency_threshold: int = 32,
    min_foreground: float = 0.01,
) -> tuple[np.ndarray, bool]:
    """Pseudo label from CAMs and a saliency map, the MCIS VOC route (paper §3.2; authors' code).

    1. background score 1 - sal/255; each class map min-max normalised to [0, 1], then set to 0
       where below ``class_threshold`` (0.3);
    2. argmax over [background, class maps] (ties go to the first: background, then CAM order);
    3. pixels where more than one class map exceeds ``multi_class_threshold`` (0.99) -> 255;
    4. background pixels (argmax 0) whose max(sal, 255 * [some class map > 0.95]) is at least
       ``background_saliency_threshold`` (32) -> 255.

    Args:
        cams: (L, H, W) CAMs of the image's labelled classes (any scale: min-max normalised here).
        class_ids: (L,) 0-based class index of each CAM.
        saliency: (H, W) uint8 saliency map (255 = salient).
    Returns:
        ``(label (H, W) uint8, keep)``: keep is False when the foreground (labels 1..254) covers
        less than ``min_foreground`` (1%) of the image; the authors leave such images out.
    """
    cams = _numpy(cams, np.float32)
    sal = _numpy(saliency).astype(np.float32)
    if cams.ndim != 3 or sal.shape != cams.shape[1:]:
        raise ValueError(f"need cams (L, H, W) and saliency (H, W), got {cams.shape}, {sal.shape}")
    labels = _class_labels(class_ids, cams.shape[0])

    lo = cams.min(axis=(1, 2), keepdims=True)
    span = cams.max(axis=(1, 2), keepdims=True) - lo
    maps = (cams - lo) / np.maximum(span, 1e-5)  # (L, H, W) in [0, 1]
    maps[maps < class_threshold] = 0.0
    background = 1.0 - sal / 255.0  # (H, W)
    index = _with_background(background, maps, None, None)  # (H, W): 0 bg, l+1 map l

    lut = np.concatenate([[0], labels]).astype(np.uint8)
    out = lut[index]
    out[(maps > multi_class_threshold).sum(axis=0) > 1] = IGNORE
    cue = np.maximum(sal, 255.0 * (maps > background_class_threshold).any(axis=0))
    out[(index == 0) & (cue >= background_saliency_threshold)] = IGNORE
    foreground = np.count_nonzero((out > 0) & (out != IGNORE))
    return out, bool(foreground >= min_foreground * out.size)


def is_empty(label: ArrayLike) -> bool:
    """True when no pixel of the label is confident (all 255): the caller counts and skips it."""
    return bool((_numpy(label) == IGNORE).all())


def downsample_labels(label: ArrayLike, stride: int = 8) -> ArrayLike:
    """A label map (..., H, W) at the affinity net's grid (..., ceil(H/s), ceil(W/s)).

    Nearest sampling at cell centres, as psa does (a nearest rescale by 1/8 of the cropped
    label, i.e. pixel 8k + 4 for cell k): cell k reads pixel k*s + min(s, H - k*s) // 2, the
    centre of the pixels it covers (the last cell of a size that is no multiple of s is
    partial). Labels are never averaged, so class ids and 255 stay exact. Same type out as in
    (numpy array or tensor).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    h, w = label.shape[-2:]

    def centres(n: int) -> list[int]:
        return [k * stride + min(stride, n - k * stride) // 2 for k in range(math.ceil(n / stride))]

    rows, cols = centres(h), centres(w)
    return label[..., rows, :][..., cols]
