"""AffinityNet random walk: propagate CAMs over a sparse affinity graph (psa; paper §4.4).

AffinityNet (Ahn & Kwak, CVPR 2018, "psa") predicts an affinity a_ij in [0, 1] between the
stride-8 positions i and j of an h x w grid (N = h * w) that lie within a radius r of each
other (psa: the Euclidean disc dy² + dx² < r², r = 5: 69 offsets, (0, 0) included with
a_ii = exp(0) = 1). With A (N x N, a_ij on those pairs, 0 elsewhere) the random walk is

    T   = D⁻¹ A^{∘β},   D_ii = Σ_j (A^{∘β})_ij          (transition; β = 8)
    M*  = T^t M                                          (the walk; t = 256)

where A^{∘β} is the elementwise power, T is row-stochastic (every row sums to 1) and M
(N x C) holds one map per column. Each step replaces the score of position i by the
T-weighted average of its neighbours' scores, so a constant map stays constant.

Layout and transpose convention. Maps are passed as ``cams`` (C, h, w), i.e. M^T (C x N) in
row-major order, and every function here returns (M*)^T = M^T (T^T)^t, i.e. ``out[c] =
T^t @ cams[c].flatten()``. For a symmetric A (AffinityNet's a_ij = exp(−mean|f_i − f_j|) is
symmetric when both offsets d and −d are given), T^T = A^{∘β} D⁻¹ is psa's column-normalised
``aff / aff.sum(0)`` and the result equals psa's ``cam_vec @ trans_mat^t``. The dense
reference (:func:`random_walk_dense_reference`) uses the same convention, so the two agree for
any A, symmetric or not.

Two ways to compute it:

* ``method="sparse"`` (default): T as a CSR matrix with nnz <= N * |offsets| entries, applied
  t times to the (N x C) maps: t sparse-dense products of O(nnz * C) each; memory
  O(N * |offsets| + N * C), linear in N.
* ``method="dense"``: psa's way, T as a dense N x N matrix raised to the t-th power by repeated
  squaring (log2 t matrix products of O(N³)); memory 2-3 N² floats (1 GiB per matrix in float32
  at N = 128² positions, a 1024² image). Kept as the reference the benchmark compares with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Offset = tuple[int, int]
Method = Literal["sparse", "dense"]
Background = Literal["power", "constant"]

METHODS = ("sparse", "dense")
BACKGROUNDS = ("power", "constant")


def neighbour_offsets(radius: int, shape: Literal["disc", "square"] = "disc") -> list[Offset]:
    """The offsets (dy, dx) of the positions that share an affinity with a position.

    ``shape="disc"`` (psa): dy² + dx² < radius² (69 offsets for radius 5); ``shape="square"``
    (Chebyshev): max(|dy|, |dx|) < radius. Both are symmetric ((dy, dx) and (−dy, −dx) are
    both present), include (0, 0) and are sorted (row-major order of the neighbours).
    """
    if not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an int >= 1, got {radius!r}")
    if shape not in ("disc", "square"):
        raise ValueError(f"shape must be one of ('disc', 'square'), got {shape!r}")
    span = range(-radius + 1, radius)
    if shape == "disc":
        return [(dy, dx) for dy in span for dx in span if dy * dy + dx * dx < radius * radius]
    return [(dy, dx) for dy in span for dx in span]


def _check_offsets(offsets: Sequence[Offset]) -> list[Offset]:
    offs = [(int(dy), int(dx)) for dy, dx in offsets]
    if not offs:
        raise ValueError("offsets is empty; use neighbour_offsets(radius)")
    if len(set(offs)) != len(offs):
        dup = sorted({o for o in offs if offs.count(o) > 1})
        raise ValueError(f"offsets contain duplicates: {dup}")
    return offs


def _check_aff(aff: Tensor, offsets: Sequence[Offset], h: int, w: int) -> None:
    if aff.dim() != 3 or tuple(aff.shape) != (len(offsets), h, w):
        raise ValueError(
            f"aff must be (len(offsets), h, w) = ({len(offsets)}, {h}, {w}), got {tuple(aff.shape)}"
        )
    if not aff.is_floating_point():
        raise ValueError(f"aff must be a floating-point tensor, got {aff.dtype}")


def affinity_to_sparse(aff: Tensor, offsets: Sequence[Offset], h: int, w: int) -> Tensor:
    """The N x N affinity matrix A (N = h * w, raster order i = y * w + x) as a CSR tensor.

    Args:
        aff: (O, h, w), ``aff[k, y, x]`` = a(i, j) for i = (y, x) and j = (y + dy_k, x + dx_k),
            (dy_k, dx_k) = ``offsets[k]``; entries whose j falls outside the grid are ignored.
        offsets: O distinct (dy, dx) pairs, e.g. :func:`neighbour_offsets`.
        h, w: the grid.
    Returns:
        A as ``torch.sparse_csr`` (N, N) of aff's dtype and device, one stored entry per
        in-grid (position, offset) pair (zeros included), columns sorted within each row;
        int32 indices while they fit (faster sparse products on the CPU, half the memory).
    """
    offs = _check_offsets(offsets)
    _check_aff(aff, offs, h, w)
    n, dev = h * w, aff.device
    order = sorted(range(len(offs)), key=lambda k: offs[k])  # row-major neighbour order
    offs = [offs[k] for k in order]
    vals = aff[order].reshape(len(offs), n).T  # (N, O): row i lists its neighbours in order
    dy = torch.tensor([o[0] for o in offs], device=dev).view(-1, 1, 1)  # (O, 1, 1)
    dx = torch.tensor([o[1] for o in offs], device=dev).view(-1, 1, 1)
    ty = torch.arange(h, device=dev).view(1, h, 1) + dy  # (O, h, 1)
    tx = torch.arange(w, device=dev).view(1, 1, w) + dx  # (O, 1, w)
    valid = ((ty >= 0) & (ty < h)) & ((tx >= 0) & (tx < w))  # (O, h, w)
    cols = (ty * w + tx).reshape(len(offs), n).T  # (N, O); sorted per row when valid
    valid = valid.reshape(len(offs), n).T  # (N, O)
    nnz = int(valid.sum())
    idx = torch.int32 if max(nnz, n) < 2**31 - 1 else torch.int64
    crow = torch.zeros(n + 1, dtype=idx, device=dev)
    crow[1:] = valid.sum(1).cumsum(0)
    return _csr(crow, cols[valid].to(idx), vals[valid].contiguous(), n)


def _csr(crow: Tensor, col: Tensor, values: Tensor, n: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (once per process)
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


def _row_ids(a: Tensor) -> Tensor:
    """(nnz,) the row of every stored value of a CSR matrix."""
    crow = a.crow_indices().long()
    return torch.repeat_interleave(torch.arange(a.shape[0], device=a.device), crow.diff())


def transition_matrix(a: Tensor, beta: float = 8.0) -> Tensor:
    """T = D⁻¹ A^{∘β} (psa's transition): elementwise power, then every row divided by its sum.

    Args:
        a: (N, N) sparse (CSR or COO) affinity matrix with entries in [0, 1].
        beta: the exponent β (psa: 8; IRN: 10); larger β ignores weak affinities.
    Returns:
        (N, N) CSR, same sparsity as ``a``; every row sums to 1.
    Raises:
        ValueError: a row of A^{∘β} sums to 0 (no neighbour, not even itself, to walk to).
    """
    if a.layout == torch.sparse_coo:
        a = a.coalesce().to_sparse_csr()
    if a.layout != torch.sparse_csr or a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square sparse CSR/COO matrix, got {a.layout} {a.shape}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rows = _row_ids(a)  # (nnz,)
    powered = a.values().pow(beta)  # (nnz,)
    d = torch.zeros(a.shape[0], dtype=powered.dtype, device=powered.device)
    d.index_add_(0, rows, powered)  # (N,) row sums
    if bool((d <= 0).any()):
        bad = int((d <= 0).sum())
        raise ValueError(
            f"{bad} of {a.shape[0]} rows of A^beta sum to 0 (beta={beta}): include the offset "
            "(0, 0) with affinity 1, or use a smaller beta if affinities underflow"
        )
    return _csr(a.crow_indices(), a.col_indices(), powered / d[rows], a.shape[0])


def _dense_walk_matrix(a: Tensor, beta: float, steps: int) -> Tensor:
    """Dense (N, N) T^steps, T = D⁻¹ A^{∘β} built in place, the power by binary exponentiation
    (log2(steps) squarings; psa: t = 2^8, 8 squarings).

    Only this frame holds the matrices, so that every superseded power is freed at once: peak
    memory is two N x N matrices for a power-of-two t (T^(2^k) and its square), three
    otherwise (the running product too); see :func:`dense_bytes`.
    """
    base = a.to_dense()  # (N, N)
    base.pow_(beta)
    d = base.sum(1, keepdim=True)  # (N, 1)
    if bool((d <= 0).any()):
        raise ValueError(f"{int((d <= 0).sum())} rows of A^beta sum to 0 (beta={beta})")
    base.div_(d)  # T
    if steps == 0:
        return torch.eye(base.shape[0], dtype=base.dtype, device=base.device)
    result: Tensor | None = None
    k = steps
    while True:
        if k & 1:
            result = base if result is None else result @ base
        k >>= 1
        if not k:
            break
        base = base @ base  # the old base is freed here unless result holds it
    assert result is not None
    return result


def random_walk(
    cams: Tensor,
    aff: Tensor,
    offsets: Sequence[Offset],
    beta: float = 8.0,
    steps: int = 256,
    method: Method = "sparse",
) -> Tensor:
    """Propagate maps with t steps of the AffinityNet random walk (psa).

    ``out[c] = T^t @ cams[c].flatten()`` with T = D⁻¹ A^{∘β} row-stochastic (see the module
    docstring for the transpose convention; for symmetric A it equals psa's
    ``cam_vec @ (A^β / A^β.sum(0))^t``).

    Args:
        cams: (C, h, w) maps on the stride-8 grid (float32 or float64: the compute dtype).
        aff: (O, h, w) affinities a(i, i + offsets[k]), as in :func:`affinity_to_sparse`.
        offsets: O distinct (dy, dx) offsets, e.g. ``neighbour_offsets(5)``.
        beta: the exponent β of the transition T = D⁻¹ A^{∘β}.
        steps: t >= 0, any integer (not only powers of two).
        method: "sparse" (t CSR products, memory O(N * O + N * C)) or "dense" (psa: dense
            N x N matrix power by repeated squaring, memory O(N²)).
    Returns:
        (C, h, w) walked maps, cams' dtype and device.
    """
    if cams.dim() != 3:
        raise ValueError(f"cams must be (C, h, w), got {tuple(cams.shape)}")
    if not cams.is_floating_point():
        raise ValueError(f"cams must be a floating-point tensor, got {cams.dtype}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    c, h, w = cams.shape
    a = affinity_to_sparse(aff.to(cams.dtype), offsets, h, w)  # (N, N) CSR
    maps = cams.reshape(c, h * w)  # (C, N) = M^T
    if method == "sparse":
        t = transition_matrix(a, beta)  # (N, N) CSR
        del a
        x = maps.T.contiguous()  # (N, C) = M
        for _ in range(steps):
            x = t @ x  # (N, C): M <- T M
        return x.T.reshape(c, h, w).contiguous()
    p = _dense_walk_matrix(a, beta, steps)  # (N, N) T^t
    return (maps @ p.T).reshape(c, h, w)  # (C, N) = M^T (T^t)^T


def random_walk_dense_reference(
    cams: Tensor,
    aff: Tensor,
    offsets: Sequence[Offset],
    beta: float = 8.0,
    steps: int = 256,
) -> Tensor:
    """The walk written out plainly (slow; for tests): loops over positions and offsets.

    Builds A entry by entry, T = A^β / A^β.sum(1) and T^t with ``torch.linalg.matrix_power``;
    returns ``out[c] = T^t @ cams[c].flatten()`` as (C, h, w), the same convention as
    :func:`random_walk`.
    """
    c, h, w = cams.shape
    n = h * w
    a = torch.zeros(n, n, dtype=cams.dtype)
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(offsets):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    a[y * w + x, (y + dy) * w + (x + dx)] = float(aff[k, y, x])
    a = a.pow(beta)
    t = a / a.sum(1, keepdim=True)
    p = torch.linalg.matrix_power(t, steps)
    return (p @ cams.reshape(c, n).cpu().T).T.reshape(c, h, w)


def _max_normalise(maps: Tensor) -> Tensor:
    """(K, h, w) -> each map divided by its own maximum (maps with max <= 0 left as they are)."""
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)  # (K, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), maps)


def propagate_to_labels(
    cams_fg: Tensor,
    aff: Tensor,
    offsets: Sequence[Offset],
    image_size: tuple[int, int],
    *,
    background: Background = "power",
    bg_power: float = 16.0,
    bg_threshold: float = 0.2,
    beta: float = 8.0,
    steps: int = 256,
    method: Method = "sparse",
    stride: int | None = None,
    class_ids: Sequence[int] | None = None,
) -> Tensor:
    """Pseudo label map from foreground CAMs and affinities (psa's inference).

    1. Background on the stride-8 grid:
       * ``background="power"`` (psa): bg = (1 − max_k cam_k)^bg_power (bg_power 16), walked
         together with the foreground maps; ``cams_fg`` must be max-normalised (in [0, 1]).
       * ``background="constant"`` (IRN, the LID "background threshold 0.2"): the foreground
         maps are walked alone and each is divided by its own maximum afterwards; the
         background is the constant ``bg_threshold``. (A constant map is unchanged by the
         row-stochastic walk, so walking it too would make no difference.)
    2. The walk of :func:`random_walk` (β, t steps).
    3. Bilinear upsampling (align_corners=False) to ``image_size``; with ``stride``, to the
       padded size (h * stride, w * stride) and then cropped to ``image_size`` at the top
       left (psa pads the image to a multiple of 8 at the bottom and right).
    4. Argmax over (background, class 1, ..., class K).

    Args:
        cams_fg: (K, h, w) CAMs of the K classes present in the image (K may be 0).
        aff: (O, h, w) affinities a(i, i + offsets[k]).
        offsets: O distinct (dy, dx) offsets, e.g. ``neighbour_offsets(5)``.
        image_size: (H, W) of the label map.
        class_ids: K labels for the K maps (e.g. dataset class ids); default 1..K.
    Returns:
        (H, W) labels: 0 background, else ``class_ids[k]`` (default k + 1) for ``cams_fg[k]``;
        torch.uint8 when every label fits in 0..255, else torch.int64.
    """
    if cams_fg.dim() != 3:
        raise ValueError(f"cams_fg must be (K, h, w), got {tuple(cams_fg.shape)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    k, h, w = cams_fg.shape
    big_h, big_w = (int(s) for s in image_size)
    if stride is not None and (big_h > h * stride or big_w > w * stride):
        raise ValueError(
            f"image_size {(big_h, big_w)} is larger than the grid {(h, w)} x stride {stride}"
        )
    labels = list(range(1, k + 1)) if class_ids is None else [int(c) for c in class_ids]
    if len(labels) != k or any(c <= 0 for c in labels):
        raise ValueError(f"class_ids must be {k} labels > 0 (0 is background), got {labels}")
    out_dtype = torch.uint8 if max(labels, default=0) <= 255 else torch.int64
    if k == 0:
        return torch.zeros(big_h, big_w, dtype=out_dtype, device=cams_fg.device)
    cams = cams_fg if cams_fg.dtype in (torch.float32, torch.float64) else cams_fg.float()
    if background == "power":
        lo, hi = float(cams.min()), float(cams.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"background='power' needs max-normalised CAMs in [0, 1], got [{lo:.4g}, "
                f"{hi:.4g}]; normalise them, or use background='constant'"
            )
        bg = (1 - cams.clamp(0, 1).amax(0, keepdim=True)).pow(bg_power)  # (1, h, w)
        walked = random_walk(torch.cat([bg, cams]), aff, offsets, beta, steps, method)
    else:
        fg = _max_normalise(random_walk(cams, aff, offsets, beta, steps, method))  # (K, h, w)
        walked = torch.cat([torch.full_like(fg[:1], bg_threshold), fg])  # (1 + K, h, w)
    size = (h * stride, w * stride) if stride is not None else (big_h, big_w)
    up = F.interpolate(walked[None], size=size, mode="bilinear", align_corners=False)[0]
    idx = up[:, :big_h, :big_w].argmax(0)  # (H, W) in 0..K
    lut = torch.tensor([0, *labels], dtype=torch.int64, device=idx.device)
    return lut[idx].to(out_dtype)


def dense_bytes(positions: int, itemsize: int = 4, steps: int = 256) -> int:
    """Bytes of the N x N matrices ``method="dense"`` holds at once: 2 (T^(2^k) and its
    square) for a power-of-two t, 3 otherwise (the running product too)."""
    live = 2 if steps & (steps - 1) == 0 else 3
    return live * positions * positions * itemsize


def sparse_nnz(h: int, w: int, offsets: Sequence[Offset]) -> int:
    """Stored entries of :func:`affinity_to_sparse` on an h x w grid."""
    return sum(max(0, h - abs(dy)) * max(0, w - abs(dx)) for dy, dx in offsets)


__all__ = [
    "affinity_to_sparse",
    "dense_bytes",
    "neighbour_offsets",
    "propagate_to_labels",
    "random_walk",
    "random_walk_dense_reference",
    "sparse_nnz",
    "transition_matrix",
]
