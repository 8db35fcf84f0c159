"""SEAM's equivariant regularisation: every piece against a slow, pixel-by-pixel reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcis_dist.models.mcis import MCISClassifier
from mcis_dist.models.seam import (
    PixelCorrelationModule,
    add_background,
    equivariant_cross_regularization,
    equivariant_regularization,
    max_norm,
    max_onehot,
    pcm_seed,
    seam_cams,
    seam_losses,
    seam_view,
)

from test_mcis_model import TinyBackbone

F64 = torch.float64
EPS = 1e-5


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ref_max_norm(cam):
    out = torch.zeros_like(cam)
    for b in range(cam.shape[0]):
        for k in range(cam.shape[1]):
            p = cam[b, k].clamp(min=0)
            hi, lo = p.max(), p.min()
            out[b, k] = (p - lo - EPS).clamp(min=0) / (hi - lo + EPS)
    return out


def ref_pcm_seed(cam):
    b, k, h, w = cam.shape
    out = torch.zeros(b, k + 1, h, w, dtype=cam.dtype)
    for i in range(b):
        norm = [
            (cam[i, c].clamp(min=0) - EPS).clamp(min=0) / (cam[i, c].clamp(min=0).max() + EPS)
            for c in range(k)
        ]
        for y in range(h):
            for x in range(w):
                vals = [float(norm[c][y, x]) for c in range(k)]
                top = max(vals)
                out[i, 0, y, x] = 1 - top
                for c in range(k):
                    out[i, c + 1, y, x] = vals[c] if vals[c] == top else 0.0
    return out


def ref_max_onehot(cam):
    out = cam.clone()
    for i in range(cam.shape[0]):
        for y in range(cam.shape[2]):
            for x in range(cam.shape[3]):
                fg = [float(v) for v in cam[i, 1:, y, x]]
                for c, v in enumerate(fg):
                    if v != max(fg):
                        out[i, c + 1, y, x] = 0.0
    return out


@torch.no_grad()
def ref_pcm(pcm, seed, conv4, conv5, image_small):
    """y_j = sum_i seed_i a_ij with a_ij = relu(f_i . f_j) / sum_i relu(f_i . f_j), pixel by pixel."""
    b, k, h, w = seed.shape
    w3, w4, w9 = (m.weight[:, :, 0, 0] for m in (pcm.proj_low, pcm.proj_high, pcm.embed))
    out = torch.zeros_like(seed)
    for n in range(b):
        feats = []
        for y in range(h):
            for x in range(w):
                v = torch.cat(
                    [
                        image_small[n, :, y, x],
                        (w3 @ conv4[n, :, y, x]).clamp(min=0),
                        (w4 @ conv5[n, :, y, x]).clamp(min=0),
                    ]
                )
                f = w9 @ v
                feats.append(f / (f.norm() + EPS))
        pix = [(y, x) for y in range(h) for x in range(w)]
        for j, (yj, xj) in enumerate(pix):
            aff = [max(float(feats[i] @ feats[j]), 0.0) for i in range(len(pix))]
            z = sum(aff) + EPS
            for i, (yi, xi) in enumerate(pix):
                out[n, :, yj, xj] += seed[n, :, yi, xi] * aff[i] / z
    return out


def test_max_norm_and_background():
    cam = _rand(2, 3, 4, 5)
    cam[0, 1] = -1.0  # an all-negative map -> zeros, no NaN
    got = max_norm(cam)
    torch.testing.assert_close(got, ref_max_norm(cam))
    assert got[0, 1].abs().sum() == 0 and got.max() < 1
    bg = add_background(got)
    assert bg.shape == (2, 4, 4, 5)
    torch.testing.assert_close(bg[:, 0], 1 - got.max(dim=1).values)


def test_pcm_seed_and_max_onehot():
    cam = _rand(2, 3, 3, 4, seed=1)
    cam.requires_grad_()
    seed = pcm_seed(cam)
    assert not seed.requires_grad
    torch.testing.assert_close(seed, ref_pcm_seed(cam.detach()))
    full = add_background(max_norm(cam.detach()))
    torch.testing.assert_close(max_onehot(full), ref_max_onehot(full))
    assert torch.equal(full, add_background(max_norm(cam.detach())))  # input left untouched


def _pcm():
    torch.manual_seed(0)
    return PixelCorrelationModule(
        low_channels=5, high_channels=6, low_out=4, high_out=3, out_channels=7
    ).double()


def test_pcm_against_the_pixel_reference():
    pcm = _pcm()
    seed = pcm_seed(_rand(2, 3, 3, 4, seed=2))
    conv4, conv5 = _rand(2, 5, 3, 4, seed=3), _rand(2, 6, 3, 4, seed=4)
    image = _rand(2, 3, 3, 4, seed=5)  # already at the map's size: no resizing in the way
    got = pcm(seed, {"conv4": conv4, "conv5": conv5}, image)
    torch.testing.assert_close(got, ref_pcm(pcm, seed, conv4, conv5, image), rtol=1e-10, atol=1e-12)
    aff = pcm.affinity({"conv4": conv4, "conv5": conv5}, image, (3, 4))
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(2, 12, dtype=F64), rtol=1e-4, atol=1e-4)


def test_pcm_resizes_the_image_and_taps_and_trains_only_itself():
    pcm = _pcm()
    seed = pcm_seed(_rand(1, 3, 3, 4, seed=6))
    conv4 = _rand(1, 5, 3, 4, seed=7).requires_grad_()
    conv5 = _rand(1, 6, 6, 8, seed=8).requires_grad_()  # a tap at another stride
    image = _rand(1, 3, 24, 32, seed=9).requires_grad_()
    got = pcm(seed, {"conv4": conv4, "conv5": conv5}, image)
    small = F.interpolate(image.detach(), (3, 4), mode="bilinear", align_corners=True)
    c5 = F.interpolate(conv5.detach(), (3, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(
        got, ref_pcm(pcm, seed, conv4.detach(), c5, small), rtol=1e-10, atol=1e-12
    )
    got.sum().backward()
    assert conv4.grad is None and conv5.grad is None  # taps detached (SEAM)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pcm.parameters())
    with pytest.raises(KeyError, match="conv5"):
        pcm(seed, {"conv4": conv4}, image)


def test_er_and_ecr_against_references():
    a, b = _rand(2, 3, 4, 4, seed=10), _rand(2, 3, 4, 4, seed=11)
    ref_er = (
        sum(abs(float(x - y)) for x, y in zip(a.flatten(), b.flatten(), strict=True)) / a.numel()
    )
    torch.testing.assert_close(equivariant_regularization(a, b), torch.tensor(ref_er, dtype=F64))
    other = add_background(max_norm(a)).requires_grad_()
    rv = _rand(2, 4, 4, 4, seed=12).requires_grad_()
    got = equivariant_cross_regularization(other, rv, top_ratio=0.2)
    k = int(4 * 4 * 4 * 0.2)
    per_sample = []
    for n in range(2):
        target, pred = ref_max_onehot(other.detach())[n].flatten(), rv[n].detach().flatten()
        diffs = sorted((abs(float(x - y)) for x, y in zip(target, pred, strict=True)), reverse=True)
        per_sample.append(sum(diffs[:k]) / k)
    torch.testing.assert_close(got, torch.tensor(sum(per_sample) / 2, dtype=F64))
    got.backward()
    assert other.grad is None and rv.grad.abs().sum() > 0  # the other view is a fixed target
    with pytest.raises(ValueError, match="equal shapes"):
        equivariant_regularization(a, b[:, :, :2])


def test_seam_losses_end_to_end():
    cam1, cam2 = _rand(2, 3, 8, 8, seed=13), _rand(2, 3, 3, 3, seed=14)
    rv1, rv2 = _rand(2, 4, 8, 8, seed=15), _rand(2, 4, 3, 3, seed=16)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]], dtype=F64)
    got = seam_losses(cam1, rv1, cam2, rv2, labels)

    def resize(x):
        return F.interpolate(x, (3, 3), mode="bilinear", align_corners=True)

    fg, with_bg = (
        labels[:, :, None, None],
        torch.cat([torch.ones(2, 1), labels], 1)[:, :, None, None],
    )
    c1, c2 = resize(ref_max_norm(cam1)) * fg, ref_max_norm(cam2) * fg
    r1, r2 = resize(ref_max_norm(rv1)) * with_bg, ref_max_norm(rv2) * with_bg
    er = (c1 - c2).abs().mean()
    k = int(4 * 9 * 0.2)

    def ecr(other, rv):
        d = (ref_max_onehot(add_background(other)) - rv).abs().flatten(1)
        return torch.stack([row.sort(descending=True).values[:k].mean() for row in d]).mean()

    torch.testing.assert_close(got["er"], er)
    torch.testing.assert_close(got["ecr"], ecr(c2, r1) + ecr(c1, r2))
    torch.testing.assert_close(got["total"], got["er"] + got["ecr"])
    assert c1[1, 0].abs().sum() == 0  # absent classes are zeroed


def test_seam_with_the_classifier():
    torch.manual_seed(0)
    model = MCISClassifier(TinyBackbone(), num_classes=3)
    pcm = PixelCorrelationModule(
        low_channels=8, high_channels=10, low_out=4, high_out=4, out_channels=6
    )
    x = torch.randn(2, 3, 64, 64)
    x2 = seam_view(x)
    assert x2.shape == (2, 3, 19, 19)
    cam1, rv1 = seam_cams(model.phi, model.backbone, pcm, x)
    cam2, rv2 = seam_cams(model.phi, model.backbone, pcm, x2)
    assert (
        cam1.shape == (2, 3, 8, 8)
        and rv1.shape == (2, 4, 8, 8)
        and cam2.shape[-2:] == rv2.shape[-2:]
    )
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    losses = seam_losses(cam1, rv1, cam2, rv2, labels)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["er"].backward(retain_graph=True)
    assert (
        model.phi.weight.grad.abs().sum() > 0
        and model.backbone.conv6[1].weight.grad.abs().sum() > 0
    )
    assert all(p.grad is None for p in pcm.parameters())  # ER does not train the PCM
    model.zero_grad(set_to_none=True)
    losses["ecr"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pcm.parameters())
    assert model.phi.weight.grad is None  # ECR trains the PCM only (seed and target detached)
