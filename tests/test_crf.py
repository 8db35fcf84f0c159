"""Dense CRF (pydensecrf2): the unary convention, refinement of a noisy two-region case,
outputs, process-pool results against inline ones, and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from mcis_dist.crf import CRFParams, crf_inference, crf_labels, crf_map


def _two_regions(h=48, w=64, seed=0, flip=0.3):
    """A dark left / bright right image with pixel noise, the true labels, and noisy 3-class
    probabilities whose argmax is wrong on about ``flip`` of the pixels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2 :] = 1
    base = np.where(truth[..., None] == 1, [200, 180, 60], [40, 60, 150])
    image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < flip, rng.integers(0, 3, (h, w)), truth)
    logits = rng.normal(0, 0.3, (3, h, w))
    logits[noisy, np.arange(h)[:, None], np.arange(w)] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return image, probs.astype(np.float32), truth


def test_crf_improves_agreement_with_true_regions():
    image, probs, truth = _two_regions()
    before = (probs.argmax(0) == truth).mean()
    after = (crf_labels(image, probs) == truth).mean()
    assert before < 0.85  # the probabilities alone are clearly wrong in places
    assert after >= 0.97 and after > before + 0.1


def test_crf_outputs():
    image, probs, _ = _two_regions(h=20, w=30, seed=1)
    q = crf_inference(image, probs.astype(np.float64))
    assert q.shape == probs.shape and q.dtype == np.float32 and q.flags.c_contiguous
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert (q >= 0).all()
    labels = crf_labels(image, probs, CRFParams(iterations=3))
    assert labels.shape == (20, 30)
    np.testing.assert_array_equal(labels, crf_inference(image, probs, iterations=3).argmax(0))


def test_zero_iterations_return_the_input_distribution():
    """With no mean-field step Q = softmax(−unary): the unary is −log(prob)."""
    image, probs, _ = _two_regions(h=10, w=12, seed=2)
    np.testing.assert_allclose(crf_inference(image, probs, iterations=0), probs, atol=1e-5)


def test_non_contiguous_inputs():
    image, probs, _ = _two_regions(h=16, w=24, seed=3)
    image_f = np.asfortranarray(image)
    probs_t = np.ascontiguousarray(probs.transpose(0, 2, 1)).transpose(0, 2, 1)  # a view
    assert not image_f.flags.c_contiguous and not probs_t.flags.c_contiguous
    np.testing.assert_array_equal(crf_inference(image_f, probs_t), crf_inference(image, probs))


def test_crf_map_inline_keeps_order():
    items = [_two_regions(h=12 + i, w=16, seed=i)[:2] for i in range(3)]
    out = crf_map(items, CRFParams(iterations=2), processes=1)
    assert [o.shape for o in out] == [(3, 12, 16), (3, 13, 16), (3, 14, 16)]
    for (image, probs), q in zip(items, out, strict=True):
        np.testing.assert_array_equal(q, crf_inference(image, probs, iterations=2))


@pytest.mark.slow
def test_crf_map_processes_equal_inline():
    items = [_two_regions(h=24 + 2 * i, w=32, seed=10 + i)[:2] for i in range(5)]
    params = CRFParams(iterations=4)
    inline = crf_map(items, params, processes=1)
    parallel = crf_map(items, params, processes=2)
    assert len(parallel) == len(items)
    for a, b in zip(inline, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_errors():
    image, probs, _ = _two_regions(h=10, w=12)
    with pytest.raises(ValueError, match=r"\(3, 10, 11\) and image_rgb .* \(10, 12, 3\)"):
        crf_inference(image, probs[:, :, :11])
    with pytest.raises(ValueError, match="sum to 1 over C"):
        crf_inference(image, probs * 2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        crf_inference(image, probs - 0.5)
    with pytest.raises(ValueError, match="uint8"):
        crf_inference(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match=r"\(H, W, 3\), got shape \(10, 12\)"):
        crf_inference(image[..., 0], probs)
    with pytest.raises(ValueError, match="item 1: probs"):
        crf_map([(image, probs), (image, probs[:, :5])], processes=1)
    with pytest.raises(ValueError, match="processes"):
        crf_map([(image, probs)], processes=-1)
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(iterations=-1)
