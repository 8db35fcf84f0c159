"""Co-attention (Eq. 2-4): the dense reference against the equations, the memory-efficient
path against the dense reference (values and gradients), AMP and memory behaviour."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcis_dist.models.coattention import (
    DEFAULT_CHUNK,
    coattention,
    coattention_dense,
    project_keys,
)

F64 = torch.float64


def _inputs(b, c, hm, wm, hn, wn, *, per_pair=False, scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    fm = (torch.randn(b, c, hm, wm, generator=g, dtype=dtype) * scale).requires_grad_()
    fn = (torch.randn(b, c, hn, wn, generator=g, dtype=dtype) * scale).requires_grad_()
    shape = (b, c, c) if per_pair else (c, c)
    w_p = (torch.randn(*shape, generator=g, dtype=dtype) / c**0.5).requires_grad_()
    return fm, fn, w_p


def _loss_and_grads(outs, inputs, seed=1):
    """A generic scalar of both outputs (random weights) and its gradients."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    return torch.autograd.grad(loss, inputs)


def _equations(fm, fn, w_p):
    """Eq. 2-4 written out position by position (slow): returns (F_n^{m∩n}, F_m^{m∩n})."""
    b, c = fm.shape[:2]
    fm_flat, fn_flat = fm.reshape(b, c, -1), fn.reshape(b, c, -1)
    lm, ln = fm_flat.shape[2], fn_flat.shape[2]
    n_from_m = torch.zeros_like(fn_flat)
    m_from_n = torch.zeros_like(fm_flat)
    for k in range(b):
        w = w_p if w_p.dim() == 2 else w_p[k]
        p = [[fm_flat[k, :, i] @ w @ fn_flat[k, :, j] for j in range(ln)] for i in range(lm)]
        for j in range(ln):  # column j of A_m: softmax over positions i of m
            col = torch.stack([p[i][j] for i in range(lm)]).softmax(0)
            n_from_m[k, :, j] = sum(col[i] * fm_flat[k, :, i] for i in range(lm))
        for i in range(lm):  # column i of A_n: softmax over positions j of n
            row = torch.stack(p[i]).softmax(0)
            m_from_n[k, :, i] = sum(row[j] * fn_flat[k, :, j] for j in range(ln))
    return n_from_m.view_as(fn), m_from_n.view_as(fm)


@pytest.mark.parametrize("per_pair", [False, True])
def test_dense_reference_follows_the_equations(per_pair):
    fm, fn, w_p = _inputs(2, 3, 2, 3, 3, 1, per_pair=per_pair)
    got = coattention_dense(fm, fn, w_p)
    want = _equations(fm, fn, w_p)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_keys_make_the_affinity_of_eq2():
    fm, fn, w_p = _inputs(2, 4, 3, 2, 2, 2)
    p = torch.einsum("bcl,cd,bdk->blk", fm.flatten(2), w_p, fn.flatten(2))  # F_m^T W_P F_n
    keys = project_keys(fm, w_p).flatten(2)
    torch.testing.assert_close(keys.transpose(1, 2) @ fn.flatten(2), p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape, chunk",
    [
        ((2, 8, 5, 7, 4, 6), 3),  # chunk does not divide HW_m = 35, m and n differ
        ((3, 5, 4, 4, 4, 4), 16),  # one block
        ((2, 6, 3, 5, 6, 2), 1),  # one row per block
        ((1, 4, 7, 3, 2, 9), 100),  # chunk larger than HW_m
        ((2, 8, 5, 7, 4, 6), None),  # the default
    ],
)
@pytest.mark.parametrize("per_pair", [False, True])
@pytest.mark.parametrize("save_keys", [False, True])
def test_chunked_matches_dense_values_and_gradients(shape, chunk, per_pair, save_keys):
    fm, fn, w_p = _inputs(*shape, per_pair=per_pair)
    ref = coattention_dense(fm, fn, w_p)
    got = coattention(fm, fn, w_p, chunk_size=chunk, save_keys=save_keys)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and a.dtype == F64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads_ref = _loss_and_grads(ref, (fm, fn, w_p))
    grads_got = _loss_and_grads(got, (fm, fn, w_p))
    for a, b in zip(grads_got, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_float32_error_is_round_off_like_the_dense_path():
    """In float32 both paths sit at round-off distance from the float64 truth."""
    fm, fn, w_p = _inputs(4, 32, 9, 9, 7, 8, scale=2.0)
    truth = coattention_dense(fm, fn, w_p)
    truth = [*truth, *_loss_and_grads(truth, (fm, fn, w_p))]
    f32 = [t.detach().float().requires_grad_() for t in (fm, fn, w_p)]
    errors = {}
    for name, run in (("dense", coattention_dense), ("chunked", coattention)):
        outs = run(*f32) if name == "dense" else run(*f32, chunk_size=20)
        got = [*outs, *_loss_and_grads(outs, f32)]
        errors[name] = [
            (a.double() - b).abs().max() / b.abs().max() for a, b in zip(got, truth, strict=True)
        ]
    for e_chunked, e_dense in zip(errors["chunked"], errors["dense"], strict=True):
        assert e_chunked <= 1e-5
        assert e_chunked <= 4 * e_dense + 1e-7


def test_large_logits_are_stable():
    """Affinities of hundreds (peaked softmax): the running max keeps exp() finite."""
    fm, fn, w_p = _inputs(2, 16, 6, 6, 5, 5, scale=8.0)
    ref = coattention_dense(fm, fn, w_p)
    got = coattention(fm, fn, w_p, chunk_size=7)
    assert (fm.flatten(2).transpose(1, 2) @ w_p @ fn.flatten(2)).abs().max() > 100
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for g in _loss_and_grads(got, (fm, fn, w_p)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("per_pair", [False, True])
@pytest.mark.parametrize("save_keys", [False, True])
def test_gradcheck_chunked(per_pair, save_keys):
    fm, fn, w_p = _inputs(2, 3, 2, 3, 2, 2, per_pair=per_pair)
    assert torch.autograd.gradcheck(
        lambda a, b, w: coattention(a, b, w, chunk_size=4, save_keys=save_keys), (fm, fn, w_p)
    )


def test_one_output_alone_backpropagates():
    fm, fn, w_p = _inputs(2, 4, 3, 3, 2, 3)
    n_from_m, _ = coattention(fm, fn, w_p, chunk_size=2)
    ref, _ = coattention_dense(fm, fn, w_p)
    got = torch.autograd.grad(n_from_m.square().sum(), (fm, fn, w_p))
    want = torch.autograd.grad(ref.square().sum(), (fm, fn, w_p))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_sdpa_backend_matches_dense():
    fm, fn, w_p = _inputs(2, 8, 4, 5, 3, 3)
    ref = coattention_dense(fm, fn, w_p)
    got = coattention(fm, fn, w_p, backend="sdpa")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    grads, grads_ref = _loss_and_grads(got, (fm, fn, w_p)), _loss_and_grads(ref, (fm, fn, w_p))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("path", ["chunked", "dense"])
def test_bf16_autocast_runs_and_is_close_to_fp32(path):
    fm, fn, w_p = _inputs(2, 32, 6, 6, 5, 7, dtype=torch.float32, scale=0.5)
    run = (
        (lambda: coattention_dense(fm, fn, w_p))
        if path == "dense"
        else (lambda: coattention(fm, fn, w_p, chunk_size=10))
    )
    ref = coattention_dense(fm, fn, w_p)
    grads_ref = _loss_and_grads(ref, (fm, fn, w_p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
        assert all(o.dtype == torch.bfloat16 for o in got)
    grads = _loss_and_grads(got, (fm, fn, w_p))
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        assert (a.float() - b).abs().max() <= 0.05 * b.abs().max()
    for a, b in zip(grads, grads_ref, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - b).abs().max() <= 0.08 * b.abs().max()


def test_bf16_autocast_chunked_agrees_with_dense_autocast():
    fm, fn, w_p = _inputs(2, 16, 5, 5, 4, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = coattention_dense(fm, fn, w_p)
        got = coattention(fm, fn, w_p, chunk_size=6)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_fp16_autocast_does_not_overflow_the_logits():
    """|P| beyond float16's 65504: the dense products overflow, the chunked path scales them."""
    g = torch.Generator().manual_seed(4)
    fm = (torch.rand(2, 16, 4, 4, generator=g) * 100).requires_grad_()
    fn = (torch.rand(2, 16, 3, 3, generator=g) * 100).requires_grad_()
    w_p = torch.eye(16).requires_grad_()
    assert (fm.flatten(2).transpose(1, 2) @ fn.flatten(2)).abs().max() > 65504
    ref = coattention_dense(fm, fn, w_p)
    with torch.autocast("cpu", dtype=torch.float16):
        naive = coattention_dense(fm, fn, w_p)
        got = coattention(fm, fn, w_p, chunk_size=5)
    assert not all(torch.isfinite(o).all() for o in naive)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b, rtol=2e-3, atol=0.1)
    assert all(torch.isfinite(gr).all() for gr in _loss_and_grads(got, (fm, fn, w_p)))


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("side", [12, 20])
def test_chunked_never_builds_the_affinity_matrix(side):
    """Largest intermediate: one block (B, chunk, HW_n) or one feature map, never (B, HW, HW);
    so it grows linearly with the number of positions."""
    b, c, chunk = 2, 8, 16
    fm, fn, w_p = _inputs(b, c, side, side, side, side, dtype=torch.float32)
    positions = side * side
    with _LargestTensor() as rec:
        outs = coattention(fm, fn, w_p, chunk_size=chunk, save_keys=False)
        _loss_and_grads(outs, (fm, fn, w_p))
    assert rec.largest <= max(b * chunk * positions, b * c * positions, c * c)
    assert rec.largest < b * positions * positions // 4
    with _LargestTensor() as dense:
        _loss_and_grads(coattention_dense(fm, fn, w_p), (fm, fn, w_p))
    assert dense.largest >= b * positions * positions


def test_default_chunk_is_positive():
    assert isinstance(DEFAULT_CHUNK, int) and DEFAULT_CHUNK >= 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"w_p": torch.zeros(3, 3)}, "w_p must be"),
        ({"w_p": torch.zeros(5, 4, 4)}, "per-pair w_p"),
        ({"backend": "flash"}, "backend must be one of"),
        ({"chunk_size": 0}, "chunk_size must be"),
        ({"fn": torch.zeros(2, 3, 2, 2)}, "batch and channels differ"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = {"fm": torch.zeros(2, 4, 3, 3), "fn": torch.zeros(2, 4, 2, 2), "w_p": torch.zeros(4, 4)}
    args.update(kwargs)
    fm, fn, w_p = args.pop("fm"), args.pop("fn"), args.pop("w_p")
    with pytest.raises(ValueError, match=match):
        coattention(fm, fn, w_p, **args)
