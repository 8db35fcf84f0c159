"""Attention diagnostics of the co-attention classifier: is Eq. 2-4 attending to content?

Every number is about A_m = softmax(P) of Eq. 3, column-wise: for each query position j of image
n, a distribution over the positions i of image m (its co-attentive feature F_n^{m∩n} = F_m A_m,
Eq. 4), and about the class-agnostic gate B = sigmoid(W_B F^{m∩n}) of Eq. 6.

* ``hub_top1`` / ``hub_top5``: the share of all attention mass (summed over the queries of n)
  that lands on the 1 / 5 positions of m receiving the most. A content-driven attention spreads
  over the shared object's positions (for 16x16 = 256 positions, ~1/256 per cell at chance); a
  saturated softmax on a few high-norm "hub" cells puts most of the mass on them.
* ``row_max``: mean over queries of the largest attention weight (1.0: one-hot rows).
* ``bg_to_fg``: mean over n's background queries of their mass on m's foreground positions,
  divided by the foreground share of m (chance = 1). Background should not read objects: < 1.
* ``fg_to_same``: the same for n's foreground queries of a class both images hold, on m's
  positions of that class (> 1 is good).
* ``gate_mean``: mean of B over n's positions; ``gate_iou``: IoU of {B > 0.5} with n's region of
  the classes the pair shares (Eq. 7-8 mask that region out).
* ``w_p_drift``: ||W_P - W_P(init)||_F / ||W_P(init)||_F; ``temperature``: tau (cosine only).

``label_free`` needs no masks (used during training on each batch's first pair);
``with_masks`` needs masks on the feature grid (``mcis eval cams``).
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mcis_dist.data.transforms import decode_rgb, normalize
from mcis_dist.models.mcis import MCISClassifier

__all__ = ["attention_map", "hub_mass", "label_free", "with_masks", "w_p_drift"]


@torch.no_grad()
def attention_map(model: MCISClassifier, fm: Tensor, fn: Tensor, pair_type=None) -> Tensor:
    """A_m (B, Lm, Ln): softmax over m's positions (dim 1) of the affinity, per query of n."""
    w = model.w_p[0 if pair_type is None else int(torch.as_tensor(pair_type).reshape(-1)[0])]
    return torch.softmax(model.affinity_logits(fm.float(), fn.float(), w.float()), dim=1)


def hub_mass(a: Tensor, k: int) -> Tensor:
    """Share of the attention mass on the k most-attended positions of m, mean over pairs."""
    received = a.sum(dim=2)  # (B, Lm): mass each key position receives from all queries
    top = received.topk(min(k, received.shape[1]), dim=1).values.sum(dim=1)
    return (top / a.shape[2]).mean()


@torch.no_grad()
def w_p_drift(model: MCISClassifier) -> Tensor:
    """||W_P - W_P(init)||_F / ||W_P(init)||_F (every W_P together)."""
    start = getattr(model, "_w_p_start", None)  # computed once per model and device
    if start is None or start.device != model.w_p.device:
        start = model.initial_w_p().to(model.w_p.device)
        model._w_p_start = start
    return (model.w_p.detach().float() - start).norm() / start.norm()


@torch.no_grad()
def label_free(
    model: MCISClassifier, fm: Tensor, fn: Tensor, gate: Tensor | None = None, pair_type=None
) -> dict[str, Tensor]:
    """Hub mass, row maximum, gate mean, W_P drift (and tau) for pairs (fm, fn) (B, C, H, W);
    ``gate`` (B, 1, H, W) of image m if already computed."""
    a = attention_map(model, fm, fn, pair_type)
    out = {
        "hub_top1": hub_mass(a, 1),
        "hub_top5": hub_mass(a, 5),
        "row_max": a.amax(dim=1).mean(),
        "w_p_drift": w_p_drift(model),
    }
    if gate is not None:
        out["gate_mean"] = gate.float().mean()
    if model.affinity == "cosine":
        out["temperature"] = model.temperature.detach()
    return out


@torch.no_grad()
def with_masks(
    model: MCISClassifier, fm: Tensor, fn: Tensor, mask_m: Tensor, mask_n: Tensor, pair_type=None
) -> dict[str, float]:
    """Sums for the mask-based diagnostics of pairs; masks (B, Hm, Wm) / (B, Hn, Wn) on the
    feature grids, 0 background, k + 1 class k, 255 ignored. Returns running sums (add them
    over batches, then ``finish``)."""
    a = attention_map(model, fm, fn, pair_type)  # (B, Lm, Ln)
    n_coatt = model.coattentive_features(fm, fn, pair_type)[1]  # F_n^{m∩n} (B, C, Hn, Wn)
    gate = torch.sigmoid(model.w_b(n_coatt.to(model.w_b.weight.dtype)).float()).flatten(1)  # B_n
    mm, mn = mask_m.flatten(1).long(), mask_n.flatten(1).long()
    sums = dict.fromkeys(
        (
            "bg_ratio",
            "bg_pairs",
            "fg_ratio",
            "fg_pairs",
            "gate_sum",
            "gate_n",
            "gate_inter",
            "gate_union",
            "hub_top1",
            "hub_top5",
            "pairs",
        ),
        0.0,
    )
    for b in range(a.shape[0]):
        valid_m, valid_n = mm[b] != 255, mn[b] != 255
        fg_m = valid_m & (mm[b] > 0)
        bg_n = valid_n & (mn[b] == 0)
        col = a[b]  # (Lm, Ln)
        if fg_m.any() and bg_n.any():
            chance = fg_m.float().sum() / valid_m.float().sum()
            sums["bg_ratio"] += float(col[fg_m][:, bg_n].sum(0).mean() / chance)
            sums["bg_pairs"] += 1
        shared = set(mm[b][fg_m].unique().tolist()) & set(
            mn[b][valid_n & (mn[b] > 0)].unique().tolist()
        )
        common_n = torch.zeros_like(valid_n)
        ratios = []
        for c in shared:
            same_m, q = mm[b] == c, mn[b] == c
            common_n |= q
            chance = same_m.float().sum() / valid_m.float().sum()
            ratios.append(float(col[same_m][:, q].sum(0).mean() / chance))
        if ratios:
            sums["fg_ratio"] += sum(ratios) / len(ratios)
            sums["fg_pairs"] += 1
        g = gate[b][valid_n]
        sums["gate_sum"] += float(g.sum())
        sums["gate_n"] += g.numel()
        on = (gate[b] > 0.5) & valid_n
        sums["gate_inter"] += float((on & common_n).sum())
        sums["gate_union"] += float((on | common_n).sum())
        sums["hub_top1"] += float(hub_mass(col[None], 1))
        sums["hub_top5"] += float(hub_mass(col[None], 5))
        sums["pairs"] += 1
    return sums


def finish(sums: dict[str, float], model: MCISClassifier) -> dict[str, float | None]:
    """Means from ``with_masks`` sums (None where no pair qualified)."""

    def ratio(a, b):
        return round(sums[a] / sums[b], 4) if sums[b] else None

    out = {
        "pairs": int(sums["pairs"]),
        "hub_top1": ratio("hub_top1", "pairs"),
        "hub_top5": ratio("hub_top5", "pairs"),
        "bg_to_fg": ratio("bg_ratio", "bg_pairs"),
        "fg_to_same": ratio("fg_ratio", "fg_pairs"),
        "gate_mean": ratio("gate_sum", "gate_n"),
        "gate_iou": ratio("gate_inter", "gate_union"),
        "w_p_drift": round(float(w_p_drift(model)), 4),
        "affinity": model.affinity,
    }
    if model.affinity == "cosine":
        out["temperature"] = round(float(model.temperature), 4)
    return out


@torch.no_grad()
def split_report(
    model: MCISClassifier, sampler, size: int, mean, std, pairs: int = 64, seed: int = 0
) -> dict[str, float | None]:
    """``with_masks`` over up to ``pairs`` pairs of a split with masks (``RelatedSampler``):
    image n is every k-th sample, m a seeded other sample sharing one of n's classes; both are
    resized to ``size`` x ``size`` (masks by nearest neighbour to the feature grid)."""

    def load(g):
        sample = sampler.read(g)
        if "mask.png" not in sample:
            return None
        rgb = decode_rgb(sample.get("jpg", sample.get("png")))
        with Image.open(io.BytesIO(sample["mask.png"])) as im:
            mask = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        x = F.interpolate(
            normalize(rgb[None], mean, std), size=(size, size), mode="bilinear", align_corners=False
        )
        return x, mask, json.loads(sample["json"])["labels"]

    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sampler))
    totals: dict[str, float] = {}
    done = 0
    for g in order.tolist():
        if done >= pairs:
            break
        got = load(g)
        if got is None or not got[2]:
            continue
        k = int(rng.choice(got[2]))
        other = sampler.draw(k, 1, sampler.keys[g])
        if not other or (mate := load(other[0])) is None:
            continue
        (xn, mask_n, _), (xm, mask_m, _) = got, mate
        feats = model.backbone(torch.cat([xm, xn]).to(device)).float()
        fm, fn = feats[:1], feats[1:]
        grid = fm.shape[-2:]
        down = [
            F.interpolate(mk[None, None].float(), size=grid, mode="nearest")[0].long()
            for mk in (mask_m, mask_n)
        ]
        for key, v in with_masks(model, fm, fn, down[0], down[1]).items():
            totals[key] = totals.get(key, 0.0) + v
        done += 1
    if not done:
        return {"pairs": 0}
    return finish(totals, model)
