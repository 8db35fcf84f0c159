"""AffinityNet's training targets and loss (psa).

Pairs: positions i and j = i + (dy, dx) of the stride-8 grid with (dy, dx) from
:func:`pair_offsets`, psa's training set: the Euclidean disc dy² + dx² < r² (radius 5 in psa)
of the random walk's :func:`~mcis_dist.affinity.random_walk.neighbour_offsets`, forward half
only, so each unordered pair within the radius appears exactly once. Maps are indexed by i,
as everywhere in :mod:`mcis_dist.affinity`: ``aff[:, o, y, x]`` is a(i, j) for i = (y, x),
j = (y + dy_o, x + dx_o).

Targets from a label map (0 background, k + 1 class k, 255 ignore; see
:mod:`mcis_dist.affinity.labels`) at the same grid: a pair with both ends labelled (not 255)
and inside the grid is positive when the labels are equal (background-positive when both are 0,
foreground-positive when both are the same class) and negative when they differ.

Loss (psa, Eq. 5-8 of Ahn & Kwak 2018):

    L = L_bg+ / 4 + L_fg+ / 4 + L_neg / 2,
    L_bg+ = mean over bg-positive pairs of -log(a_ij), likewise L_fg+,
    L_neg = mean over negative pairs of -log(1 - a_ij),

each mean pooled over the whole batch; a term without pairs is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mcis_dist.affinity.labels import IGNORE
from mcis_dist.affinity.random_walk import neighbour_offsets
from mcis_dist.models.affinitynet import shift_map

__all__ = ["affinity_loss", "affinity_targets", "pair_offsets"]

#: weight of each term in the total (psa)
TERM_WEIGHTS = {"bg_pos": 0.25, "fg_pos": 0.25, "neg": 0.5}


def pair_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """psa's training pairs: the forward half (dy > 0, or dy == 0 and dx > 0) of the disc
    dy² + dx² < radius² of :func:`~mcis_dist.affinity.random_walk.neighbour_offsets`, in its
    row-major order. radius 5 -> 34 offsets (the random walk's full disc has 69).

    The half-plane set holds one of (d, -d) for every nonzero d of the disc, so each unordered
    pair {i, j} within the radius is counted once (affinities are symmetric).
    """
    return [(dy, dx) for dy, dx in neighbour_offsets(radius) if dy > 0 or (dy == 0 and dx > 0)]


def affinity_targets(
    labels: Tensor, offsets: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair targets from stride-8 labels.

    Args:
        labels: (B, h, w) integer labels (uint8: 0 bg, k + 1 class k, 255 ignore).
        offsets: O pair offsets ``(dy, dx)``; pair (i, i + offset) is indexed by i.
    Returns:
        ``(bg_pos, fg_pos, neg)``, each (B, O, h, w) bool; all False where either end is 255 or
        the neighbour is outside the grid.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, h, w), got shape {tuple(labels.shape)}")
    li = labels.long()  # (B, h, w)
    neighbours = [shift_map(li, dy, dx, fill=IGNORE) for dy, dx in offsets]
    b, h, w = li.shape
    lj = torch.stack(neighbours, dim=1) if neighbours else li.new_full((b, 0, h, w), IGNORE)
    li = li.unsqueeze(1)  # (B, 1, h, w)
    both = (li != IGNORE) & (lj != IGNORE)  # (B, O, h, w)
    same = both & (li == lj)
    return same & (li == 0), same & (li > 0), both & (li != lj)


def affinity_loss(
    aff: Tensor, labels: Tensor, offsets: Sequence[tuple[int, int]], eps: float = 1e-5
) -> tuple[Tensor, dict[str, Tensor]]:
    """psa's affinity loss: bg_pos/4 + fg_pos/4 + neg/2 (see the module docstring).

    Args:
        aff: (B, O, h, w) affinities in [0, 1] for the same offsets
            (``AffinityNet.affinities``).
        labels: (B, h, w) stride-8 labels.
        offsets: the O offsets.
        eps: a and 1 - a are clamped to at least eps inside the log.
    Returns:
        ``(total, parts)``: parts holds each term (``bg_pos``, ``fg_pos``, ``neg``, detached)
        and its pair count (``n_bg_pos``, ``n_fg_pos``, ``n_neg``, long tensors).
    """
    if aff.dim() != 4 or aff.shape[1] != len(offsets) or aff.shape[0] != labels.shape[0]:
        raise ValueError(
            f"aff {tuple(aff.shape)} must be (B, O={len(offsets)}, h, w) for labels "
            f"{tuple(labels.shape)}"
        )
    if aff.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"aff grid {tuple(aff.shape[-2:])} != labels {tuple(labels.shape[-2:])}")
    bg_pos, fg_pos, neg = affinity_targets(labels, offsets)  # (B, O, h, w) each
    pos_nll = -torch.log(aff.clamp_min(eps))  # (B, O, h, w)
    neg_nll = -torch.log((1 - aff).clamp_min(eps))

    def mean_over(mask: Tensor, nll: Tensor) -> tuple[Tensor, Tensor]:
        count = mask.sum()
        return torch.where(mask, nll, 0).sum() / count.clamp_min(1), count

    terms = {}
    terms["bg_pos"], n_bg = mean_over(bg_pos, pos_nll)
    terms["fg_pos"], n_fg = mean_over(fg_pos, pos_nll)
    terms["neg"], n_neg = mean_over(neg, neg_nll)
    total = sum(TERM_WEIGHTS[k] * v for k, v in terms.items())
    parts = {k: v.detach() for k, v in terms.items()}
    parts.update(n_bg_pos=n_bg, n_fg_pos=n_fg, n_neg=n_neg)
    return total, parts
