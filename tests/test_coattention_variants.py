"""The cosine co-attention variant, the classifier's affinity / temperature / W_P-init options,
contribution maps, the authors' test-time maps, draws with replacement and the attention
diagnostics, each against a slow reference written out position by position."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcis_dist.cams.infer import CamEngine, CamSettings, authors_maps, resize_long
from mcis_dist.config import TrainConfig
from mcis_dist.data.related import RelatedSampler
from mcis_dist.data.transforms import normalize
from mcis_dist.models import diagnostics
from mcis_dist.models.coattention import coattention_cosine, coattention_dense
from mcis_dist.models.mcis import MCISClassifier, contribution_map
from mcis_dist.runtime.optim import build_optimizer
from mcis_dist.shards.images import encode_png

F64 = torch.float64
C = 6  # channels of the tiny backbone
K = 4  # classes


# ---- slow references -----------------------------------------------------------------------
def _ref_logits(fm, fn, w_p, tau=None, eps=1e-6):
    """P[b, i, j] position by position: bilinear f_m,i^T W_P f_n,j (tau None), or cosine
    normalize(W_P^T f_m,i) . normalize(f_n,j) / tau. Returns (B, Lm, Ln)."""
    b, c = fm.shape[:2]
    fm_f, fn_f = fm.reshape(b, c, -1), fn.reshape(b, c, -1)
    out = []
    for k in range(b):
        w = w_p if w_p.dim() == 2 else w_p[k]
        rows = []
        for i in range(fm_f.shape[2]):
            g = w.t() @ fm_f[k, :, i]  # key of position i: g . f = f_m,i^T W_P f
            if tau is not None:
                g = g / torch.clamp(g.norm(), min=eps)
            row = []
            for j in range(fn_f.shape[2]):
                q = fn_f[k, :, j]
                if tau is not None:
                    q = q / torch.clamp(q.norm(), min=eps) / tau
                row.append(g @ q)
            rows.append(torch.stack(row))
        out.append(torch.stack(rows))
    return torch.stack(out)


def _ref_coattention(fm, fn, w_p, tau=None):
    """Eq. 3-4 on ``_ref_logits``, column by column: (fn_from_m, fm_from_n)."""
    b, c = fm.shape[:2]
    fm_f, fn_f = fm.reshape(b, c, -1), fn.reshape(b, c, -1)
    p = _ref_logits(fm, fn, w_p, tau)
    lm, ln = p.shape[1:]
    n_from_m, m_from_n = [], []
    for k in range(b):
        cols = []
        for j in range(ln):  # softmax over the positions i of m
            a = torch.softmax(p[k, :, j], dim=0)
            cols.append(sum(a[i] * fm_f[k, :, i] for i in range(lm)))
        n_from_m.append(torch.stack(cols, dim=1))
        rows = []
        for i in range(lm):  # softmax over the positions j of n
            a = torch.softmax(p[k, i, :], dim=0)
            rows.append(sum(a[j] * fn_f[k, :, j] for j in range(ln)))
        m_from_n.append(torch.stack(rows, dim=1))
    return torch.stack(n_from_m).view_as(fn), torch.stack(m_from_n).view_as(fm)


def _grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    return torch.autograd.grad(loss, inputs)


def _rand(*shape, seed=0, scale=1.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_(grad)


# ---- a tiny classifier -----------------------------------------------------------------------
class _Backbone(nn.Module):
    """Stride-8 backbone contract: ``out_channels`` and (B, C, H/8, W/8)."""

    def __init__(self, channels: int = C):
        super().__init__()
        self.out_channels = channels
        self.conv = nn.Conv2d(3, channels, 8, stride=8)

    def forward(self, x):
        return self.conv(x)


def _model(seed=0, dtype=F64, channels=C, perturb=0.0, **kwargs):
    torch.manual_seed(seed)
    model = MCISClassifier(_Backbone(channels), num_classes=K, **kwargs).to(dtype)
    if perturb:  # a W_P away from its init, so that the attention is neither uniform nor I
        with torch.no_grad():
            model.w_p.add_(torch.randn_like(model.w_p) * perturb)
    return model


def _class_row(model, k):
    w = model.phi_co.weight[k, :, 0, 0].detach().to(F64)
    b = 0.0 if model.phi_co.bias is None else float(model.phi_co.bias[k].detach())
    return w, b


# =============================================================================================
# 1. coattention_cosine
# =============================================================================================
@pytest.mark.parametrize("per_pair", [False, True])
def test_cosine_coattention_values_and_grads_match_the_loop_reference(per_pair):
    b = 2
    fm = _rand(b, 5, 3, 2, seed=0, grad=True)
    fn = _rand(b, 5, 2, 3, seed=1, scale=2.0, grad=True)
    w_p = _rand(*((b, 5, 5) if per_pair else (5, 5)), seed=2, grad=True)
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)  # a learnable 0-d temperature
    got = coattention_cosine(fm, fn, w_p, tau)
    want = _ref_coattention(fm, fn, w_p, tau)
    for a, e in zip(got, want, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    g_got = _grads(got, (fm, fn, w_p, tau))
    g_want = _grads(want, (fm, fn, w_p, tau))
    for a, e in zip(g_got, g_want, strict=True):
        assert a.shape == e.shape and e.abs().sum() > 0
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
    # a float temperature gives the same result as the tensor
    as_float = coattention_cosine(fm, fn, w_p, 0.3)
    for a, e in zip(as_float, got, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # and the temperature matters
    assert not torch.allclose(coattention_cosine(fm, fn, w_p, 1.0)[0], got[0])


# A float is checked; a tensor is not (no device sync per call: the model's is exp(log tau) > 0).
@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan")])
def test_cosine_coattention_rejects_a_non_positive_temperature(temperature):
    fm, fn = _rand(1, 3, 2, 2), _rand(1, 3, 2, 2, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        coattention_cosine(fm, fn, torch.eye(3, dtype=F64), temperature)


@pytest.mark.parametrize("shape", [(3, 4), (4, 4), (2, 3, 3, 1), (3,), (2, 4, 3)])
def test_cosine_coattention_rejects_a_wrong_w_p_shape(shape):
    fm, fn = _rand(2, 3, 2, 2), _rand(2, 3, 2, 2, seed=1)
    with pytest.raises(ValueError, match="w_p"):
        coattention_cosine(fm, fn, torch.zeros(shape, dtype=F64), 0.1)


def test_cosine_with_identity_and_small_temperature_reads_the_matching_position():
    b, c, hm, wm = 2, 16, 3, 3
    fm = _rand(b, c, hm, wm, seed=3)
    lm = hm * wm
    picks = torch.tensor([[4, 0, 7, 2], [8, 1, 3, 5]])  # query j of pair k copies key picks[k, j]
    scales = torch.tensor([3.7, 0.2, 11.0, 1.0], dtype=F64)
    fn = torch.stack([fm.flatten(2)[k][:, picks[k]] * scales for k in range(b)]).view(b, c, 2, 2)
    # the test is meaningful: distinct positions of m are clearly not parallel
    unit = F.normalize(fm.flatten(2), dim=1)
    cos = unit.transpose(1, 2) @ unit - 2 * torch.eye(lm, dtype=F64)
    assert cos.max() < 0.95
    fn_from_m, fm_from_n = coattention_cosine(fm, fn, torch.eye(c, dtype=F64), 1e-3)
    for k in range(b):
        for j in range(4):
            i = int(picks[k, j])
            torch.testing.assert_close(
                fn_from_m[k].flatten(1)[:, j], fm[k].flatten(1)[:, i], rtol=1e-9, atol=1e-9
            )
            # and the copied key position reads its query back (each copied once)
            torch.testing.assert_close(
                fm_from_n[k].flatten(1)[:, i], fn[k].flatten(1)[:, j], rtol=1e-9, atol=1e-9
            )


def test_cosine_zero_features_attend_uniformly():
    fm, fn = _rand(1, 4, 2, 2), _rand(1, 4, 1, 3, seed=1)
    fm[0, :, 0, 1] = 0  # a zero key: its row of P is 0, it reads n uniformly
    fn[0, :, 0, 2] = 0  # a zero query: its column of P is 0, it reads m uniformly
    w_p = _rand(4, 4, seed=2)
    fn_from_m, fm_from_n = coattention_cosine(fm, fn, w_p, 0.05)
    torch.testing.assert_close(fn_from_m[0, :, 0, 2], fm[0].flatten(1).mean(1))
    torch.testing.assert_close(fm_from_n[0, :, 0, 1], fn[0].flatten(1).mean(1))
    want = _ref_coattention(fm, fn, w_p, 0.05)
    torch.testing.assert_close(fn_from_m, want[0])
    torch.testing.assert_close(fm_from_n, want[1])


# =============================================================================================
# 2. MCISClassifier options
# =============================================================================================
def test_default_affinity_is_the_bilinear_eq2_to_4():
    model = _model(perturb=1.0)
    assert model.affinity == "bilinear" and model.w_p_init == "uniform"
    fm, fn = _rand(2, C, 3, 2, seed=4, grad=True), _rand(2, C, 2, 2, seed=5, grad=True)
    m_coatt, n_coatt = model.coattentive_features(fm, fn)
    n_dense, m_dense = coattention_dense(fm, fn, model.w_p[0])
    torch.testing.assert_close(m_coatt, m_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(n_coatt, n_dense, rtol=1e-10, atol=1e-10)
    n_ref, m_ref = _ref_coattention(fm, fn, model.w_p[0])
    torch.testing.assert_close(m_coatt, m_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(n_coatt, n_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("domains", [1, 3])
def test_cosine_model_coattentive_features_match_the_reference(domains):
    model = _model(affinity="cosine", temperature=0.2, perturb=0.5, domains=domains)
    assert model.w_p_init == "identity"
    fm, fn = _rand(3, C, 2, 3, seed=6, grad=True), _rand(3, C, 3, 2, seed=7, grad=True)
    types = None if domains == 1 else torch.tensor([2, 0, 2])
    m_coatt, n_coatt = model.coattentive_features(fm, fn, types)
    tau = torch.tensor(0.2, dtype=F64)
    torch.testing.assert_close(model.temperature, tau, rtol=1e-6, atol=0)
    for b in range(3):
        w = model.w_p[0 if types is None else int(types[b])]
        n_ref, m_ref = _ref_coattention(fm[b : b + 1], fn[b : b + 1], w, model.temperature)
        torch.testing.assert_close(m_coatt[b : b + 1], m_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(n_coatt[b : b + 1], n_ref, rtol=1e-10, atol=1e-10)
    # gradients w.r.t. the features and W_P, too
    outs = model.coattentive_features(fm, fn, types)
    got = _grads(outs, (fm, fn, model.w_p))
    w_p = model.w_p.detach().clone().requires_grad_()
    refs = [
        _ref_coattention(
            fm[b : b + 1],
            fn[b : b + 1],
            w_p[0 if types is None else int(types[b])],
            model.temperature,
        )
        for b in range(3)
    ]
    want = _grads((torch.cat([r[1] for r in refs]), torch.cat([r[0] for r in refs])), (fm, fn, w_p))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_w_p_init_defaults_and_options():
    eye = torch.eye(C, dtype=F64)
    cos = _model(affinity="cosine")
    assert cos.w_p_init == "identity"
    torch.testing.assert_close(cos.w_p.detach()[0], eye, rtol=0, atol=0)
    bil = _model()
    assert bil.w_p_init == "uniform"
    bound = 1 / math.sqrt(C)
    assert bil.w_p.abs().max() <= bound and not torch.allclose(bil.w_p.detach()[0], eye)
    assert bil.w_p.detach().std() > 0.3 * bound  # spread over the interval, not constant
    both = [_model(w_p_init="identity"), _model(affinity="cosine", w_p_init="uniform")]
    assert both[0].affinity == "bilinear" and torch.equal(both[0].w_p.detach()[0], eye)
    torch.testing.assert_close(both[1].w_p.detach(), bil.w_p.detach(), rtol=0, atol=0)
    three = _model(affinity="cosine", domains=3)
    assert torch.equal(three.w_p.detach(), eye.expand(3, C, C))
    with pytest.raises(ValueError, match="w_p_init"):
        _model(w_p_init="zeros")
    with pytest.raises(ValueError, match="affinity"):
        _model(affinity="dot")
    with pytest.raises(ValueError, match="temperature"):
        _model(affinity="cosine", temperature=0.0)


@pytest.mark.parametrize("domains", [1, 3])
def test_initial_w_p_is_reproducible_whatever_the_global_seed(domains):
    a, b = _model(seed=1, domains=domains), _model(seed=2, domains=domains)
    assert not torch.allclose(a.phi.weight, b.phi.weight)  # the seeds did differ
    torch.testing.assert_close(a.w_p.detach(), b.w_p.detach(), rtol=0, atol=0)
    init = a.initial_w_p()
    assert init.shape == (domains, C, C)
    torch.testing.assert_close(a.w_p.detach().float(), init, rtol=0, atol=0)
    torch.testing.assert_close(b.initial_w_p(), init, rtol=0, atol=0)
    # initial_w_p does not change with training, and reset_head restores it
    with torch.no_grad():
        a.w_p.add_(1.0)
    torch.testing.assert_close(a.initial_w_p(), init, rtol=0, atol=0)
    a.reset_head()
    torch.testing.assert_close(a.w_p.detach().float(), init, rtol=0, atol=0)


def test_learned_temperature_is_a_bias_like_parameter_with_the_right_gradient():
    model = _model(affinity="cosine", temperature=0.3, learn_temperature=True, perturb=0.5)
    assert isinstance(model.log_temperature, nn.Parameter) and model.log_temperature.dim() == 0
    torch.testing.assert_close(
        model.log_temperature.detach(), torch.tensor(math.log(0.3), dtype=F64), rtol=1e-6, atol=0
    )
    groups = model.param_groups()
    where = [name for name, ps in groups.items() for p in ps if p is model.log_temperature]
    assert where == ["new_bias"]
    assert "log_temperature" in model.state_dict()
    # the optimiser gives it no weight decay
    opt = build_optimizer(model, TrainConfig(weight_decay=1e-3))
    (group,) = [g for g in opt.param_groups if any(p is model.log_temperature for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["name"] == "new_bias"

    fm, fn = _rand(2, C, 2, 3, seed=8), _rand(2, C, 3, 2, seed=9)

    def loss_of(outs):
        g = torch.Generator().manual_seed(3)
        return sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outs)

    (got,) = torch.autograd.grad(
        loss_of(model.coattentive_features(fm, fn)), [model.log_temperature]
    )
    log_t = model.log_temperature.detach().clone().requires_grad_()
    n_ref, m_ref = _ref_coattention(fm, fn, model.w_p[0].detach(), log_t.exp())
    (want,) = torch.autograd.grad(loss_of((m_ref, n_ref)), [log_t])
    assert want.abs() > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # central finite differences on log tau
    h, base = 1e-6, float(model.log_temperature)
    values = []
    with torch.no_grad():
        for step in (h, -h):
            model.log_temperature.fill_(base + step)
            values.append(float(loss_of(model.coattentive_features(fm, fn))))
        model.log_temperature.fill_(base)
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(fd - float(got)) <= 1e-6 * max(1.0, abs(fd))


def test_learn_temperature_needs_the_cosine_affinity():
    with pytest.raises(ValueError, match="learn_temperature"):
        _model(learn_temperature=True)
    with pytest.raises(ValueError, match="learn_temperature"):
        _model(affinity="bilinear", learn_temperature=True)


def test_a_fixed_temperature_is_not_in_the_state_dict():
    model = _model(affinity="cosine", temperature=0.05)
    assert not isinstance(model.log_temperature, nn.Parameter)
    assert "log_temperature" not in model.state_dict()
    # an old checkpoint (no temperature, bilinear head) loads strictly; tau stays from config
    old = _model(seed=3)
    model.load_state_dict(old.state_dict(), strict=True)
    torch.testing.assert_close(model.temperature, torch.tensor(0.05, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.w_p, old.w_p, rtol=0, atol=0)
    # the buffer is not a parameter (not trained, not in any lr group)
    assert all(p is not model.log_temperature for ps in model.param_groups().values() for p in ps)


@pytest.mark.parametrize("affinity", ["bilinear", "cosine"])
def test_affinity_logits_match_the_reference(affinity):
    model = _model(affinity=affinity, temperature=0.25, perturb=0.7, domains=3)
    fm, fn = _rand(2, C, 3, 2, seed=10), _rand(2, C, 2, 3, seed=11)
    tau = model.temperature if affinity == "cosine" else None
    got = model.affinity_logits(fm, fn)
    assert got.shape == (2, 6, 6)
    torch.testing.assert_close(got, _ref_logits(fm, fn, model.w_p[0], tau), rtol=1e-10, atol=1e-10)
    w = model.w_p[2]
    torch.testing.assert_close(
        model.affinity_logits(fm, fn, w), _ref_logits(fm, fn, w, tau), rtol=1e-10, atol=1e-10
    )
    if affinity == "cosine":  # bounded by 1 / tau
        assert got.abs().max() <= 1 / 0.25 + 1e-9


# =============================================================================================
# 3. contribution_map
# =============================================================================================
def _ref_contribution(model, feats, related, k, layer="phi_co", from_object=False, minmax=False):
    """Loops: L_m * sum_j v_j softmax_i(P[:, j])[i] * (w·f_i + b), v_j = 1/L_r, or (from_object)
    ReLU(phi(f_r,j)[k]) / sum_j' ReLU(phi(f_r,j')[k]); ``minmax``: the evidence w·f_i + b mapped
    to (e - min_i e) / (max_i e - min_i e) over the query's positions first."""
    tau = model.temperature if model.affinity == "cosine" else None
    conv = model.phi_co if layer == "phi_co" else model.phi
    w = conv.weight[k, :, 0, 0].detach().to(F64)
    bias = 0.0 if conv.bias is None else float(conv.bias[k])
    b, c, h, wd = feats.shape
    lm = h * wd
    out = torch.zeros(b, lm, dtype=F64)
    for q in range(b):
        f = feats[q].reshape(c, lm)
        for r in range(related.shape[0]):
            p = _ref_logits(feats[q : q + 1], related[r : r + 1], model.w_p[0], tau)[0]
            lr = p.shape[1]
            v = [1.0 / lr] * lr
            if from_object:
                fr = related[r].reshape(c, lr)
                w1 = model.phi.weight[k, :, 0, 0].detach().to(F64)
                b1 = 0.0 if model.phi.bias is None else float(model.phi.bias[k])
                ev = [max(float(w1 @ fr[:, j] + b1), 0.0) for j in range(lr)]
                v = [e / sum(ev) for e in ev] if sum(ev) > 0 else v
            ev = [float(w @ f[:, i] + bias) for i in range(lm)]
            if minmax:
                lo, hi = min(ev), max(ev)
                ev = [(e - lo) / (hi - lo) if hi > lo else 0.0 for e in ev]
            for i in range(lm):
                received = lm * sum(v[j] * torch.softmax(p[:, j], 0)[i] for j in range(lr))
                out[q, i] += received * ev[i]
    return (out / related.shape[0]).view(b, h, wd)


@pytest.mark.parametrize("affinity", ["bilinear", "cosine"])
@pytest.mark.parametrize("layer, from_object", [("phi", False), ("phi_co", True), ("phi", True)])
def test_contribution_read_out_options_match_the_loop_reference(affinity, layer, from_object):
    """The read-out with phi's evidence (Eq. 1) and/or only the attention the related image's
    class-k region pays (its single-round map as weights over its positions)."""
    model = _model(affinity=affinity, perturb=1.0).eval()
    with torch.no_grad():
        model.phi.bias.copy_(torch.linspace(-1, 1, K, dtype=F64))
    feats = _rand(2, C, 3, 4, seed=21)
    related = torch.cat([_rand(1, C, 2, 3, seed=22), _rand(1, C, 2, 3, seed=23) * 2])
    for k in (0, 3):
        got = contribution_map(model, feats, related, k, layer=layer, from_object=from_object)
        want = _ref_contribution(model, feats, related, k, layer, from_object)
        torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-6)
    # a related image with no evidence of k anywhere: uniform weights, the plain read-out
    with torch.no_grad():
        model.phi.weight[1].zero_()
        model.phi.bias[1] = -1.0
    got = contribution_map(model, feats, related, 1, layer=layer, from_object=True)
    plain = contribution_map(model, feats, related, 1, layer=layer)
    torch.testing.assert_close(got, plain)
    with pytest.raises(ValueError, match="layer must be one of"):
        contribution_map(model, feats, related, 0, layer="psi")


@pytest.mark.parametrize("affinity", ["bilinear", "cosine"])
def test_contribution_with_minmax_evidence_matches_the_loop_reference(affinity):
    """evidence="minmax": each pair's evidence min-max normalised before the attention weights
    it; with evidence negative everywhere the most attended position is no longer the lowest."""
    model = _model(affinity=affinity, perturb=1.0).eval()
    feats = _rand(2, C, 3, 4, seed=31)
    related = torch.cat([_rand(1, C, 2, 3, seed=32), _rand(1, C, 2, 3, seed=33)])
    for k in (0, 3):
        got = contribution_map(model, feats, related, k, evidence="minmax")
        want = _ref_contribution(model, feats, related, k, minmax=True)
        torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-6)
        assert (got >= 0).all()
    model = _model(affinity=affinity, perturb=1.0, phi_co_bias=True).eval()
    with torch.no_grad():  # evidence of class 0 negative everywhere: raw maps <= 0
        model.phi_co.weight[0].mul_(0.01)
        model.phi_co.bias[0] = -5.0
    raw = contribution_map(model, feats, related, 0)
    fixed = contribution_map(model, feats, related, 0, evidence="minmax")
    assert (raw <= 0).all() and (fixed >= 0).all() and fixed.amax() > 0
    with pytest.raises(ValueError, match="evidence must be one of"):
        contribution_map(model, feats, related, 0, evidence="relu")


@pytest.mark.parametrize(
    "affinity, shared_phi",
    [("bilinear", False), ("cosine", False), ("bilinear", True), ("cosine", True)],
)
def test_contribution_map_matches_the_loop_reference(affinity, shared_phi):
    model = _model(affinity=affinity, shared_phi=shared_phi, perturb=1.0).eval()
    if shared_phi:
        with torch.no_grad():
            model.phi.bias.copy_(torch.linspace(-1, 1, K, dtype=F64))
    feats = _rand(2, C, 3, 4, seed=12)
    related = torch.cat([_rand(1, C, 2, 3, seed=13), _rand(1, C, 2, 3, seed=14) * 2])
    for k in (0, 3):
        got = contribution_map(model, feats, related, k)
        assert got.shape == (2, 3, 4)
        want = _ref_contribution(model, feats, related, k)
        torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "affinity, shared_phi", [("bilinear", False), ("cosine", False), ("cosine", True)]
)
def test_contribution_map_sums_to_the_related_coattentive_score(affinity, shared_phi):
    """sum_i map_i / L_m = GAP(phi_co(F_r^{m∩r}))[k], the related image's Eq. 5 score, when the
    query is m and the related image is n (holds with phi_co's bias too: columns sum to 1)."""
    model = _model(affinity=affinity, shared_phi=shared_phi, perturb=1.0).eval()
    if shared_phi:
        with torch.no_grad():
            model.phi.bias.copy_(torch.linspace(-1, 1, K, dtype=F64))
    feats, related = _rand(3, C, 3, 4, seed=15), _rand(1, C, 4, 2, seed=16)
    with torch.no_grad():
        out = model.forward_features(fm=feats, fn=related.expand(3, -1, -1, -1))
    for k in range(K):
        total = contribution_map(model, feats, related, k).to(F64).sum(dim=(1, 2)) / 12
        torch.testing.assert_close(total, out.coatt_n[:, k], rtol=1e-5, atol=1e-6)
    # not the query's own score (the orientation matters)
    maps = torch.stack([contribution_map(model, feats, related, k) for k in range(K)], 1)
    assert not torch.allclose(maps.to(F64).sum(dim=(2, 3)) / 12, out.coatt_m, atol=1e-3)


@pytest.mark.parametrize("affinity", ["bilinear", "cosine"])
def test_contribution_map_weights_phi_co_bias_by_the_received_attention(affinity):
    """phi_co with a bias (phi_co_bias): each position contributes received * (w·f_i + b), the
    loop reference; its mean over positions is still the related image's Eq. 5 score, and the
    bias adds received * b (not b everywhere: unattended positions contribute nothing)."""
    model = _model(affinity=affinity, phi_co_bias=True, perturb=1.0).eval()
    with torch.no_grad():
        model.phi_co.bias.copy_(torch.linspace(-1, 1, K, dtype=F64))
    feats, related = _rand(2, C, 3, 4, seed=17), _rand(1, C, 4, 2, seed=18)
    with torch.no_grad():
        out = model.forward_features(fm=feats, fn=related.expand(2, -1, -1, -1))
    unbiased = _model(affinity=affinity, perturb=1.0).eval()  # the same weights, no bias
    unbiased.load_state_dict({k: v for k, v in model.state_dict().items() if k != "phi_coatt.bias"})
    received = _received(model, feats, related)  # (2, 3, 4)
    for k in (0, 3):
        got = contribution_map(model, feats, related, k).to(F64)
        tol = {"rtol": 1e-5, "atol": 1e-6}  # the map's affinity is float32
        torch.testing.assert_close(got, _ref_contribution(model, feats, related, k), **tol)
        torch.testing.assert_close(got.mean(dim=(1, 2)), out.coatt_n[:, k], **tol)
        without = contribution_map(unbiased, feats, related, k).to(F64)
        want = received * model.phi_co.bias[k].detach()
        torch.testing.assert_close(got - without, want, **tol)


def _received(model, feats, related):
    """L_m * mean_j softmax_i(P[:, j])[i] per query position, averaged over the related images."""
    tau = model.temperature if model.affinity == "cosine" else None
    b, _, h, wd = feats.shape
    out = torch.zeros(b, h * wd, dtype=F64)
    for q in range(b):
        for r in range(related.shape[0]):
            p = _ref_logits(feats[q : q + 1], related[r : r + 1], model.w_p[0], tau)[0]
            out[q] += h * wd * torch.softmax(p, 0).mean(dim=1) / related.shape[0]
    return out.view(b, h, wd)


# =============================================================================================
# 4. the authors' test-time maps (authors_maps, CamEngine in authors mode)
# =============================================================================================
# The reference follows the authors' test-time procedure (infer.py's docstring, ``authors``),
# not our implementation: one forward of their model per pair (input1, input2) computes
# A2 = F1^T W F2 (L1 x L2), A = softmax over L1, B = softmax of A2^T over L2,
# feature2_att = F1 A (input2's grid, read from input1), feature1_att = F2 B (input1's grid,
# read from input2), co_map1 = phi_co(feature1_att), co_map2 = phi_co(feature2_att).
LOGIT_GATE = math.log(0.1 / 0.9)  # sigmoid(m) > 0.1  <=>  m > logit(0.1)


def _ref_pair_forward(model, f1, f2):
    """(feature1_att (C, h1, w1), feature2_att (C, h2, w2)) of the pair (input1, input2), from
    raw features (1, C, h, w) with plain matrix products."""
    c = f1.shape[1]
    x1, x2 = f1[0].reshape(c, -1).to(F64), f2[0].reshape(c, -1).to(F64)  # (C, L1), (C, L2)
    keys = model.w_p[0].detach().to(F64).t() @ x1  # (C, L1): keys[:, i] . f = f1_i^T W_P f
    queries = x2
    if model.affinity == "cosine":  # the normalised variant: unit keys and queries, / tau
        keys = keys / keys.norm(dim=0).clamp(min=1e-6)
        queries = x2 / x2.norm(dim=0).clamp(min=1e-6) / model.temperature.detach().to(F64)
    a2 = keys.t() @ queries  # (L1, L2)
    a = torch.softmax(a2, dim=0)  # (L1, L2), each column sums to 1 over input1's positions
    b = torch.softmax(a2.t(), dim=0)  # (L2, L1), each column sums to 1 over input2's positions
    feature2_att = x1 @ a  # (C, L2)
    feature1_att = x2 @ b  # (C, L1)
    return feature1_att.view(c, *f1.shape[-2:]), feature2_att.view(c, *f2.shape[-2:])


def _ref_co_maps(model, f1, f2, k):
    """(co_map1[k] (h1, w1), co_map2[k] (h2, w2)) of the pair (input1, input2)."""
    w, bias = _class_row(model, k)
    att1, att2 = _ref_pair_forward(model, f1, f2)
    return (w[:, None, None] * att1).sum(0) + bias, (w[:, None, None] * att2).sum(0) + bias


def _ref_five_maps(model, x, flip, small, big, rel, k):
    """The five raw maps of class k on x's grid, as numpy (their save_feature_maps_all list)."""
    grid = tuple(x.shape[-2:])

    def bicubic(m):  # (h', w') -> x's grid, their F.upsample(..., mode="bicubic")
        return F.interpolate(m[None, None], size=grid, mode="bicubic", align_corners=False)[0, 0]

    map1, map2 = _ref_co_maps(model, x, flip, k)  # pair (x, flip(x))
    map3 = bicubic(_ref_co_maps(model, x, small, k)[1])  # pair (x, 0.75x): the copy's co_map2
    map4 = bicubic(_ref_co_maps(model, x, big, k)[1])  # pair (x, 2x): the copy's co_map2
    if rel:  # pairs (x, related): the mean of x's co_map1
        map5 = sum(_ref_co_maps(model, x, r, k)[0] for r in rel) / len(rel)
    else:
        map5 = torch.zeros(grid, dtype=F64)
    return [m.numpy() for m in (map1, map2.flip(-1), map3, map4, map5)]


def _ref_aggregate(maps, gate=0.1):
    """Their ``aggregate`` without the x255 and uint8 steps: (map (h, w), kept flags 2-5)."""
    att = np.maximum(maps[0], 0)
    att = att / (att.max() + 1e-8)
    kept = []
    for m in maps[1:]:
        kept.append(bool(1 / (1 + np.exp(-np.mean(m))) > gate))
        if kept[-1]:
            more = np.maximum(m, 0)
            att = att + more / (more.max() + 1e-8)
    return att / len(maps), kept


def _feats(shape, seed):
    """Random features (1, C, h, w) whose channel 0 is 1 everywhere: co-attentive features are
    convex combinations, so their channel 0 is 1 too and phi_co's weight on it acts as a bias
    that shifts every map of the class (bicubic resizing keeps a constant)."""
    f = _rand(1, C, *shape, seed=seed)
    f[:, 0] = 1.0
    return f


def _affine_class(model, k, scale, shift):
    """phi_co[k] -> scale * phi_co[k] + shift on the features of ``_feats`` (weight on channel
    0 was 0; the bias, if any, stays)."""
    with torch.no_grad():
        w, b = model.phi_co.weight[k, :, 0, 0], _class_row(model, k)[1]
        assert float(w[0]) == 0.0
        w[1:] *= scale
        w[0] = (scale - 1) * b + shift


@pytest.mark.parametrize(
    "affinity, shared_phi, domains",
    [("bilinear", False, 1), ("cosine", False, 1), ("cosine", True, 1), ("bilinear", False, 3)],
)
@pytest.mark.parametrize(
    "grids", [((8, 8), (6, 6), (16, 16)), ((6, 8), (4, 6), (12, 16))], ids=["square", "wide"]
)
def test_authors_maps_follow_the_authors_test_procedure(affinity, shared_phi, domains, grids):
    model = _model(affinity=affinity, shared_phi=shared_phi, domains=domains, perturb=0.5).eval()
    with torch.no_grad():
        model.phi_co.weight[:, 0] = 0.0
        if shared_phi:
            model.phi.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=F64))
    x_grid, small_grid, big_grid = grids
    x, flip = _feats(x_grid, 40), _feats(x_grid, 41)
    small, big = _feats(small_grid, 42), _feats(big_grid, 43)
    r1, r2 = _feats((5, 7), 44), _feats((8, 8), 45)
    # K = 3 draws with replacement, x itself allowed; class 0 has none (map 5 is 0)
    related = {3: [r1, x, r1], 1: [r2, _feats((3, 9), 46), r2], 0: []}
    some, keep = 3, 1  # the gate drops some of maps 2-5 of class 3, keeps all of class 1
    raw = _ref_five_maps(model, x, flip, small, big, related[some], some)
    means = sorted(float(m.mean()) for m in raw[1:])
    gaps = [(means[i + 1] - means[i], i) for i in range(3)]
    gap, i = max(g for g in gaps if (means[g[1]] + means[g[1] + 1]) / 2 < raw[0].max())
    mid = (means[i] + means[i + 1]) / 2
    assert gap > 1e-3
    scale = 8 / gap  # kept maps: mean >= +4; dropped: <= -4 (sigmoid 0.018)
    _affine_class(model, some, scale, -scale * mid)
    raw = _ref_five_maps(model, x, flip, small, big, related[keep], keep)
    _affine_class(model, keep, 1.0, max(0.0, LOGIT_GATE + 1.0 - min(m.mean() for m in raw[1:])))

    labels = [some, keep, 0]
    want, kept = [], []
    for k in labels:
        maps = _ref_five_maps(model, x, flip, small, big, related[k], k)
        assert maps[0].max() > 0.05 and maps[2].shape == maps[3].shape == x_grid
        agg, flags = _ref_aggregate(maps)
        want.append(agg)
        kept.append(flags)
    assert 1 <= kept[0].count(False) <= 3 and all(kept[1])
    got = authors_maps(model, x, [flip, small, big], related, labels)  # the authors' gate 0.1
    assert got.shape == (3, *x_grid)
    torch.testing.assert_close(got.to(F64), torch.from_numpy(np.stack(want)), rtol=1e-5, atol=1e-5)
    assert authors_maps(model, x, [flip, small, big], related, []).shape == (0, *x_grid)


class _RecordingBackbone(_Backbone):
    """The stride-8 backbone, recording the shape of every input it gets."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return super().forward(x)


class _PngSampler:
    """``draw`` and ``read`` of a RelatedSampler over in-memory PNGs (the engine's wiring)."""

    def __init__(self, images):
        self.images = images  # g -> (H, W, 3) uint8

    def draw(self, k, n, exclude_key=None, *, replace=False):
        assert replace  # the authors' draw
        return [(k + i) % len(self.images) for i in range(n)]

    def read(self, g):
        return {"json": json.dumps({"labels": [0]}).encode(), "png": encode_png(self.images[g])}


@pytest.mark.parametrize("square", [32, None])
def test_cam_engine_authors_mode_sizes_and_maps(square):
    torch.manual_seed(0)
    model = MCISClassifier(_RecordingBackbone(), num_classes=K).eval()
    gen = np.random.default_rng(0)
    images = [gen.integers(0, 256, size=s, dtype=np.uint8) for s in [(24, 36, 3), (40, 16, 3)]]
    sampler = _PngSampler(images)
    settings = CamSettings(mode="authors", related=3, square=square, related_size=48, amp=False)
    engine = CamEngine(model, settings, sampler)
    rgb = torch.from_numpy(gen.integers(0, 256, size=(3, 40, 56), dtype=np.uint8))
    labels = [2, 1]
    got, fell = engine.cams(rgb, labels, "q")
    assert fell == [] and got.shape == (2, 5, 7)  # ceil((40, 56) / 8)
    assert float(got.amin()) >= 0 and float(got.amax()) > 0.05

    def prep(a):  # (3, H, W) uint8 -> (1, 3, H, W) normalised
        return normalize(a.unsqueeze(0), settings.mean, settings.std)

    def resized(v, size):
        return F.interpolate(v, size=size, mode="bilinear", align_corners=False)

    x = prep(rgb)
    rel_imgs = [prep(torch.from_numpy(a).permute(2, 0, 1)) for a in images]
    if square:  # every view a square resize of the original image, related images too
        views = [resized(x, (32, 32)), resized(x, (24, 24)), resized(x, (64, 64))]
        rel_imgs = [resized(r, (32, 32)) for r in rel_imgs]
    else:
        views = [x, resized(x, (30, 42)), resized(x, (80, 112))]
        rel_imgs = [resize_long(r, 48) for r in rel_imgs]
    x_view, small, big = views
    rel_shapes = [
        tuple(rel_imgs[g].shape) for k in labels for g in sampler.draw(k, 3, "q", replace=True)
    ]
    assert model.backbone.shapes == [
        tuple(x_view.shape),
        tuple(x_view.shape),  # the mirror image
        tuple(small.shape),
        tuple(big.shape),
        *rel_shapes,
    ]
    if square:
        assert set(rel_shapes) == {(1, 3, 32, 32)}
    with torch.no_grad():
        feats = [model.backbone(v) for v in (x_view, x_view.flip(-1), small, big)]
        rel_feats = [model.backbone(r) for r in rel_imgs]
    related = {k: [rel_feats[g] for g in sampler.draw(k, 3, "q", replace=True)] for k in labels}
    maps = authors_maps(model, feats[0], feats[1:], related, labels, settings.authors_gate)
    want = resized(maps[None], (5, 7))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_related_features_are_cached_by_sample_and_size():
    torch.manual_seed(0)
    model = MCISClassifier(_RecordingBackbone(), num_classes=K).eval()
    image = np.random.default_rng(1).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    settings = CamSettings(mode="authors", square=32, related_size=48, amp=False)
    engine = CamEngine(model, settings, _PngSampler([image]), cache_bytes=2**20)
    long_side, _ = engine.related_features(0)
    square, _ = engine.related_features(0, 32)
    assert long_side.shape[-2:] == (29 // 8, 48 // 8) and square.shape[-2:] == (4, 4)
    assert engine.related_features(0)[0] is long_side
    assert engine.related_features(0, 32)[0] is square
    assert model.backbone.shapes == [(1, 3, 29, 48), (1, 3, 32, 32)]
    assert engine.cache.hits == 2 and engine.cache.misses == 2


# =============================================================================================
# 5. RelatedSampler.draw with replacement
# =============================================================================================
_MANIFEST = {
    "classes": ["a", "b", "c", "d"],
    "shards": [{"keys": ["k0", "k1", "k2"], "first": 0}, {"keys": ["k3", "k4", "k5"], "first": 3}],
    "class_index": [[0, 2, 3, 5], [1], [4, 5], []],
}


def _sampler(seed=0):
    return RelatedSampler(_MANIFEST, storage=None, seed=seed)


def test_draw_with_replacement_gives_exactly_n_members_and_is_seeded():
    sampler = _sampler()
    members = set(_MANIFEST["class_index"][0])
    for key in ("k0", "k3", "k1", None):
        got = sampler.draw(0, 9, key, replace=True)
        assert len(got) == 9 and set(got) <= members
        assert len(set(got)) < len(got)  # 9 draws from 4 members repeat
        assert (
            got == sampler.draw(0, 9, key, replace=True) == _sampler().draw(0, 9, key, replace=True)
        )
    many = sampler.draw(0, 60, "k0", replace=True)
    assert 0 in many  # the query itself may be drawn
    assert set(many) == members
    keys = ["k0", "k2", "k3", "k5"]
    assert any(
        sampler.draw(0, 5, k, replace=True) != _sampler(seed=1).draw(0, 5, k, replace=True)
        for k in keys
    )
    assert any(
        sampler.draw(0, 5, "k0", replace=True) != sampler.draw(0, 5, k, replace=True)
        for k in keys[1:]
    )
    assert len(sampler.draw(2, 3, "k4", replace=True)) == 3
    # a class held by the query alone: the query itself, n times; without replacement: none
    assert sampler.draw(1, 3, "k1", replace=True) == [1, 1, 1]
    assert sampler.draw(1, 3, "k1") == []
    # a class nobody holds
    assert sampler.draw(3, 4, "k0", replace=True) == [] and sampler.draw(3, 4, "k0") == []
    assert sampler.draw(0, 0, "k0", replace=True) == []
    with pytest.raises(ValueError, match="class 9"):
        sampler.draw(9, 3, "k0", replace=True)


def test_draw_without_replacement_keeps_distinct_members_other_than_the_query():
    sampler = _sampler()
    members = set(_MANIFEST["class_index"][0])
    for key, g in (("k0", 0), ("k3", 3), ("k1", 1)):
        for n in (1, 2, 3, 10):
            got = sampler.draw(0, n, key, replace=False)
            others = members - {g}
            assert len(got) == min(n, len(others)) and len(set(got)) == len(got)
            assert set(got) <= others
            assert got == sampler.draw(0, n, key)  # replace=False is the default
            assert got == _sampler().draw(0, n, key, replace=False)


# =============================================================================================
# 6. diagnostics
# =============================================================================================
def test_hub_mass_by_hand():
    a = torch.tensor([[[0.7, 0.4], [0.1, 0.3], [0.1, 0.2], [0.1, 0.1]]])  # (1, Lm=4, Ln=2)
    torch.testing.assert_close(a.sum(1), torch.ones(1, 2))
    # received mass per key: 1.1, 0.4, 0.3, 0.2 out of 2
    torch.testing.assert_close(diagnostics.hub_mass(a, 1), torch.tensor(0.55))
    torch.testing.assert_close(diagnostics.hub_mass(a, 2), torch.tensor(0.75))
    torch.testing.assert_close(diagnostics.hub_mass(a, 5), torch.tensor(1.0))  # k > Lm
    uniform = torch.full((1, 4, 2), 0.25)
    both = torch.cat([a, uniform])
    torch.testing.assert_close(diagnostics.hub_mass(both, 1), torch.tensor((0.55 + 0.25) / 2))


def _one_hot_case():
    """m: 2x2 positions with features e_0..e_3; n: 2x3 queries, each a multiple of e_pi(j);
    cosine, W_P = I, tau = 1e-3: query j attends to exactly position pi(j) of m."""
    torch.manual_seed(0)
    model = MCISClassifier(_Backbone(4), num_classes=2, affinity="cosine", temperature=1e-3)
    with torch.no_grad():  # gate = sigmoid(+-20): on where pi(j) is even
        model.w_b.weight.copy_(torch.tensor([20.0, -20.0, 20.0, -20.0]).view(1, 4, 1, 1))
    fm = torch.eye(4).view(1, 4, 2, 2)  # position i = 2y + x holds e_i
    pi = [0, 1, 1, 2, 3, 0]
    scale = torch.tensor([2.5, 1.0, 0.3, 4.0, 1.5, 7.0])
    fn = (torch.eye(4)[:, pi] * scale).view(1, 4, 2, 3)
    mask_m = torch.tensor([[[0, 1], [2, 255]]])  # bg, class 0, class 1, ignored
    mask_n = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    return model, fm, fn, mask_m, mask_n, pi


def test_with_masks_and_finish_by_hand():
    model, fm, fn, mask_m, mask_n, pi = _one_hot_case()
    a = diagnostics.attention_map(model, fm, fn)
    torch.testing.assert_close(a[0], torch.eye(4)[:, pi])  # one-hot columns
    sums = diagnostics.with_masks(model, fm, fn, mask_m, mask_n)
    got = diagnostics.finish(sums, model)
    # bg_to_fg: bg queries j0 (reads bg i0) and j1 (reads fg i1): mean mass 0.5 on fg, share of
    # fg among m's valid positions 2/3 -> 0.75
    # fg_to_same: class 1: queries j2 (reads i1, class 1), j3 (reads i2): 0.5 / (1/3) = 1.5;
    # class 2: j4 reads the ignored i3: 0 -> mean 0.75
    # gate on at j0, j3 (pi even; j5 ignored); shared region {j2, j3, j4}: IoU 1/4
    # gate mean over valid j0..j4: (2 * ~1 + 3 * ~0) / 5
    # hub: i0 and i1 receive 2 of 6 queries each
    assert got == {
        "pairs": 1,
        "hub_top1": 0.3333,
        "hub_top5": 1.0,
        "bg_to_fg": 0.75,
        "fg_to_same": 0.75,
        "gate_mean": 0.4,
        "gate_iou": 0.25,
        "w_p_drift": 0.0,
        "affinity": "cosine",
        "temperature": 0.001,
    }
    # sums over two batches average per qualifying pair
    half = diagnostics.with_masks(model, fm, fn, mask_m, torch.full_like(mask_n, 255))
    total = {key: sums[key] + half[key] for key in sums}
    twice = diagnostics.finish(total, model)
    assert twice["pairs"] == 2 and twice["bg_to_fg"] == 0.75 and twice["fg_to_same"] == 0.75
    assert twice["gate_mean"] == 0.4 and twice["gate_iou"] == 0.25


def test_label_free_keys_and_values():
    model, fm, fn, *_ = _one_hot_case()
    got = diagnostics.label_free(model, fm, fn)
    assert set(got) == {"hub_top1", "hub_top5", "row_max", "w_p_drift", "temperature"}
    torch.testing.assert_close(got["hub_top1"], torch.tensor(2 / 6))
    torch.testing.assert_close(got["hub_top5"], torch.tensor(1.0))
    torch.testing.assert_close(got["row_max"], torch.tensor(1.0))
    assert float(got["w_p_drift"]) == 0.0
    torch.testing.assert_close(got["temperature"], torch.tensor(1e-3))
    gate = torch.rand(1, 1, 2, 2)
    with_gate = diagnostics.label_free(model, fm, fn, gate=gate)
    assert set(with_gate) == set(got) | {"gate_mean"}
    torch.testing.assert_close(with_gate["gate_mean"], gate.mean())

    # bilinear: no temperature; values against the reference attention
    bil = _model(dtype=torch.float32, perturb=1.0)
    fm, fn = _rand(2, C, 3, 3, seed=30).float(), _rand(2, C, 2, 3, seed=31).float()
    out = diagnostics.label_free(bil, fm, fn)
    assert set(out) == {"hub_top1", "hub_top5", "row_max", "w_p_drift"}
    a = torch.softmax(_ref_logits(fm.double(), fn.double(), bil.w_p[0].detach().double()), 1)
    received = a.sum(2)  # (B, Lm)
    top = received.sort(dim=1, descending=True).values
    torch.testing.assert_close(
        out["hub_top1"].double(), (top[:, 0] / 6).mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        out["hub_top5"].double(), (top[:, :5].sum(1) / 6).mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(out["row_max"].double(), a.amax(1).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affinity, domains", [("bilinear", 1), ("cosine", 1), ("bilinear", 3)])
def test_w_p_drift_is_zero_at_init_and_grows_when_w_p_moves(affinity, domains):
    model = _model(dtype=torch.float32, affinity=affinity, domains=domains)
    assert float(diagnostics.w_p_drift(model)) == 0.0
    init = model.initial_w_p()
    delta = torch.randn_like(init) * 0.05
    with torch.no_grad():
        model.w_p.add_(delta)
    drift = diagnostics.w_p_drift(model)
    assert float(drift) > 0
    torch.testing.assert_close(drift, delta.norm() / init.norm(), rtol=1e-5, atol=1e-7)
    assert (
        diagnostics.label_free(model, *(_rand(1, C, 2, 2, seed=s).float() for s in (1, 2)))[
            "w_p_drift"
        ]
        == drift
    )
