"""Co-attention between the feature maps of two images (MCIS, ECCV 2020, §3.1, Eq. 2-4).

Notation (paper): F_m (C x HW_m) and F_n (C x HW_n) are flattened feature maps and

    P           = F_m^T W_P F_n                      (Eq. 2)   (HW_m x HW_n)
    A_m         = softmax(P),  A_n = softmax(P^T)    (Eq. 3)   column-wise
    F_n^{m∩n}   = F_m A_m,     F_m^{m∩n} = F_n A_n   (Eq. 4)

Each co-attentive feature is an attention read-out with scale 1.0: with the keys of image m
projected once, g_m = W_P^T F_m, the affinity is P = g_m^T F_n, so

    F_n^{m∩n}[:, j] = sum_i softmax_i(g_m,i . f_n,j) f_m,i   (queries f_n, keys g_m, values f_m)
    F_m^{m∩n}[:, i] = sum_j softmax_j(g_m,i . f_n,j) f_n,j   (queries g_m, keys f_n, values f_n)

Both directions read the same P, once row-wise and once column-wise. ``coattention`` computes
them together in blocks of rows of P (positions of m): the row softmax is complete inside a
block, the column softmax is accumulated across blocks with a running max and sum (the
"online softmax" of flash attention), and backward recomputes each block from the saved
log-sum-exps. P is computed once per block in forward and once more in backward, memory beyond
inputs and outputs is O(B * chunk * HW_n), and the result is exact up to round-off.
Under autocast the products run in the autocast dtype while logits, softmax statistics and
accumulators stay float32; float16 keys are pre-scaled so that no logit overflows.
``coattention_dense`` materialises P and is the reference the tests compare against.

A normalised variant, ``coattention_cosine`` (not in the paper), replaces Eq. 2 by a cosine
affinity with a temperature tau,

    P = normalize(W_P^T F_m)^T normalize(F_n) / tau,

the rest (Eq. 3-4) unchanged: values are still the raw F_m and F_n. Eq. 2's logits grow with
the feature norms, so the column softmax can saturate on a few high-norm "hub" positions
whatever their content; the cosine logits are bounded by 1/tau, so attention follows direction
(content) only. It runs as two ``scaled_dot_product_attention`` calls, exact, with memory
O(B * HW_m * HW_n) where no fused kernel takes head dim C.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 256  # rows of P (positions of m) per block; see benchmarks/coattention.py

Backend = Literal["chunked", "sdpa"]


def project_keys(fm: Tensor, w_p: Tensor) -> Tensor:
    """g_m = W_P^T F_m, so that the affinity of Eq. 2 is P = F_m^T W_P F_n = g_m^T F_n.

    Args:
        fm: (B, C, H, W) features of image m.
        w_p: (C, C) one W_P for the whole batch, or (B, C, C) one per pair.
    Returns:
        (B, C, H, W), the keys of image m.
    """
    b, c, h, w = fm.shape
    if w_p.shape[-2:] != (c, c) or w_p.dim() not in (2, 3):
        raise ValueError(f"w_p must be ({c}, {c}) or (B, {c}, {c}), got {tuple(w_p.shape)}")
    flat = fm.flatten(2)  # (B, C, HW)
    keys = torch.matmul(w_p.transpose(-1, -2), flat)  # (C, C) or (B, C, C) @ (B, C, HW)
    return keys.view(b, c, h, w)


def coattention_dense(fm: Tensor, fn: Tensor, w_p: Tensor) -> tuple[Tensor, Tensor]:
    """Reference co-attention (Eq. 2-4) that materialises P; returns (F_n^{m∩n}, F_m^{m∩n}).

    Args:
        fm: (B, C, Hm, Wm) features of image m.
        fn: (B, C, Hn, Wn) features of image n.
        w_p: (C, C) or (B, C, C), the W_P of Eq. 2.
    Returns:
        fn_from_m: (B, C, Hn, Wn) = F_m A_m, image n's co-attentive feature (read from m).
        fm_from_n: (B, C, Hm, Wm) = F_n A_n, image m's co-attentive feature (read from n).
    """
    _check_pair(fm, fn)
    fm_flat, fn_flat = fm.flatten(2), fn.flatten(2)  # (B, C, Lm), (B, C, Ln)
    keys = project_keys(fm, w_p).flatten(2)  # (B, C, Lm)
    p = torch.bmm(keys.transpose(1, 2), fn_flat)  # (B, Lm, Ln)   Eq. 2
    p = p.to(_acc_dtype(p.dtype))  # softmax in at least float32
    a_m = torch.softmax(p, dim=1)  # (B, Lm, Ln)   Eq. 3, over positions of m
    a_n = torch.softmax(p.transpose(1, 2), dim=1)  # (B, Ln, Lm)  over positions of n
    fn_from_m = torch.bmm(fm_flat, a_m.to(fm_flat.dtype))  # (B, C, Ln)  Eq. 4
    fm_from_n = torch.bmm(fn_flat, a_n.to(fn_flat.dtype))  # (B, C, Lm)
    return fn_from_m.view_as(fn), fm_from_n.view_as(fm)


def coattention(
    fm: Tensor,
    fn: Tensor,
    w_p: Tensor,
    *,
    chunk_size: int | None = None,
    backend: Backend = "chunked",
    save_keys: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Memory-efficient, exact co-attention (Eq. 2-4); same results as ``coattention_dense``.

    Under autocast the inputs are cast to the autocast dtype for the matrix products; logits,
    softmax statistics and accumulators are always at least float32.

    Args:
        fm: (B, C, Hm, Wm) features of image m.
        fn: (B, C, Hn, Wn) features of image n.
        w_p: (C, C) or (B, C, C), the W_P of Eq. 2.
        chunk_size: positions of m per block (default ``DEFAULT_CHUNK``); memory beyond the
            inputs, outputs and gradients is about 4 * B * chunk_size * Hn*Wn floats.
        backend: "chunked" (this module's autograd Function) or "sdpa" (two calls of
            ``torch.nn.functional.scaled_dot_product_attention`` with scale 1.0, head dim C;
            memory-efficient only where a fused kernel takes that head dim).
        save_keys: keep the keys W_P^T F_m of forward for backward (one more (B, C, HW_m)
            tensor) instead of recomputing them (one more HW_m x C x C product). Default: keep
            them when the recomputation would cost over ~10% of the backward, C >= 0.7 HW_n
            (e.g. C = 4096 at 56x56 positions; not C = 512).
    Returns:
        (fn_from_m, fm_from_n) as in ``coattention_dense``.
    """
    _check_inputs(fm, fn, w_p)
    if backend not in ("chunked", "sdpa"):
        raise ValueError(f"backend must be one of 'chunked', 'sdpa', got {backend!r}")
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = fm.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(w_p.dtype, fm.dtype), fn.dtype)
    m, n, w = fm.to(dtype), fn.to(dtype), w_p.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if backend == "sdpa":
            n_from_m, m_from_n = _sdpa(project_keys(m, w).flatten(2), m.flatten(2), n.flatten(2))
        else:
            grads = torch.is_grad_enabled() and any(t.requires_grad for t in (fm, fn, w_p))
            if not grads:
                save_keys = False  # no backward will come
            elif save_keys is None:  # recomputing costs ~C / (7 HW_n) of the backward
                save_keys = 10 * fm.shape[1] >= 7 * fn.shape[2] * fn.shape[3]
            n_from_m, m_from_n = _ChunkedCoAttention.apply(
                m.flatten(2), n.flatten(2), w, chunk, save_keys
            )
    return n_from_m.view(fn.shape), m_from_n.view(fm.shape)


def coattention_cosine(
    fm: Tensor, fn: Tensor, w_p: Tensor, temperature: Tensor | float, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Co-attention with a cosine affinity (normalised Eq. 2), then Eq. 3-4 as the paper:
    P = normalize(W_P^T F_m)^T normalize(F_n) / tau, channel-wise L2 normalisation.

    Args:
        fm: (B, C, Hm, Wm) features of image m.
        fn: (B, C, Hn, Wn) features of image n.
        w_p: (C, C) or (B, C, C).
        temperature: tau > 0, a float or a 0-d tensor (learnable).
        eps: floor of the norms (an all-zero feature gets a zero key, i.e. a uniform row).
    Returns:
        (fn_from_m, fm_from_n) as in ``coattention_dense``: F_n^{m∩n} = F_m A_m and
        F_m^{m∩n} = F_n A_n.
    """
    _check_inputs(fm, fn, w_p)
    if not isinstance(temperature, Tensor) and not temperature > 0:  # (a tensor: no host sync)
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keys = F.normalize(project_keys(fm, w_p).flatten(2), dim=1, eps=eps)  # (B, C, Lm)
    queries = F.normalize(fn.flatten(2), dim=1, eps=eps) / temperature  # (B, C, Ln)
    n_from_m, m_from_n = _sdpa(keys, fm.flatten(2), fn.flatten(2), queries=queries)
    return n_from_m.reshape(fn.shape), m_from_n.reshape(fm.shape)


def _check_inputs(fm: Tensor, fn: Tensor, w_p: Tensor) -> None:
    """Pairs of features and a W_P of (C, C), or one per pair (B, C, C)."""
    _check_pair(fm, fn)
    c = fm.shape[1]
    if w_p.dim() not in (2, 3) or w_p.shape[-2:] != (c, c):
        raise ValueError(f"w_p must be ({c}, {c}) or (B, {c}, {c}), got {tuple(w_p.shape)}")
    if w_p.dim() == 3 and w_p.shape[0] != fm.shape[0]:
        raise ValueError(f"per-pair w_p needs batch {fm.shape[0]}, got {tuple(w_p.shape)}")


def _check_pair(fm: Tensor, fn: Tensor) -> None:
    if fm.dim() != 4 or fn.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(fm.shape)}, {tuple(fn.shape)}")
    if fm.shape[:2] != fn.shape[:2]:
        raise ValueError(f"batch and channels differ: {tuple(fm.shape)} vs {tuple(fn.shape)}")


def _sdpa(g: Tensor, m: Tensor, n: Tensor, queries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Both directions with two scaled_dot_product_attention calls (head dim = C): logits
    g^T q with q = ``queries`` (default: n itself), values m (read by n) and n (read by m)."""
    q = n if queries is None else queries
    g_t, m_t, n_t, q_t = (t.transpose(1, 2).unsqueeze(1) for t in (g, m, n, q))  # (B, 1, L, C)
    n_from_m = F.scaled_dot_product_attention(q_t, g_t, m_t, scale=1.0)  # (B, 1, Ln, C)
    m_from_n = F.scaled_dot_product_attention(g_t, q_t, n_t, scale=1.0)  # (B, 1, Lm, C)
    return n_from_m.squeeze(1).transpose(1, 2), m_from_n.squeeze(1).transpose(1, 2)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _add_bmm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, in place; a and b in the compute dtype, acc in the accumulation dtype."""
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


_FP16_LOGIT_LIMIT = 2.0**14  # largest |logit| a float16 product may produce (max is 65504)


def _fp16_col_norms(x: Tensor, step: int = 1024) -> Tensor | None:
    """max_l |x[:, :, l]| per pair (B,) in float32 for float16 x, else None (no scaling)."""
    if x.dtype != torch.float16:
        return None
    parts = [
        x[:, :, s : s + step].float().norm(dim=1).amax(dim=1) for s in range(0, x.shape[2], step)
    ]
    return torch.stack(parts, dim=1).amax(dim=1)  # (B,)


def _logits(keys_rows: Tensor, fn: Tensor, fn_norm: Tensor | None, acc: torch.dtype) -> Tensor:
    """keys_rows^T fn -> (B, c, Ln) in ``acc``. Float16 keys are first divided by a power of two
    so that no product overflows: |P_ij| <= |k_i| |f_j| (Cauchy-Schwarz) is kept below 2^14,
    and the logits are scaled back in float32. (bf16 and float32 share float32's range.)"""
    if fn_norm is None:
        return torch.bmm(keys_rows.transpose(1, 2), fn).to(acc)
    bound = keys_rows.float().norm(dim=1).amax(dim=1) * fn_norm  # (B,)
    scale = torch.exp2(torch.ceil(torch.log2(bound / _FP16_LOGIT_LIMIT)).clamp(min=0))
    scale = scale.view(-1, 1, 1)  # (B, 1, 1), powers of two: exact in float16
    scaled = keys_rows / scale.to(keys_rows.dtype)
    return torch.bmm(scaled.transpose(1, 2), fn).to(acc) * scale


def _keys(w: Tensor, fm_rows: Tensor) -> Tensor:
    """Keys of a block of positions of m: W_P^T F_m[:, :, rows] -> (B, C, c)."""
    return torch.matmul(w.transpose(-1, -2), fm_rows)


class _ChunkedCoAttention(torch.autograd.Function):
    """Both read-outs of Eq. 4 from blocks of rows of P; backward recomputes the blocks.

    Inputs fm (B, C, Lm), fn (B, C, Ln) and W_P (C, C) or (B, C, C) in one compute dtype;
    outputs fn_from_m (B, C, Ln) and fm_from_n (B, C, Lm) in that dtype. Saved for backward:
    the inputs, the outputs, two log-sum-exps, (B, Lm) and (B, Ln), and with ``save_keys``
    the keys W_P^T F_m (B, C, Lm).
    """

    @staticmethod
    def forward(ctx, fm: Tensor, fn: Tensor, w: Tensor, chunk: int, save_keys: bool):  # type: ignore[override]  # noqa: E501
        b, c, lm = fm.shape
        ln = fn.shape[2]
        dt, acc = fm.dtype, _acc_dtype(fm.dtype)
        col_max = fm.new_full((b, 1, ln), float("-inf"), dtype=acc)  # running max over m
        col_sum = fm.new_zeros((b, 1, ln), dtype=acc)  # running sum of exp over m
        n_from_m = fm.new_zeros((b, c, ln), dtype=acc)  # running (unnormalised) read-out
        m_from_n = fm.new_empty((b, c, lm))
        lse_rows = fm.new_empty((b, lm), dtype=acc)  # log-sum-exp over n, per position of m
        keys = fm.new_empty((b, c, lm)) if save_keys else None
        fn_norm = _fp16_col_norms(fn)  # (B,) for float16 only
        for s in range(0, lm, chunk):
            rows = slice(s, min(s + chunk, lm))
            fm_rows = fm[:, :, rows]  # (B, C, c)
            keys_rows = _keys(w, fm_rows)  # (B, C, c)
            if keys is not None:
                keys[:, :, rows] = keys_rows
            logits = _logits(keys_rows, fn, fn_norm, acc)  # (B, c, Ln)
            del keys_rows
            # F_m^{m∩n}: softmax over n (rows of this block are complete).
            lse = torch.logsumexp(logits, dim=2, keepdim=True)  # (B, c, 1)
            p_rows = torch.exp(logits - lse).to(dt)  # (B, c, Ln)
            m_from_n[:, :, rows] = torch.bmm(fn, p_rows.transpose(1, 2))  # (B, C, c)
            lse_rows[:, rows] = lse.squeeze(2)
            del p_rows
            # F_n^{m∩n}: softmax over m, accumulated across blocks with rescaling.
            new_max = torch.maximum(col_max, logits.amax(dim=1, keepdim=True))  # (B, 1, Ln)
            rescale = torch.exp(col_max - new_max)  # (B, 1, Ln)
            e = logits.sub_(new_max).exp_()  # (B, c, Ln), in place of the logits
            col_sum.mul_(rescale).add_(e.sum(dim=1, keepdim=True))
            n_from_m.mul_(rescale)
            _add_bmm(n_from_m, fm_rows, e.to(dt))  # += (B, C, c) @ (B, c, Ln)
            col_max = new_max
        n_from_m.div_(col_sum)
        lse_cols = (col_max + col_sum.log()).squeeze(1)  # (B, Ln)
        n_from_m = n_from_m.to(dt)
        ctx.chunk = chunk
        ctx.save_for_backward(fm, fn, w, n_from_m, m_from_n, lse_cols, lse_rows, keys)
        return n_from_m, m_from_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_n_from_m: Tensor, d_m_from_n: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        with torch.autocast(saved[0].device.type, enabled=False):
            return (*_backward(ctx.chunk, *saved, d_n_from_m, d_m_from_n), None, None)


def _backward(chunk, fm, fn, w, n_from_m, m_from_n, lse_cols, lse_rows, saved_keys, d_nm, d_mn):
    """Gradients w.r.t. fm, fn and W_P, block by block (recomputing the logits, and the keys
    unless they were saved).

    With p = softmax(s), out = sum p v: dv = p^T dout, dp = dout . v, ds = p (dp - delta),
    delta = dout . out. Both directions share the logits s = g^T fn with keys g = W_P^T fm,
    so their ds add up; then dg = fn ds^T, dfm += W_P dg, dW_P += fm dg^T, dfn += g ds.
    """
    b, c, lm = fm.shape
    dt, acc = fm.dtype, _acc_dtype(fm.dtype)
    d_nm, d_mn = d_nm.to(dt), d_mn.to(dt)
    delta_cols = _channel_dot(d_nm, n_from_m, acc)  # (B, Ln)
    delta_rows = _channel_dot(d_mn, m_from_n, acc)  # (B, Lm)
    d_fm = torch.empty_like(fm)
    d_fn = fn.new_zeros(fn.shape, dtype=acc)
    d_w = w.new_zeros(w.shape, dtype=acc)
    fn_norm = _fp16_col_norms(fn)  # (B,) for float16 only
    for s in range(0, lm, chunk):
        rows = slice(s, min(s + chunk, lm))
        fm_rows = fm[:, :, rows]  # (B, C, c)
        keys = _keys(w, fm_rows) if saved_keys is None else saved_keys[:, :, rows]  # (B, C, c)
        logits = _logits(keys, fn, fn_norm, acc)  # (B, c, Ln), as in forward
        p_cols = torch.exp(logits - lse_cols.unsqueeze(1))  # (B, c, Ln)  block of A_m
        p_rows = logits.sub_(lse_rows[:, rows].unsqueeze(2)).exp_()  # block of A_n^T
        # F_n^{m∩n} = F_m A_m: values fm, probabilities over m.
        d_fm_rows = torch.bmm(d_nm, p_cols.to(dt).transpose(1, 2)).to(acc)  # (B, C, c)
        ds = torch.bmm(fm_rows.transpose(1, 2), d_nm).to(acc)  # (B, c, Ln) = dp
        ds.sub_(delta_cols.unsqueeze(1)).mul_(p_cols)
        del p_cols
        # F_m^{m∩n} = F_n A_n: values fn, probabilities over n.
        d_rows = d_mn[:, :, rows]  # (B, C, c)
        _add_bmm(d_fn, d_rows, p_rows.to(dt))  # (B, C, c) @ (B, c, Ln)
        dp = torch.bmm(d_rows.transpose(1, 2), fn).to(acc)  # (B, c, Ln)
        ds.add_(dp.sub_(delta_rows[:, rows].unsqueeze(2)).mul_(p_rows))
        del p_rows, dp
        # Through the logits s = keys^T fn and the keys = W_P^T fm.
        ds_dt = ds.to(dt)
        _add_bmm(d_fn, keys, ds_dt)  # (B, C, c) @ (B, c, Ln)
        d_keys = torch.bmm(fn, ds_dt.transpose(1, 2))  # (B, C, c)
        del ds, ds_dt
        d_fm_rows.add_(torch.matmul(w, d_keys))  # W_P dg
        d_fm[:, :, rows] = d_fm_rows
        if w.dim() == 2:  # sum over the batch, pair by pair (no copies of the blocks)
            for k in range(b):
                if d_w.dtype == dt:
                    d_w.addmm_(fm_rows[k], d_keys[k].t())  # (C, c) @ (c, C)
                else:
                    d_w.add_(torch.mm(fm_rows[k], d_keys[k].t()))
        else:
            _add_bmm(d_w, fm_rows, d_keys.transpose(1, 2))  # (B, C, c) @ (B, c, C)
    return d_fm, d_fn.to(dt), d_w.to(dt)


def _channel_dot(a: Tensor, b: Tensor, acc: torch.dtype, step: int = 1024) -> Tensor:
    """sum_c a[:, c, l] * b[:, c, l] -> (B, L) in ``acc``, in slices of positions."""
    out = a.new_empty((a.shape[0], a.shape[2]), dtype=acc)
    for s in range(0, a.shape[2], step):
        sl = slice(s, s + step)
        out[:, sl] = (a[:, :, sl].to(acc) * b[:, :, sl].to(acc)).sum(1)
    return out
