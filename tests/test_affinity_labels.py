"""Training labels from CAMs (psa) and from saliency (paper §3.2) against per-pixel loops that
state the rules literally; stride-8 label sampling; the empty-label check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mcis_dist.affinity.labels import (
    IGNORE,
    confident_labels,
    downsample_labels,
    is_empty,
    saliency_labels,
)

torch.set_num_threads(1)

CLASS_IDS = [4, 11, 0]  # -> label ids 5, 12, 1


def _cams(seed=0, shape=(3, 9, 11)):
    """Max-normalised random CAMs with large low-activation areas (so all three outcomes occur)."""
    rng = np.random.default_rng(seed)
    cams = rng.random(shape).astype(np.float32) ** 3
    return cams / cams.max(axis=(1, 2), keepdims=True)


def _image(seed=0, shape=(9, 11)):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _first_argmax(values):
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _reference_confident(cams, class_ids, weak, strong, crf=None, image=None, conflict=255):
    """Per pixel: confident fg = a class beats the weak background, confident bg = the strong
    background beats every class; exactly one of the two -> its label, else ``conflict``/255.

    ``weak`` / ``strong``: functions of the pixel's max CAM giving the background score.
    """
    n, h, w = cams.shape
    stacks = []
    for background in (weak, strong):
        stack = np.zeros((n + 1, h, w), np.float32)
        for y in range(h):
            for x in range(w):
                peak = max((float(cams[k, y, x]) for k in range(n)), default=0.0)
                stack[0, y, x] = background(peak)
                stack[1:, y, x] = cams[:, y, x]
                if crf is not None:
                    stack[:, y, x] /= max(stack[:, y, x].sum(), 1e-5)
        stacks.append(crf(image, stack) if crf is not None else stack)
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            fg_index = _first_argmax(list(stacks[0][:, y, x]))
            bg_index = _first_argmax(list(stacks[1][:, y, x]))
            conf_fg, conf_bg = fg_index > 0, bg_index == 0
            if conf_fg and not conf_bg:
                out[y, x] = class_ids[fg_index - 1] + 1
            elif conf_bg and not conf_fg:
                out[y, x] = 0
            elif conf_bg and conf_fg:
                out[y, x] = conflict
            else:
                out[y, x] = IGNORE
    return out


def _toy_crf(image, probs):
    """A spatial stand-in for dense CRF: 3x3 box blur, plus a pull towards the background on
    bright pixels; checks what it is given."""
    assert image.dtype == np.uint8 and image.shape == (*probs.shape[1:], 3)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-5)
    padded = np.pad(probs, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = probs.shape[1:]
    out = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    out[0] += 0.4 * (image[..., 0] / 255.0) ** 2
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("crf", [None, _toy_crf], ids=["plain", "crf"])
def test_confident_labels_alpha_form_matches_loop(seed, crf):
    cams, image = _cams(seed), _image(seed)
    got = confident_labels(cams, CLASS_IDS, alpha_low=4, alpha_high=32, crf=crf, image=image)
    want = _reference_confident(
        cams, CLASS_IDS, lambda m: (1 - m) ** 4, lambda m: (1 - m) ** 32, crf, image
    )
    assert got.dtype == np.uint8 and got.shape == cams.shape[1:]
    np.testing.assert_array_equal(got, want)
    assert {0, IGNORE} <= set(np.unique(got).tolist())
    assert set(np.unique(got).tolist()) & {5, 12, 1}


@pytest.mark.parametrize("crf", [None, _toy_crf], ids=["plain", "crf"])
def test_confident_labels_threshold_form_matches_loop(crf):
    cams, image = _cams(2), _image(2)
    got = confident_labels(
        cams, CLASS_IDS, fg_threshold=0.3, bg_threshold=0.05, crf=crf, image=image
    )
    want = _reference_confident(cams, CLASS_IDS, lambda m: 0.3, lambda m: 0.05, crf, image)
    np.testing.assert_array_equal(got, want)
    assert {0, IGNORE} <= set(np.unique(got).tolist())


def test_confident_labels_accept_tensors_and_match_psa_without_crf():
    cams = _cams(3)
    got = confident_labels(torch.from_numpy(cams), torch.tensor(CLASS_IDS))
    np.testing.assert_array_equal(got, confident_labels(cams, CLASS_IDS))
    # psa's formulation: start from the weak-background argmax, its background -> 255,
    # the strong-background argmax's background -> 0
    peak = cams.max(axis=0)
    weak = np.concatenate([((1 - peak) ** 4)[None], cams]).argmax(0)
    strong = np.concatenate([((1 - peak) ** 32)[None], cams]).argmax(0)
    psa = np.array([0, 5, 12, 1], np.uint8)[weak]
    psa[weak == 0] = IGNORE
    psa[strong == 0] = 0
    np.testing.assert_array_equal(got, psa)


@pytest.mark.parametrize("on_conflict,expected", [("ignore", IGNORE), ("background", 0)])
def test_confident_labels_conflicts(on_conflict, expected):
    """A CRF can make a pixel both confident foreground and background."""
    cams, calls = _cams(4), []

    def flipping_crf(image, probs):
        out = np.zeros_like(probs)
        out[1 if not calls else 0] = 1.0  # weak stack -> class 0 everywhere, strong -> bg
        calls.append(1)
        return out

    got = confident_labels(
        cams, CLASS_IDS, crf=flipping_crf, image=_image(4), on_conflict=on_conflict
    )
    assert (got == expected).all() and len(calls) == 2


def test_confident_labels_no_classes_is_all_background():
    got = confident_labels(np.zeros((0, 4, 5), np.float32), [])
    assert got.shape == (4, 5) and (got == 0).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fg_threshold": 0.3}, "both fg_threshold and bg_threshold"),
        ({"fg_threshold": 0.05, "bg_threshold": 0.3}, "bg_threshold <= fg_threshold"),
        ({"alpha_low": 32, "alpha_high": 4}, "alpha_low <= alpha_high"),
        ({"crf": _toy_crf}, "crf needs the image"),
        ({"crf": _toy_crf, "image": np.zeros((3, 3, 3), np.uint8)}, "does not match"),
        ({"on_conflict": "fg"}, "on_conflict"),
    ],
)
def test_confident_labels_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        confident_labels(_cams(), CLASS_IDS, **kwargs)


def test_class_ids_checked():
    with pytest.raises(ValueError, match="3 CAMs"):
        confident_labels(_cams(), [1, 2])
    with pytest.raises(ValueError, match=r"\[0, 253\]"):
        confident_labels(_cams(), [1, 2, 254])


# ---- saliency route (paper §3.2) ---------------------------------------------------------
def _reference_saliency(cams, class_ids, sal):
    """The saliency route (paper §3.2, authors' thresholds) rule by rule, pixel by pixel."""
    n, h, w = cams.shape
    norm = np.zeros_like(cams)
    for k in range(n):
        lo, hi = float(cams[k].min()), float(cams[k].max())
        for y in range(h):
            for x in range(w):
                v = (cams[k, y, x] - lo) / max(hi - lo, 1e-5)
                norm[k, y, x] = v if v >= 0.3 else 0.0
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            maps = [norm[k, y, x] for k in range(n)]
            index = _first_argmax([1 - sal[y, x] / 255.0, *maps])
            label = 0 if index == 0 else class_ids[index - 1] + 1
            if sum(v > 0.99 for v in maps) > 1:
                label = IGNORE
            cue = max(float(sal[y, x]), 255.0 if any(v > 0.95 for v in maps) else 0.0)
            if index == 0 and cue >= 32:
                label = IGNORE
            out[y, x] = label
    fg = sum(1 for v in out.flat if 0 < v < IGNORE)
    return out, fg >= 0.01 * out.size


def _saliency_case(seed=0, h=12, w=16):
    rng = np.random.default_rng(seed)
    cams = (rng.random((3, h, w)) * 5 - 1).astype(np.float32)  # raw, not normalised
    sal = rng.integers(0, 256, (h, w)).astype(np.uint8)
    sal[: h // 2, : w // 2] = rng.integers(0, 40, (h // 2, w // 2))  # mostly non-salient
    cams[0, 2, 3] = cams[1, 2, 3] = 10.0  # both maps at their peak -> ignore
    sal[5, 5], cams[2, 5, 5] = 0, 3.9  # background wins, but class 2 map > 0.95 -> ignore
    return cams, sal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saliency_labels_match_rules(seed):
    cams, sal = _saliency_case(seed)
    got, keep = saliency_labels(cams, CLASS_IDS, sal)
    want, want_keep = _reference_saliency(cams, CLASS_IDS, sal)
    np.testing.assert_array_equal(got, want)
    assert keep == want_keep
    assert got[2, 3] == IGNORE and got[5, 5] == IGNORE
    assert {0, IGNORE} <= set(np.unique(got).tolist())
    assert set(np.unique(got).tolist()) & {5, 12, 1}


@pytest.mark.parametrize("n_fg,keep", [(100, True), (99, False), (0, False)])
def test_saliency_keep_is_one_percent_foreground(n_fg, keep):
    cams = np.zeros((1, 100, 100), np.float32)
    sal = np.zeros((100, 100), np.uint8)
    cams.reshape(1, -1)[0, :n_fg] = 1.0
    sal.reshape(-1)[:n_fg] = 255
    label, got_keep = saliency_labels(cams, [6], sal)
    assert got_keep is keep
    assert np.count_nonzero(label == 7) == n_fg and np.count_nonzero(label == 0) == 10_000 - n_fg


def test_saliency_labels_shape_check():
    with pytest.raises(ValueError, match="saliency"):
        saliency_labels(np.zeros((1, 4, 4), np.float32), [0], np.zeros((4, 5), np.uint8))


# ---- stride 8 and emptiness ---------------------------------------------------------------
def test_downsample_labels_matches_pil_nearest_on_multiples_of_8():
    """psa samples with a PIL nearest rescale by 1/8: pixel 8k + 4."""
    label = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(label).resize((8, 6), Image.NEAREST))
    np.testing.assert_array_equal(downsample_labels(label), pil)
    np.testing.assert_array_equal(downsample_labels(label), label[4::8, 4::8])


def test_downsample_labels_partial_cells_and_tensors():
    label = torch.arange(20 * 13).reshape(1, 20, 13)
    out = downsample_labels(label)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 2)
    rows, cols = [4, 12, 18], [4, 10]  # last cells cover rows 16..19 and cols 8..12
    assert torch.equal(out[0], label[0][rows][:, cols])
    assert downsample_labels(np.zeros((7, 9), np.uint8), stride=4).shape == (2, 3)


def test_is_empty():
    label = np.full((5, 5), IGNORE, np.uint8)
    assert is_empty(label) and is_empty(torch.from_numpy(label))
    label[2, 2] = 0
    assert not is_empty(label)
