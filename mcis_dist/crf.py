"""Dense CRF refinement of class probabilities (paper §3.3; Krähenbühl & Koltun 2011).

The fully connected CRF minimises, over the labels x of all pixels,

    E(x) = Σ_i ψ_u(x_i) + Σ_{i<j} μ(x_i, x_j) k(f_i, f_j)
    ψ_u(x_i) = −log P(x_i)                                   (unary from softmax probabilities)
    k(f_i, f_j) = w_g exp(−|p_i − p_j|² / 2θ_γ²)                              (Gaussian, smoothness)
                + w_b exp(−|p_i − p_j|² / 2θ_α² − |I_i − I_j|² / 2θ_β²)   (bilateral, appearance)

with the Potts compatibility μ, solved by mean-field inference. Settings (psa's code):
Gaussian θ_γ = sxy = 3, w_g = compat = 3; bilateral θ_α = sxy = 80, θ_β = srgb = 13,
w_b = compat = 10; 10 iterations. Runs on the CPU with pydensecrf2 (``pydensecrf.densecrf``,
single-threaded, ~1.7 s for 512 x 512 with 21 labels on one core); :func:`crf_map` spreads many
images over processes. This module imports numpy and pydensecrf only (no torch), so worker
processes start quickly.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

PROB_SUM_ATOL = 1e-3  # tolerance of Σ_c probs = 1 per pixel
CLIP = 1e-5  # probabilities are clipped to [CLIP, 1] before −log (pydensecrf's default)


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings (defaults as in psa's code)."""

    iterations: int = 10
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bi_sxy: float = 80.0
    bi_srgb: float = 13.0
    bi_compat: float = 10.0

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        for name in ("gauss_sxy", "bi_sxy", "bi_srgb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _unary(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities -> (C, H*W) float32 −log(clip(prob)), C-contiguous."""
    try:
        from pydensecrf.utils import unary_from_softmax  # lazy: native, CRF only
    except ImportError:  # pragma: no cover - older pydensecrf builds
        c = probs.shape[0]
        return np.ascontiguousarray(-np.log(np.clip(probs, CLIP, 1.0)).reshape(c, -1), np.float32)
    return np.ascontiguousarray(unary_from_softmax(probs, clip=CLIP), dtype=np.float32)


def check_inputs(image_rgb: np.ndarray, probs: np.ndarray) -> None:
    """Raise ValueError unless image is (H, W, 3) uint8 and probs a (C, H, W) distribution."""
    image_rgb, probs = np.asarray(image_rgb), np.asarray(probs)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image_rgb must be (H, W, 3), got shape {image_rgb.shape}")
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb must be uint8, got {image_rgb.dtype}")
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {probs.shape}")
    if probs.shape[1:] != image_rgb.shape[:2]:
        raise ValueError(
            f"probs (C, H, W) = {probs.shape} and image_rgb (H, W, 3) = {image_rgb.shape} "
            "disagree in size"
        )
    if probs.shape[0] < 2:
        raise ValueError(f"probs needs at least 2 classes, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    if not np.isfinite(probs).all() or probs.min() < 0:
        raise ValueError(f"probs {probs.shape} must be finite and >= 0 (softmax output)")
    sums = probs.sum(0, dtype=np.float64)  # (H, W)
    worst = float(np.abs(sums - 1).max())
    if worst > PROB_SUM_ATOL:
        raise ValueError(
            f"probs {probs.shape} must sum to 1 over C at every pixel (softmax output); "
            f"the sums deviate by up to {worst:.3g}"
        )


def crf_inference(
    image_rgb: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    gauss_sxy: float = 3.0,
    gauss_compat: float = 3.0,
    bi_sxy: float = 80.0,
    bi_srgb: float = 13.0,
    bi_compat: float = 10.0,
) -> np.ndarray:
    """Mean-field marginals of the dense CRF (Krähenbühl & Koltun 2011).

    Args:
        image_rgb: (H, W, 3) uint8 RGB image (the bilateral kernel's colours).
        probs: (C, H, W) class probabilities (softmax output: >= 0, summing to 1 per pixel).
        iterations: mean-field iterations.
        gauss_sxy, gauss_compat: Gaussian (smoothness) kernel θ_γ and weight.
        bi_sxy, bi_srgb, bi_compat: bilateral (appearance) kernel θ_α, θ_β and weight.
    Returns:
        (C, H, W) float32 marginals Q (sum to 1 over C at every pixel).
    """
    import pydensecrf.densecrf as dcrf  # lazy: native, CRF only

    check_inputs(image_rgb, probs)
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(_unary(np.asarray(probs)))  # (C, H*W)
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(
        sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(image_rgb), compat=bi_compat
    )
    q = d.inference(iterations)  # (C, H*W) view of an Eigen (column-major) matrix
    return np.ascontiguousarray(q, dtype=np.float32).reshape(c, h, w)  # an owned copy


def crf_labels(
    image_rgb: np.ndarray, probs: np.ndarray, params: CRFParams | None = None
) -> np.ndarray:
    """(H, W) int64 argmax of :func:`crf_inference`'s marginals."""
    q = crf_inference(image_rgb, probs, **asdict(params or CRFParams()))
    return q.argmax(0)


def _crf_item(item: tuple[np.ndarray, np.ndarray], params: CRFParams) -> np.ndarray:
    image_rgb, probs = item
    return crf_inference(image_rgb, probs, **asdict(params))


def crf_map(
    items: Iterable[tuple[np.ndarray, np.ndarray]],
    params: CRFParams | None = None,
    processes: int = 0,
) -> list[np.ndarray]:
    """:func:`crf_inference` over many (image_rgb, probs) items, in order, in parallel.

    Args:
        items: (image_rgb (H, W, 3) uint8, probs (C, H, W)) pairs; sizes may differ per item.
        params: CRF settings (default :class:`CRFParams`).
        processes: 0 = ``os.cpu_count()`` worker processes (spawned; never more than there
            are items), 1 = inline in this process, n > 1 = n workers.
    Returns:
        One (C, H, W) float32 marginal per item, in the order of ``items``. Every item is
        checked here first, so bad inputs raise ValueError before any work starts.
    """
    params = params or CRFParams()
    if not isinstance(processes, int) or processes < 0:
        raise ValueError(f"processes must be an int >= 0 (0 = all cores), got {processes!r}")
    items = list(items)
    for i, (image_rgb, probs) in enumerate(items):
        try:
            check_inputs(image_rgb, probs)
        except ValueError as e:
            raise ValueError(f"item {i}: {e}") from None
    workers = min(processes or os.cpu_count() or 1, max(1, len(items)))
    if workers == 1:
        return [_crf_item(item, params) for item in items]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_crf_item, items, [params] * len(items)))


__all__ = ["CRFParams", "check_inputs", "crf_inference", "crf_labels", "crf_map"]
