"""Losses (Eq. 1, 5, 9, 10) against a slow per-class reference; gradients through the head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mcis_dist.losses import (
    LossWeights,
    classification_loss,
    difference_targets,
    intersection_targets,
    mcis_loss,
    self_pair_loss,
    self_pair_views,
)
from mcis_dist.models.mcis import MCISClassifier, MCISOutput

from test_mcis_model import TinyBackbone

K = 6
FIELDS = list(MCISOutput.__dataclass_fields__)


def ref_ce(logits: torch.Tensor, targets) -> torch.Tensor:
    """Sigmoid cross entropy written per class: mean_b mean_k -[t log s(x) + (1-t) log s(-x)]."""
    b, k = logits.shape
    total = logits.new_zeros(())
    for i in range(b):
        for c in range(k):
            x, t = logits[i, c], float(targets[i][c])
            total = total - (t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
    return total / (b * k)


def ref_sets(lm, ln):
    """l_m ∩ l_n, l_m \\ l_n, l_n \\ l_m as Python lists, class by class."""
    inter = [[int(a and b) for a, b in zip(r, s, strict=True)] for r, s in zip(lm, ln, strict=True)]
    dm = [
        [int(a and not b) for a, b in zip(r, s, strict=True)] for r, s in zip(lm, ln, strict=True)
    ]
    dn = [
        [int(b and not a) for a, b in zip(r, s, strict=True)] for r, s in zip(lm, ln, strict=True)
    ]
    return inter, dm, dn


def _outputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MCISOutput(
        **{
            f: torch.randn(b, K, generator=g, dtype=torch.float64, requires_grad=True)
            for f in FIELDS
        }
    )


LM = [[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0]]
LN = [[0, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0]]


def test_intersection_and_difference_targets():
    lm, ln = torch.tensor(LM), torch.tensor(LN)
    inter, dm, dn = ref_sets(LM, LN)
    assert intersection_targets(lm, ln).tolist() == inter
    assert difference_targets(lm, ln).tolist() == dm
    assert difference_targets(ln, lm).tolist() == dn
    # pair 0: the only shared class is one of several; pairs 1 and 3: identical label sets
    assert (
        inter[0] == [0, 0, 1, 0, 0, 0] and dm[0] == [1, 0, 0, 1, 0, 0] and dn[0] == [0] * 4 + [1, 0]
    )
    assert sum(dm[1]) == sum(dn[1]) == sum(dm[3]) == sum(dn[3]) == 0 and inter[3] == LM[3]
    for kind in (torch.bool, torch.float32, torch.float64):
        got = intersection_targets(lm.to(kind), ln.to(kind))
        assert got.is_floating_point() and got.tolist() == inter
        assert difference_targets(lm.to(kind), ln.to(kind)).tolist() == dm
    assert torch.equal(intersection_targets(lm, ln) + difference_targets(lm, ln), lm.float())
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        intersection_targets(lm, ln[:, :3])


@pytest.mark.parametrize("reduction", ["paper", "authors"])
def test_mcis_loss_matches_the_reference_values_and_gradients(reduction):
    out = _outputs()
    lm, ln = torch.tensor(LM, dtype=torch.float64), torch.tensor(LN, dtype=torch.float64)
    got = mcis_loss(out, lm, ln, epoch=5, reduction=reduction)
    inter, dm, dn = ref_sets(LM, LN)
    want = {
        "single_m": ref_ce(out.single_m, LM),
        "single_n": ref_ce(out.single_n, LN),
        "coattention_m": ref_ce(out.coatt_m, inter),
        "coattention_n": ref_ce(out.coatt_n, inter),
        "contrastive_m": ref_ce(out.contrast_m, dm),
        "contrastive_n": ref_ce(out.contrast_n, dn),
    }
    half = 0.5 if reduction == "authors" else 1.0
    want["single"] = half * (want["single_m"] + want["single_n"])
    want["coattention"] = half * (want["coattention_m"] + want["coattention_n"])
    want["contrastive"] = want["contrastive_m"] + want["contrastive_n"]  # both have differences
    want["total"] = want["single"] + want["coattention"] + want["contrastive"]
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12)
    inputs = [getattr(out, f) for f in FIELDS]
    for a, b in zip(
        torch.autograd.grad(got["total"], inputs),
        torch.autograd.grad(want["total"], inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_authors_reduction_matches_their_concatenated_batches():
    out = _outputs()
    lm, ln = torch.tensor(LM, dtype=torch.float64), torch.tensor(LN, dtype=torch.float64)
    got = mcis_loss(out, lm, ln, epoch=2, reduction="authors")
    inter = intersection_targets(lm, ln)
    mlsm = F.multilabel_soft_margin_loss
    single = mlsm(torch.cat([out.single_m, out.single_n]), torch.cat([lm, ln]))
    coatt = mlsm(torch.cat([out.coatt_m, out.coatt_n]), torch.cat([inter, inter]))
    torch.testing.assert_close(got["single"], single)
    torch.testing.assert_close(got["coattention"], coatt)
    # a batch whose m images have nothing n lacks: the authors drop that direction
    same_m = mcis_loss(out, ln * lm, ln, epoch=2, reduction="authors")
    torch.testing.assert_close(same_m["contrastive"], same_m["contrastive_n"])
    paper = mcis_loss(out, ln * lm, ln, epoch=2)
    torch.testing.assert_close(
        paper["contrastive"], paper["contrastive_m"] + paper["contrastive_n"]
    )


def ref_pair_ce(logits: torch.Tensor, targets, lm, ln) -> torch.Tensor:
    """Eq. 9's L_CE over the pair's classes l_m ∪ l_n, written out: per pair, the mean over the
    classes one image holds of -[t log σ(x) + (1-t) log(1-σ(x))] (0 when none), mean over pairs."""
    b, k = logits.shape
    total = logits.new_zeros(())
    for i in range(b):
        classes = [c for c in range(k) if lm[i][c] or ln[i][c]]
        pair = logits.new_zeros(())
        for c in classes:
            s, t = torch.sigmoid(logits[i, c]), float(targets[i][c])
            pair = pair - (t * torch.log(s) + (1 - t) * torch.log(1 - s))
        if classes:
            total = total + pair / len(classes)
    return total / b


# LM / LN plus a pair without any class and a pair only n has a class of
LM_PAIR = [*LM, [0] * 6, [0] * 6]
LN_PAIR = [*LN, [0] * 6, [0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("reduction", ["paper", "authors"])
def test_pair_contrastive_classes_match_the_reference_values_and_gradients(reduction):
    out = _outputs(b=len(LM_PAIR), seed=3)
    lm = torch.tensor(LM_PAIR, dtype=torch.float64)
    ln = torch.tensor(LN_PAIR, dtype=torch.float64)
    got = mcis_loss(out, lm, ln, epoch=5, reduction=reduction, contrastive_classes="pair")
    inter, dm, dn = ref_sets(LM_PAIR, LN_PAIR)
    want = {
        "single_m": ref_ce(out.single_m, LM_PAIR),
        "single_n": ref_ce(out.single_n, LN_PAIR),
        "coattention_m": ref_ce(out.coatt_m, inter),
        "coattention_n": ref_ce(out.coatt_n, inter),
        "contrastive_m": ref_pair_ce(out.contrast_m, dm, LM_PAIR, LN_PAIR),
        "contrastive_n": ref_pair_ce(out.contrast_n, dn, LM_PAIR, LN_PAIR),
    }
    half = 0.5 if reduction == "authors" else 1.0
    want["single"] = half * (want["single_m"] + want["single_n"])
    want["coattention"] = half * (want["coattention_m"] + want["coattention_n"])
    want["contrastive"] = want["contrastive_m"] + want["contrastive_n"]  # both have differences
    want["total"] = want["single"] + want["coattention"] + want["contrastive"]
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12)
    inputs = [getattr(out, f) for f in FIELDS]
    got_grads = torch.autograd.grad(got["total"], inputs)
    for a, b in zip(got_grads, torch.autograd.grad(want["total"], inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # classes neither image holds get no gradient through the contrastive scores
    absent = ~(lm.bool() | ln.bool())
    for name in ("contrast_m", "contrast_n"):
        grad = got_grads[FIELDS.index(name)]
        assert (grad[absent] == 0).all() and (grad[~absent] != 0).all()
    # "all" is Eq. 9 over every class, unchanged
    every = mcis_loss(out, lm, ln, epoch=5, reduction=reduction, contrastive_classes="all")
    torch.testing.assert_close(every["contrastive_m"], ref_ce(out.contrast_m, dm))
    assert not torch.allclose(every["contrastive_m"], got["contrastive_m"])


def test_pair_contrastive_classes_keep_the_authors_direction_rule():
    out = _outputs(seed=4)
    lm, ln = torch.tensor(LM, dtype=torch.float64), torch.tensor(LN, dtype=torch.float64)
    same_m = mcis_loss(out, ln * lm, ln, epoch=2, reduction="authors", contrastive_classes="pair")
    torch.testing.assert_close(same_m["contrastive"], same_m["contrastive_n"])
    lm_same = (ln * lm).int().tolist()
    _, _, dn = ref_sets(lm_same, LN)
    want = ref_pair_ce(out.contrast_n, dn, lm_same, LN)
    torch.testing.assert_close(same_m["contrastive_n"], want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="contrastive_classes must be"):
        mcis_loss(out, lm, ln, epoch=0, contrastive_classes="union")


def test_contrastive_term_only_from_its_epoch():
    out = _outputs()
    lm, ln = torch.tensor(LM, dtype=torch.float64), torch.tensor(LN, dtype=torch.float64)
    for epoch in (0, 1):
        early = mcis_loss(out, lm, ln, epoch=epoch)
        torch.testing.assert_close(early["total"], early["single"] + early["coattention"])
        assert early["contrastive"] > 0 and not early["contrastive"].requires_grad
    late = mcis_loss(out, lm, ln, epoch=2)
    torch.testing.assert_close(
        late["total"], late["single"] + late["coattention"] + late["contrastive"]
    )
    assert late["contrastive"].requires_grad
    now = mcis_loss(out, lm, ln, epoch=0, contrastive_from_epoch=0)
    torch.testing.assert_close(now["total"], late["total"])


def test_weights_switch_and_scale_terms():
    out = _outputs()
    lm, ln = torch.tensor(LM, dtype=torch.float64), torch.tensor(LN, dtype=torch.float64)
    got = mcis_loss(
        out, lm, ln, epoch=3, weights=LossWeights(single=0.5, coattention=0, contrastive=2)
    )
    torch.testing.assert_close(got["total"], 0.5 * got["single"] + 2 * got["contrastive"])
    assert not got["coattention"].requires_grad and not got["coattention_m"].requires_grad
    grads = torch.autograd.grad(got["total"], [out.coatt_m, out.single_m], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0
    with pytest.raises(ValueError, match="reduction must be"):
        mcis_loss(out, lm, ln, epoch=0, reduction="mean")


def _head(**kwargs):
    torch.manual_seed(0)
    model = MCISClassifier(TinyBackbone(out_channels=4), num_classes=3, chunk_size=3, **kwargs)
    model = model.double()
    with torch.no_grad():
        model.w_p.mul_(4)
        model.w_b.weight.mul_(3)
    return model


@pytest.mark.parametrize("term", ["coattention", "contrastive"])
def test_gradcheck_through_the_head(term):
    """Eq. 2-9 end to end in float64: features, W_P, W_B and phi_co against finite differences."""
    model = _head()
    g = torch.Generator().manual_seed(1)
    fm = torch.rand(2, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = torch.rand(2, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lm = torch.tensor([[1.0, 1, 0], [0, 1, 1]], dtype=torch.float64)
    ln = torch.tensor([[1.0, 0, 1], [0, 1, 0]], dtype=torch.float64)
    names = ["w_p", "w_b.weight", "phi_coatt.weight"]
    params = [dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    head = _HeadOnly(model)

    def loss(fm, fn, *ps):
        out = functional_call(
            head, {f"model.{n}": p for n, p in zip(names, ps, strict=True)}, (fm, fn), strict=False
        )
        return mcis_loss(out, lm, ln, epoch=2)[term]

    assert torch.autograd.gradcheck(loss, (fm, fn, *params))


class _HeadOnly(torch.nn.Module):
    """Calls the classifier's head on features (for ``functional_call``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fm, fn):
        return self.model.forward_features(fm, fn)


def test_gradients_reach_w_p_w_b_and_both_phi():
    model = _head()
    g = torch.Generator().manual_seed(2)
    fm = torch.rand(3, 4, 3, 3, generator=g, dtype=torch.float64)
    fn = torch.rand(3, 4, 3, 3, generator=g, dtype=torch.float64)
    lm = torch.tensor([[1.0, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    ln = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)
    mcis_loss(model.forward_features(fm, fn), lm, ln, epoch=2)["total"].backward()
    for p in (model.w_p, model.w_b.weight, model.phi.weight, model.phi.bias, model.phi_co.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    mcis_loss(model.forward_features(fm, fn), lm, ln, epoch=0)["total"].backward()
    assert model.w_b.weight.grad is None  # W_B only feeds the contrastive term (Eq. 6-9)
    assert model.w_p.grad.abs().sum() > 0 and model.phi_co.weight.grad.abs().sum() > 0


def test_self_pair_terms():
    out = _outputs(b=2)
    labels = torch.tensor(LM[:2], dtype=torch.float64)
    got = self_pair_loss(out, labels)
    single = ref_ce(out.single_m, LM[:2]) + ref_ce(out.single_n, LM[:2])
    coatt = ref_ce(out.coatt_m, LM[:2]) + ref_ce(out.coatt_n, LM[:2])
    torch.testing.assert_close(got["single"], single)
    torch.testing.assert_close(got["coattention"], coatt)
    torch.testing.assert_close(got["total"], single + coatt)
    halved = self_pair_loss(out, labels, reduction="authors")
    torch.testing.assert_close(halved["total"], (single + coatt) / 2)
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    flip, small, big = self_pair_views(images)
    assert torch.equal(flip[..., 0], images[..., -1])
    assert small.shape == (2, 3, 6, 9) and big.shape == (2, 3, 16, 24)


def test_classification_loss_is_multilabel_soft_margin():
    out = _outputs()
    labels = torch.tensor(LM, dtype=torch.float64)
    torch.testing.assert_close(classification_loss(out.single_m, labels), ref_ce(out.single_m, LM))
