"""The co-attention classifier head (Eq. 1-8), its options, parameters and localization maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcis_dist.cams.stage import check_model_state
from mcis_dist.config import ExperimentConfig
from mcis_dist.errors import StageError
from mcis_dist.models.build import build_model
from mcis_dist.models.coattention import coattention_dense
from mcis_dist.models.mcis import (
    PAIR_CROSS,
    PAIR_EXTRA,
    PAIR_TARGET,
    MCISClassifier,
    MCISOutput,
    coattentive_cam,
    coattentive_cams,
    minmax_cam,
    normalize_cam,
    single_round_cam,
)

K = 5


class TinyBackbone(nn.Module):
    """Follows the backbone contract: stride 8, ``out_channels``, ``forward_features``."""

    output_stride = 8

    def __init__(self, out_channels: int = 12, with_new: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.conv4 = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 8, 3, 2, 1))
        self.conv5 = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 10, 3, 2, 1))
        self.conv6 = nn.Sequential(nn.ReLU(), nn.Conv2d(10, out_channels, 1), nn.ReLU())
        self.extra = nn.Conv2d(out_channels, out_channels, 1) if with_new else None
        self.conv4[0].weight.requires_grad_(False)  # a frozen stem

    def forward_features(self, x):
        c4 = self.conv4(x)
        c5 = self.conv5(c4)
        out = self.conv6(c5)
        if self.extra is not None:
            out = out + self.extra(out)
        return {"conv4": c4, "conv5": c5, "out": out}

    def forward(self, x):
        return self.forward_features(x)["out"]

    def new_parameters(self):
        return [] if self.extra is None else list(self.extra.parameters())


def _model(seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    model = MCISClassifier(TinyBackbone(), num_classes=K, **kwargs).to(dtype)
    with torch.no_grad():  # bigger W_P so that the co-attention is not uniform
        model.w_p.mul_(8)
    return model


def _feats(b=3, c=12, hm=4, wm=3, hn=3, wn=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fm = torch.rand(b, c, hm, wm, generator=g, dtype=dtype, requires_grad=True)
    fn = torch.rand(b, c, hn, wn, generator=g, dtype=dtype, requires_grad=True)
    return fm, fn


def _by_hand(model, fm, fn, w_p):
    """Eq. 1-8 with dense convolutions, GAP of the maps and the dense co-attention."""
    n_coatt, m_coatt = coattention_dense(fm, fn, w_p)

    def gap(conv, x):
        return conv(x).mean(dim=(2, 3))

    gate_m, gate_n = torch.sigmoid(model.w_b(m_coatt)), torch.sigmoid(model.w_b(n_coatt))
    return MCISOutput(
        single_m=gap(model.phi, fm),
        single_n=gap(model.phi, fn),
        coatt_m=gap(model.phi_co, m_coatt),
        coatt_n=gap(model.phi_co, n_coatt),
        contrast_m=gap(model.phi_co, fm * (1 - gate_m)),
        contrast_n=gap(model.phi_co, fn * (1 - gate_n)),
    )


def _assert_outputs_close(a: MCISOutput, b: MCISOutput, tol=1e-10):
    for name in MCISOutput.__dataclass_fields__:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=tol, atol=tol)


@pytest.mark.parametrize("shared_phi, phi_co_bias", [(False, False), (True, False), (False, True)])
def test_head_follows_the_equations(shared_phi, phi_co_bias):
    model = _model(shared_phi=shared_phi, phi_co_bias=phi_co_bias, chunk_size=5)
    if phi_co_bias:  # away from its zero init, so that it shows in every phi_co output
        with torch.no_grad():
            model.phi_co.bias.copy_(torch.linspace(-1, 1, K, dtype=model.phi_co.bias.dtype))
    fm, fn = _feats()
    out = model.forward_features(fm, fn)
    for name in MCISOutput.__dataclass_fields__:
        assert getattr(out, name).shape == (3, K)
    _assert_outputs_close(out, _by_hand(model, fm, fn, model.w_p[0]))
    # the co-attentive outputs really depend on the other image
    other = model.forward_features(fm, fn.flip(0))
    assert not torch.allclose(other.coatt_m, out.coatt_m)
    torch.testing.assert_close(other.single_m, out.single_m)


def test_phi_options():
    authors = _model()
    assert authors.phi_co is not authors.phi and authors.phi_co.bias is None
    assert authors.phi.bias is not None and authors.w_b.bias is None
    paper = _model(shared_phi=True)
    assert paper.phi_co is paper.phi and paper.phi_coatt is None
    assert "phi_coatt.weight" not in paper.state_dict()
    assert _model(phi_bias=False).phi.bias is None
    assert _model(gate_bias=True).w_b.bias is not None
    biased = _model(phi_co_bias=True)
    assert biased.phi_co is biased.phi_coatt and biased.phi_co.bias is not None
    assert (biased.phi_co.bias == 0).all() and "phi_coatt.bias" in biased.state_dict()
    with torch.no_grad():
        biased.phi_co.bias.fill_(1.0)
    biased.reset_head()
    assert (biased.phi_co.bias == 0).all()
    with pytest.raises(ValueError, match="phi_co_bias.*shared_phi"):
        _model(shared_phi=True, phi_co_bias=True)


def test_forward_on_images_runs_the_backbone_once_for_equal_sizes():
    model = _model(dtype=torch.float32)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randn(2, 3, 32, 40)
    out = model(x, x.flip(-1))
    assert calls == [4] and out.single_m.shape == (2, K)
    calls.clear()
    out2 = model(x, torch.randn(2, 3, 24, 32))  # m and n of different sizes
    assert calls == [2, 2] and out2.coatt_n.shape == (2, K)
    fm, fn = model.backbone(x), model.backbone(x.flip(-1))
    _assert_outputs_close(out, model.forward_features(fm, fn), tol=1e-5)


def test_domain_specific_w_p_selected_per_pair():
    model = _model(domains=3)
    assert model.w_p.shape == (3, 12, 12)
    fm, fn = _feats(b=4)
    types = torch.tensor([PAIR_TARGET, PAIR_CROSS, PAIR_EXTRA, PAIR_CROSS])
    out = model.forward_features(fm, fn, types)
    for i, d in enumerate(types.tolist()):
        want = _by_hand(model, fm[i : i + 1], fn[i : i + 1], model.w_p[d])
        for name in MCISOutput.__dataclass_fields__:
            torch.testing.assert_close(getattr(out, name)[i : i + 1], getattr(want, name))
    # the pair types pick different matrices: the same pair scores differently
    same = [model.forward_features(fm[:1], fn[:1], d).coatt_m for d in range(3)]
    assert not torch.allclose(same[0], same[1]) and not torch.allclose(same[1], same[2])


def test_a_pair_does_not_depend_on_the_other_w_p():
    model = _model(domains=3)
    fm, fn = _feats(b=2)
    out = model.forward_features(fm, fn, PAIR_EXTRA)
    loss = sum(getattr(out, n).sum() for n in MCISOutput.__dataclass_fields__)
    loss.backward()
    grad = model.w_p.grad
    assert grad[PAIR_EXTRA].abs().sum() > 0
    assert grad[PAIR_TARGET].abs().sum() == 0 and grad[PAIR_CROSS].abs().sum() == 0
    with torch.no_grad():
        model.w_p[PAIR_TARGET].normal_()
        model.w_p[PAIR_CROSS].normal_()
    _assert_outputs_close(model.forward_features(fm, fn, PAIR_EXTRA), out)


@pytest.mark.parametrize(
    "pair_type, match",
    [(None, "pair_type is required"), (3, r"must be in \[0, 3\)"), ([0, 1], "one entry per pair")],
)
def test_bad_pair_types_are_refused(pair_type, match):
    model = _model(domains=3)
    fm, fn = _feats(b=3)
    with pytest.raises(ValueError, match=match):
        model.forward_features(fm, fn, pair_type)


def test_constructor_checks():
    with pytest.raises(ValueError, match="domains must be 1 or 3"):
        MCISClassifier(TinyBackbone(), num_classes=K, domains=2)
    with pytest.raises(ValueError, match="out_channels"):
        MCISClassifier(nn.ReLU(), num_classes=K)


def test_new_parameters_and_groups():
    torch.manual_seed(0)
    model = MCISClassifier(TinyBackbone(with_new=True), num_classes=K)
    head = {id(p) for p in model.head_parameters()}
    new = {id(p) for p in model.new_parameters()}
    assert head == {
        id(p)
        for p in (
            model.w_p,
            model.phi.weight,
            model.phi.bias,
            model.phi_co.weight,
            model.w_b.weight,
        )
    }
    assert new == head | {id(p) for p in model.backbone.extra.parameters()}
    groups = model.param_groups()
    flat = [id(p) for ps in groups.values() for p in ps]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(flat) == sorted(trainable) and len(flat) == len(set(flat))
    assert id(model.backbone.conv4[0].weight) not in flat  # frozen
    assert {id(p) for p in groups["new_bias"]} == {
        id(model.phi.bias),
        id(model.backbone.extra.bias),
    }
    assert id(model.w_p) in {id(p) for p in groups["new_weight"]}
    assert id(model.backbone.conv5[1].bias) in {id(p) for p in groups["pretrained_bias"]}
    # phi_co's bias (phi_co_bias) is a new bias: x20, no weight decay
    biased = MCISClassifier(TinyBackbone(), num_classes=K, phi_co_bias=True)
    assert id(biased.phi_co.bias) in {id(p) for p in biased.new_parameters()}
    assert id(biased.phi_co.bias) in {id(p) for p in biased.param_groups()["new_bias"]}


def test_a_checkpoint_without_phi_co_bias_names_the_missing_key():
    """A checkpoint of the authors' bias-free phi_co, loaded for model.phi_co_bias: true."""
    cfg = ExperimentConfig()
    old = build_model(cfg, num_classes=K).state_dict()
    biased = cfg.model_copy(update={"model": cfg.model.model_copy(update={"phi_co_bias": True})})
    with pytest.raises(StageError, match=r"does not match.*missing: phi_coatt\.bias"):
        check_model_state(biased, old, K, "old.pt")
    check_model_state(cfg, old, K, "old.pt")  # the model it was written for loads it


def test_backward_reaches_every_head_parameter_and_the_backbone():
    model = _model(dtype=torch.float32)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = model(x, y)
    sum(getattr(out, n).sum() for n in MCISOutput.__dataclass_fields__).backward()
    for p in [*model.head_parameters(), *model.backbone.conv6.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


def test_a_frozen_backbone_trains_the_head_only():
    """freeze_backbone: same outputs as the backbone in eval mode, gradients in the head only,
    no backbone parameter in the optimiser groups, eval mode kept through ``train()``."""
    torch.manual_seed(0)
    backbone = TinyBackbone(with_new=True)
    backbone.conv5.insert(0, nn.Dropout(0.5))  # would change the features in train mode
    frozen = MCISClassifier(backbone, num_classes=K, freeze_backbone=True).train()
    assert not frozen.backbone.training and frozen.training and frozen.phi.training
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = frozen(x, y)
    sum(getattr(out, n).sum() for n in MCISOutput.__dataclass_fields__).backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    for p in frozen.head_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    flat = {id(p) for ps in frozen.param_groups().values() for p in ps}
    assert flat == {id(p) for p in frozen.head_parameters()}
    with torch.no_grad():  # the same network unfrozen, its backbone in eval mode
        free = MCISClassifier(backbone, num_classes=K)
        free.load_state_dict(frozen.state_dict())
        free.train()
        free.backbone.eval()
        _assert_outputs_close(free(x, y), out, tol=1e-6)
    cfg = ExperimentConfig.model_validate({"model": {"freeze_backbone": True}})
    assert build_model(cfg, num_classes=K).backbone_frozen


def test_bf16_autocast_forward_backward():
    model = _model(dtype=torch.float32)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    for name in MCISOutput.__dataclass_fields__:
        a, b = getattr(out, name).float(), getattr(ref, name)
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 0.05
    sum(getattr(out, n).float().sum() for n in MCISOutput.__dataclass_fields__).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.head_parameters())


def test_single_round_cam_is_phi_before_gap():
    model = _model()
    x = torch.randn(2, 3, 40, 32, dtype=torch.float64)
    cams = single_round_cam(model, x)
    assert cams.shape == (2, K, 5, 4) and not cams.requires_grad
    torch.testing.assert_close(cams, model.phi(model.backbone(x)))
    out = model(x, x)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), out.single_m)


@pytest.mark.parametrize("shared_phi", [False, True])
def test_coattentive_cam_averages_over_related_images(shared_phi):
    model = _model(shared_phi=shared_phi)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(3, 32, 24, generator=g, dtype=torch.float64)
    related = torch.randn(3, 3, 24, 40, generator=g, dtype=torch.float64)
    cam = coattentive_cam(model, image, related, class_k=2)
    assert cam.shape == (4, 3)
    fm = model.backbone(image[None])
    want = torch.zeros(4, 3, dtype=torch.float64)
    for r in related:  # F^{n∩r}: the image (as m) read from r, through phi_co
        _, m_coatt = coattention_dense(fm, model.backbone(r[None]), model.w_p[0])
        want += model.phi_co(m_coatt)[0, 2] / len(related)
    torch.testing.assert_close(cam, want.detach())
    maps = coattentive_cams(model, image, {2: related, 4: related[:1]})
    assert maps.shape == (K, 4, 3)
    torch.testing.assert_close(maps[2], cam)
    assert maps[[0, 1, 3]].abs().sum() == 0 and maps[4].abs().sum() > 0
    with pytest.raises(ValueError, match="class_k"):
        coattentive_cam(model, image, related, class_k=K)


def test_normalize_cam():
    cams = torch.tensor([[[[-1.0, 2.0], [4.0, 0.5]], [[0.0, -3.0], [0.0, 0.0]]]])
    got = normalize_cam(cams)
    torch.testing.assert_close(
        got[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.125]]), rtol=1e-4, atol=1e-5
    )
    assert got[0, 1].abs().sum() == 0  # an all-negative map stays zero, no NaN


def test_minmax_cam_against_a_loop():
    g = torch.Generator().manual_seed(1)
    cams = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) - 2.0  # mostly negative
    cams[1, 2] = 0.7  # a constant map
    got = minmax_cam(cams)
    for b in range(2):
        for k in range(3):
            m = cams[b, k]
            lo, hi = float(m.min()), float(m.max())
            for y in range(5):
                for x in range(4):
                    want = 0.0 if hi == lo else (float(m[y, x]) - lo) / (hi - lo)
                    assert float(got[b, k, y, x]) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="normalize=minmax applies to modes single"):
        ExperimentConfig.model_validate({"cams": {"mode": "authors", "normalize": "minmax"}})


def test_with_the_resnet38_tiny_backbone():
    from mcis_dist.models.backbones import build_backbone

    torch.manual_seed(0)
    model = MCISClassifier(build_backbone("resnet38_tiny"), num_classes=K)
    x, y = torch.randn(2, 3, 48, 48), torch.randn(2, 3, 48, 48)
    out = model(x, y)
    loss = sum(F.softplus(getattr(out, n)).sum() for n in MCISOutput.__dataclass_fields__)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head_parameters())
    assert single_round_cam(model, x).shape == (2, K, 6, 6)
