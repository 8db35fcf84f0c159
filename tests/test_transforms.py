"""Augmentation maths against slow references: the fused colour jitter, crops, normalisation."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mcis_dist.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    augment,
    color_jitter,
    normalize,
    random_crop,
)


def image(seed=0, h=20, w=30):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(30, 220, (3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    "b, c, s", [(1.2, 1.0, 1.0), (1.0, 0.8, 1.0), (1.0, 1.0, 1.3), (0.9, 1.1, 0.7)]
)
def test_brightness_contrast_saturation_match_torchvision(b, c, s):
    """Without clipping in between, the one-step jitter equals torchvision's three steps."""
    img = image()
    ref = img.float()
    ref = ref * b  # brightness
    mean = (0.299 * ref[0] + 0.587 * ref[1] + 0.114 * ref[2]).mean()
    ref = c * ref + (1 - c) * mean  # contrast: blend with the mean luma
    grey = 0.299 * ref[0] + 0.587 * ref[1] + 0.114 * ref[2]
    ref = s * ref + (1 - s) * grey  # saturation: blend with the pixel's luma
    ref = ref.round().clamp(0, 255)
    got = color_jitter(img, b, c, s, 0.0)
    assert (got.int() - ref.int()).abs().max() <= 1
    # and torchvision itself agrees where its intermediate rounding allows
    tv = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
    assert (got.int() - tv.int()).abs().max() <= 3  # its uint8 rounding after every step


def test_hue_is_a_yiq_chroma_rotation():
    img = image(1, 6, 7)
    for hue in (0.0, 0.1, -0.25, 0.5):
        got = color_jitter(img, hue=hue).int()
        theta = -2 * np.pi * hue
        for y in range(6):
            for x in range(7):
                r, g, b = (img[:, y, x].double() / 255).tolist()
                yy, i, q = colorsys.rgb_to_yiq(r, g, b)
                i, q = i * np.cos(theta) - q * np.sin(theta), i * np.sin(theta) + q * np.cos(theta)
                want = np.clip(np.round(np.array(colorsys.yiq_to_rgb(yy, i, q)) * 255), 0, 255)
                assert np.abs(got[:, y, x].numpy() - want).max() <= 2  # colorsys rounds YIQ
    assert torch.equal(color_jitter(img, hue=0.0), img)


@pytest.mark.parametrize("rgb", [(200, 40, 40), (40, 200, 40), (40, 40, 200), (180, 160, 30)])
@pytest.mark.parametrize("hue", [0.04, -0.04])
def test_hue_turns_the_same_way_as_torchvision(rgb, hue):
    img = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).contiguous()
    ours = color_jitter(img, hue=hue)[:, 0, 0].int() - img[:, 0, 0].int()
    theirs = TF.adjust_hue(img, hue)[:, 0, 0].int() - img[:, 0, 0].int()
    big = theirs.abs() >= 4  # the channels torchvision clearly moves
    assert big.any()
    assert (torch.sign(ours[big]) == torch.sign(theirs[big])).all(), (ours, theirs)


def test_grey_stays_grey_and_identity_is_exact():
    grey = torch.full((3, 5, 5), 128, dtype=torch.uint8)
    out = color_jitter(grey, 1.0, 1.0, 1.7, 0.3)
    assert (out.int() - 128).abs().max() <= 1
    img = image(3)
    assert torch.equal(color_jitter(img), img)


def test_random_crop_pads_with_the_mean_colour_and_keeps_pixels():
    rng = np.random.default_rng(0)
    img = image(4, 10, 12)
    out = random_crop(img, 16, (124, 116, 104), rng)
    assert out.shape == (3, 16, 16)
    mask = (out != torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1)).any(0)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    y0, x0 = int(ys.min()), int(xs.min())
    assert torch.equal(out[:, y0 : y0 + 10, x0 : x0 + 12], img)
    big = image(5, 40, 50)
    crop = random_crop(big, 16, (0, 0, 0), rng)
    windows = [big[:, y : y + 16, x : x + 16] for y in range(25) for x in range(35)]
    assert any(torch.equal(crop, w) for w in windows)


def test_augment_is_seeded_and_normalise_inverts():
    spec = AugmentSpec(crop_size=24, resize_long=(24, 40))
    img = image(6, 30, 40)
    a = augment(img, spec, np.random.default_rng([1, 2, 3]))
    b = augment(img, spec, np.random.default_rng([1, 2, 3]))
    c = augment(img, spec, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 24, 24)
    x = normalize(a[None], IMAGENET_MEAN, IMAGENET_STD)
    back = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(
        1, 3, 1, 1
    )
    assert torch.allclose(back * 255, a[None].float(), atol=1e-3)
    with pytest.raises(ValueError, match="resize_long"):
        AugmentSpec(resize_long=(50, 10))
