r"""Losses of the co-attention classifier (MCIS, ECCV 2020, Eq. 1, 5, 9, 10).

L_CE is the sigmoid cross entropy of the paper, i.e. ``multilabel_soft_margin_loss``
(mean over classes and over the batch):

    single      (Eq. 1):  L_CE(s_m, l_m) + L_CE(s_n, l_n)
    coattention (Eq. 5):  L_CE(s_m^{m∩n}, l_m ∩ l_n) + L_CE(s_n^{m∩n}, l_m ∩ l_n)
    contrastive (Eq. 9):  L_CE(s_m^{m\n}, l_m \ l_n) + L_CE(s_n^{n\m}, l_n \ l_m)
    total       (Eq. 10): the weighted sum (weights 1 in the paper)

Options from the authors' code: the contrastive term only from epoch
``contrastive_from_epoch`` on (2); ``reduction="authors"`` averages the two images' terms of
the single and co-attention losses instead of adding them (the authors concatenate m and n
into one batch) and adds each contrastive direction only when some pair of the batch has a
non-empty difference; ``self_pair_loss`` / ``self_pair_views`` are their extra terms pairing
an image with its own flip, 0.75x and 2x copies.

``contrastive_classes="pair"`` (not in the paper) restricts Eq. 9's L_CE to the classes of the
pair, l_m ∪ l_n (``pair_classification_loss``): classes neither image holds contribute nothing,
so phi_co is not trained to call absent classes negative on the contrastive features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mcis_dist.models.mcis import MCISOutput

Reduction = Literal["paper", "authors"]
ContrastiveClasses = Literal["all", "pair"]


@dataclass(frozen=True)
class LossWeights:
    """Weight of each term of Eq. 10; 0 switches a term off (it is still reported)."""

    single: float = 1.0
    coattention: float = 1.0
    contrastive: float = 1.0


def intersection_targets(labels_m: Tensor, labels_n: Tensor) -> Tensor:
    """l_m ∩ l_n (Eq. 5), elementwise and: (B, K) {0, 1} -> (B, K) float."""
    _check_labels(labels_m, labels_n)
    return ((labels_m > 0.5) & (labels_n > 0.5)).to(_float(labels_m))


def difference_targets(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """l_a \\ l_b = l_a - l_a ∩ l_b (Eq. 9): the classes of a that b lacks, (B, K) float."""
    _check_labels(labels_a, labels_b)
    return ((labels_a > 0.5) & ~(labels_b > 0.5)).to(_float(labels_a))


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """L_CE: sigmoid cross entropy, mean over classes and batch."""
    return F.multilabel_soft_margin_loss(logits, targets.to(logits.dtype))


def union_classes(labels_m: Tensor, labels_n: Tensor) -> Tensor:
    """l_m ∪ l_n, the classes one of the two images holds: (B, K) {0, 1} -> (B, K) float."""
    _check_labels(labels_m, labels_n)
    return ((labels_m > 0.5) | (labels_n > 0.5)).to(_float(labels_m))


def pair_classification_loss(logits: Tensor, targets: Tensor, classes: Tensor) -> Tensor:
    """L_CE over the classes a pair holds only: per pair, the mean over the classes with
    ``classes`` = 1 of the sigmoid cross entropy (0 for a pair without any), then the mean over
    pairs. logits, targets, classes (B, K) -> 0-d."""
    per_class = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), reduction="none"
    )  # (B, K)
    mask = classes.to(logits.dtype)  # (B, K)
    count = mask.sum(dim=1).clamp(min=1)  # (B,)
    return ((per_class * mask).sum(dim=1) / count).mean()


def mcis_loss(
    output: MCISOutput,
    labels_m: Tensor,
    labels_n: Tensor,
    *,
    epoch: int,
    weights: LossWeights | None = None,
    contrastive_from_epoch: int = 2,
    reduction: Reduction = "paper",
    contrastive_classes: ContrastiveClasses = "all",
) -> dict[str, Tensor]:
    """Eq. 10 for a batch of pairs; returns every named term and ``total``.

    Args:
        output: the classifier's six score vectors, each (B, K).
        labels_m, labels_n: (B, K) image-level labels in {0, 1}.
        epoch: current epoch (0-based); the contrastive term counts from
            ``contrastive_from_epoch`` on.
        weights: weight per term (default ``LossWeights()``: all 1, as the paper).
        reduction: "paper" adds the m and n terms; "authors" as described in the module.
        contrastive_classes: the classes Eq. 9's L_CE averages over: "all" K (the paper), or
            "pair", the pair's classes l_m ∪ l_n only (``pair_classification_loss``).
    Returns:
        ``single_m, single_n, single, coattention_m, coattention_n, coattention,
        contrastive_m, contrastive_n, contrastive, total``. Terms that do not count (weight
        0, or the contrastive term before its epoch) are reported detached.
    """
    if reduction not in ("paper", "authors"):
        raise ValueError(f"reduction must be one of 'paper', 'authors', got {reduction!r}")
    if contrastive_classes not in ("all", "pair"):
        raise ValueError(
            f"contrastive_classes must be one of 'all', 'pair', got {contrastive_classes!r}"
        )
    weights = LossWeights() if weights is None else weights
    inter = intersection_targets(labels_m, labels_n)
    diff_m, diff_n = difference_targets(labels_m, labels_n), difference_targets(labels_n, labels_m)
    if contrastive_classes == "pair":  # Eq. 9 over l_m ∪ l_n only
        union = union_classes(labels_m, labels_n)  # (B, K)
        contrast_m = pair_classification_loss(output.contrast_m, diff_m, union)
        contrast_n = pair_classification_loss(output.contrast_n, diff_n, union)
    else:  # Eq. 9 over all K classes
        contrast_m = classification_loss(output.contrast_m, diff_m)
        contrast_n = classification_loss(output.contrast_n, diff_n)
    terms = {
        "single_m": classification_loss(output.single_m, labels_m),
        "single_n": classification_loss(output.single_n, labels_n),
        "coattention_m": classification_loss(output.coatt_m, inter),
        "coattention_n": classification_loss(output.coatt_n, inter),
        "contrastive_m": contrast_m,
        "contrastive_n": contrast_n,
    }
    half = 0.5 if reduction == "authors" else 1.0
    terms["single"] = half * (terms["single_m"] + terms["single_n"])
    terms["coattention"] = half * (terms["coattention_m"] + terms["coattention_n"])
    zero = terms["contrastive_m"].new_zeros(())
    if reduction == "authors":  # a direction counts only if some pair has a difference
        use_m, use_n = bool(diff_m.any()), bool(diff_n.any())
        terms["contrastive"] = (terms["contrastive_m"] if use_m else zero) + (
            terms["contrastive_n"] if use_n else zero
        )
    else:
        terms["contrastive"] = terms["contrastive_m"] + terms["contrastive_n"]
    active = {
        "single": weights.single != 0,
        "coattention": weights.coattention != 0,
        "contrastive": weights.contrastive != 0 and epoch >= contrastive_from_epoch,
    }
    total = zero
    for name, on in active.items():
        if on:
            total = total + getattr(weights, name) * terms[name]
        else:
            for key in (name, f"{name}_m", f"{name}_n"):
                terms[key] = terms[key].detach()
    terms["total"] = total
    return terms


def self_pair_loss(
    output: MCISOutput, labels: Tensor, *, reduction: Reduction = "paper"
) -> dict[str, Tensor]:
    """The authors' extra terms for a pair (I, T(I)) of an image and its own copy.

    Both images carry ``labels``, so l ∩ l = l: the single and co-attention losses of Eq. 1
    and 5 with targets ``labels`` (the authors add no contrastive term: l \\ l is empty).
    Returns ``single``, ``coattention`` and ``total``.
    """
    half = 0.5 if reduction == "authors" else 1.0
    single = half * (
        classification_loss(output.single_m, labels) + classification_loss(output.single_n, labels)
    )
    coatt = half * (
        classification_loss(output.coatt_m, labels) + classification_loss(output.coatt_n, labels)
    )
    return {"single": single, "coattention": coatt, "total": single + coatt}


def self_pair_views(images: Tensor, scales: tuple[float, ...] = (0.75, 2.0)) -> list[Tensor]:
    """The authors' self-pair copies of (B, 3, H, W) images: a horizontal flip, then one
    bilinear rescale per scale (default 0.75x and 2x)."""
    views = [images.flip(-1)]
    for s in scales:
        size = (max(1, round(images.shape[-2] * s)), max(1, round(images.shape[-1] * s)))
        views.append(F.interpolate(images, size=size, mode="bilinear", align_corners=False))
    return views


def _float(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def _check_labels(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"labels must both be (B, K), got {tuple(a.shape)}, {tuple(b.shape)}")
