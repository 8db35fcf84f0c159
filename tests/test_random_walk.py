"""AffinityNet random walk (psa): the sparse walk against the plain dense reference,
the transpose convention against psa's column-normalised form, and label propagation on a
constructed two-blob case."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcis_dist.affinity.random_walk import (
    affinity_to_sparse,
    dense_bytes,
    neighbour_offsets,
    propagate_to_labels,
    random_walk,
    random_walk_dense_reference,
    sparse_nnz,
    transition_matrix,
)

torch.set_num_threads(1)
F64 = torch.float64


def _inputs(c, h, w, radius, *, seed=0, dtype=F64, shape="disc"):
    g = torch.Generator().manual_seed(seed)
    offs = neighbour_offsets(radius, shape)
    aff = torch.rand(len(offs), h, w, generator=g, dtype=F64).to(dtype)  # not symmetric
    cams = torch.rand(c, h, w, generator=g, dtype=F64).to(dtype)
    return cams, aff, offs


def _dense_loops(aff, offsets, h, w):
    """A (N, N) entry by entry."""
    a = torch.zeros(h * w, h * w, dtype=aff.dtype)
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(offsets):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    a[y * w + x, (y + dy) * w + x + dx] = aff[k, y, x]
    return a


def test_neighbour_offsets():
    offs = neighbour_offsets(5)
    assert len(offs) == 69  # psa: dy² + dx² < 25, both directions, (0, 0) included
    assert (0, 0) in offs and offs == sorted(offs)
    assert all((-dy, -dx) in offs for dy, dx in offs)
    assert all(dy * dy + dx * dx < 25 for dy, dx in offs)
    assert neighbour_offsets(1) == [(0, 0)]
    assert len(neighbour_offsets(3, "square")) == 25
    with pytest.raises(ValueError, match="radius"):
        neighbour_offsets(0)
    with pytest.raises(ValueError, match="'disc', 'square'"):
        neighbour_offsets(3, "diamond")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("h,w,radius", [(6, 9, 3), (12, 12, 5), (1, 7, 3), (4, 3, 5)])
def test_affinity_to_sparse_matches_loops(h, w, radius, dtype):
    _, aff, offs = _inputs(1, h, w, radius, dtype=dtype)
    perm = torch.randperm(len(offs), generator=torch.Generator().manual_seed(3)).tolist()
    offs_shuffled, aff_shuffled = [offs[k] for k in perm], aff[perm]  # any offset order
    a = affinity_to_sparse(aff_shuffled, offs_shuffled, h, w)
    assert a.layout == torch.sparse_csr and a.shape == (h * w, h * w) and a.dtype == dtype
    assert a.values().numel() == sparse_nnz(h, w, offs)
    torch.testing.assert_close(a.to_dense(), _dense_loops(aff, offs, h, w), rtol=0, atol=0)


def test_affinity_to_sparse_errors():
    _, aff, offs = _inputs(1, 4, 5, 3)
    with pytest.raises(ValueError, match=r"\(25, 4, 6\), got \(25, 4, 5\)"):
        affinity_to_sparse(aff, offs, 4, 6)
    with pytest.raises(ValueError, match="duplicates"):
        affinity_to_sparse(aff[:2], [(0, 1), (0, 1)], 4, 5)


@pytest.mark.parametrize("layout", ["csr", "coo"])
@pytest.mark.parametrize("beta", [1.0, 8.0, 10.0])
def test_transition_rows_sum_to_one(beta, layout):
    h, w = 7, 10
    _, aff, offs = _inputs(1, h, w, 4)
    aff[offs.index((0, 0))] = 1.0  # self-affinity exp(0)
    a = affinity_to_sparse(aff, offs, h, w)
    if layout == "coo":
        a = a.to_sparse_coo()
    t = transition_matrix(a, beta)
    assert t.layout == torch.sparse_csr
    dense = t.to_dense()
    torch.testing.assert_close(dense.sum(1), torch.ones(h * w, dtype=F64))
    ref = _dense_loops(aff, offs, h, w).pow(beta)
    torch.testing.assert_close(dense, ref / ref.sum(1, keepdim=True))


def test_transition_zero_row_is_an_error():
    offs = [(0, 1), (0, -1)]  # no self-loop
    aff = torch.zeros(2, 1, 3, dtype=F64)
    aff[0, 0, 0] = aff[1, 0, 1] = 0.5  # position 2 has only zero affinities
    with pytest.raises(ValueError, match=r"1 of 3 rows of A\^beta sum to 0"):
        transition_matrix(affinity_to_sparse(aff, offs, 1, 3))


@pytest.mark.parametrize("method", ["sparse", "dense"])
@pytest.mark.parametrize(
    "h,w,radius,beta,steps",
    [
        (5, 7, 2, 8.0, 0),
        (5, 7, 2, 8.0, 1),
        (6, 6, 3, 1.0, 3),
        (9, 4, 3, 8.0, 37),
        (12, 12, 5, 8.0, 256),
        (10, 11, 5, 10.0, 100),
        (12, 9, 4, 2.5, 255),
        (3, 12, 5, 8.0, 64),
    ],
)
def test_walk_matches_dense_reference(h, w, radius, beta, steps, method):
    cams, aff, offs = _inputs(3, h, w, radius, seed=h * w + steps)
    ref = random_walk_dense_reference(cams, aff, offs, beta=beta, steps=steps)
    got = random_walk(cams, aff, offs, beta=beta, steps=steps, method=method)
    assert got.shape == cams.shape and got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_walk_float32(method):
    cams, aff, offs = _inputs(4, 11, 12, 5, seed=5)
    ref = random_walk_dense_reference(cams, aff, offs, beta=8, steps=256)
    got = random_walk(cams.float(), aff.float(), offs, beta=8, steps=256, method=method)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_walk_convention_is_psa_for_symmetric_affinity():
    """For symmetric A the walk is psa's row vector times column-normalised A^β, t times."""
    h, w, beta, logt = 8, 9, 8.0, 4
    offs = neighbour_offsets(4, "square")
    g = torch.Generator().manual_seed(7)
    feat = torch.rand(5, h + 8, w + 8, generator=g, dtype=F64)  # padded: neighbours exist
    aff = torch.empty(len(offs), h, w, dtype=F64)
    for k, (dy, dx) in enumerate(offs):  # AffinityNet's a_ij = exp(-mean_c |f_i - f_j|)
        here = feat[:, 4 : 4 + h, 4 : 4 + w]
        there = feat[:, 4 + dy : 4 + dy + h, 4 + dx : 4 + dx + w]
        aff[k] = torch.exp(-(here - there).abs().mean(0))
    a = _dense_loops(aff, offs, h, w).pow(beta)
    torch.testing.assert_close(a, a.T)
    trans = a / a.sum(0, keepdim=True)  # psa: columns sum to 1
    for _ in range(logt):
        trans = trans @ trans
    cams = torch.rand(3, h, w, generator=g, dtype=F64)
    psa = cams.reshape(3, -1) @ trans  # (C, N) row vectors times T_psa^t
    got = random_walk(cams, aff, offs, beta=beta, steps=2**logt)
    torch.testing.assert_close(got.reshape(3, -1), psa)


def test_constant_map_is_unchanged():
    _, aff, offs = _inputs(1, 9, 10, 5)
    cams = torch.full((2, 9, 10), 0.3, dtype=F64)
    torch.testing.assert_close(random_walk(cams, aff, offs, steps=50), cams)


class _LargestDense(TorchDispatchMode):
    """Records the largest strided (dense) tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


def test_sparse_walk_memory_is_linear_in_positions():
    h, w = 60, 70  # N = 4200: a dense T would be 17.6 M entries
    cams, aff, offs = _inputs(3, h, w, 5, dtype=torch.float32)
    with _LargestDense() as mode:
        random_walk(cams, aff, offs, steps=8)
    assert mode.largest <= h * w * len(offs)  # O(N * |offsets|), never N²
    assert dense_bytes(h * w) == 2 * (h * w) ** 2 * 4


def test_walk_errors():
    cams, aff, offs = _inputs(2, 5, 6, 3)
    with pytest.raises(ValueError, match=r"method must be one of \('sparse', 'dense'\)"):
        random_walk(cams, aff, offs, method="cg")
    with pytest.raises(ValueError, match="steps"):
        random_walk(cams, aff, offs, steps=-1)
    with pytest.raises(ValueError, match=r"cams must be \(C, h, w\)"):
        random_walk(cams[0], aff, offs)


def _blobs(h=8, w=12, hole=True):
    """Three column bands on an 8 x 12 grid: background (x < 4), class A (4 <= x < 8),
    class B (x >= 8); affinity 1 inside a band, 0 across. CAMs: 0.9 in their band except a
    'hole' of 0.1 (which alone would be background: (1 - 0.1)^16 = 0.19 > 0.1)."""
    offs = neighbour_offsets(5)
    band = torch.arange(w).div(4, rounding_mode="floor").expand(h, w)  # (h, w) in 0..2
    aff = torch.zeros(len(offs), h, w)
    for k, (dy, dx) in enumerate(offs):
        shifted = torch.full((h, w), -1)
        ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        yt, xt = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
        shifted[ys, xs] = band[yt, xt]
        aff[k] = (shifted == band).float()
    cams = torch.zeros(2, h, w)
    cams[0][band == 1], cams[1][band == 2] = 0.9, 0.9
    if hole:
        cams[0, 2:4, 5:7] = 0.1
        cams[1, 5, 9] = 0.1
    return cams, aff, offs, band


def _check_bands(labels, band, stride, want):
    """Labels equal the band's expected label away from (4 px of) band boundaries."""
    big = want[band].repeat_interleave(stride, 0).repeat_interleave(stride, 1)
    cols = torch.arange(big.shape[1])
    far = ((cols - 32).abs() >= 4) & ((cols - 64).abs() >= 4)
    assert torch.equal(labels[:, far].long(), big[:, far])
    assert (labels.long() == big).float().mean() >= 0.95


@pytest.mark.parametrize("background", ["power", "constant"])
@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_propagate_to_labels_two_blobs(background, method):
    cams, aff, offs, band = _blobs()
    labels = propagate_to_labels(
        cams, aff, offs, (64, 96), background=background, method=method, stride=8
    )
    assert labels.shape == (64, 96) and labels.dtype == torch.uint8
    _check_bands(labels, band, 8, torch.tensor([0, 1, 2]))
    # without the walk the holes would be background (power) / stay as they are
    no_walk = propagate_to_labels(cams, aff, offs, (64, 96), steps=0, stride=8)
    assert (no_walk[20:28, 44:52] == 0).all()  # the interior of one hole


def test_propagate_to_labels_options():
    cams, aff, offs, band = _blobs(hole=False)
    ids = propagate_to_labels(cams, aff, offs, (64, 96), class_ids=[15, 300])
    assert ids.dtype == torch.int64  # 300 does not fit in uint8
    _check_bands(ids, band, 8, torch.tensor([0, 15, 300]))
    cropped = propagate_to_labels(cams, aff, offs, (60, 90), stride=8)
    assert cropped.shape == (60, 90)
    full = propagate_to_labels(cams, aff, offs, (64, 96), stride=8)
    assert torch.equal(cropped, full[:60, :90])  # psa: pad bottom/right, crop after
    empty = propagate_to_labels(cams[:0], aff, offs, (20, 30))
    assert empty.shape == (20, 30) and not empty.any()


def test_propagate_to_labels_errors():
    cams, aff, offs, _ = _blobs()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        propagate_to_labels(cams * 3, aff, offs, (64, 96))
    with pytest.raises(ValueError, match=r"background must be one of \('power', 'constant'\)"):
        propagate_to_labels(cams, aff, offs, (64, 96), background="otsu")
    with pytest.raises(ValueError, match="class_ids must be 2 labels"):
        propagate_to_labels(cams, aff, offs, (64, 96), class_ids=[3])
    with pytest.raises(ValueError, match="larger than the grid"):
        propagate_to_labels(cams, aff, offs, (65, 96), stride=8)
