"""The co-attention classifier of MCIS (ECCV 2020, §3.1-3.2) on any stride-8 backbone.

For a pair (I_m, I_n) with backbone features F_m, F_n (B, C, H, W) the head produces six class
score vectors (B, K):

* single-image scores s_m, s_n = GAP(phi(F)) (Eq. 1);
* co-attentive scores GAP(phi_co(F^{m∩n})) from the co-attention of Eq. 2-4 (Eq. 5);
* contrastive scores GAP(phi_co(F ⊙ (1 - B))) with the class-agnostic co-attention
  B = sigmoid(W_B F^{m∩n}) (Eq. 6-8, loss Eq. 9).

Paper by default, the authors' code's variants as options: phi_co is a
separate 1x1 conv without bias in the authors' code; the paper says "the same phi"
(``shared_phi=True``); ``phi_co_bias=True`` gives the separate phi_co a bias (not in either:
it lets Eq. 9 call absent classes negative without closing the gate B of Eq. 6). With ``domains=3`` there are three W_P (§3.2, extra data): pair type 0
target-target, 1 extra-extra, 2 cross-domain.

Because phi is a 1x1 convolution (affine), GAP(phi(F)) = phi(GAP(F)): scores are computed on
pooled features, which is exact and cheaper; the dense maps phi(F) are the localization maps
(``single_round_cam``, ``coattentive_cam``).

Over 400 lines because the head of Eq. 1-9 and its tested variants are one model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcis_dist.models.coattention import Backend, coattention, coattention_cosine
from mcis_dist.models.params import lr_groups

PAIR_TARGET, PAIR_EXTRA, PAIR_CROSS = 0, 1, 2  # pair types when domains == 3 (§3.2)
AFFINITIES = ("bilinear", "cosine")  # Eq. 2 as the paper; its normalised variant
W_P_INITS = ("uniform", "identity")
W_P_SEED = 20200823  # W_P's uniform init comes from its own generator, so it can be recomputed


@dataclass
class MCISOutput:
    """Class scores (logits, before the sigmoid), each (B, K)."""

    single_m: Tensor  # s_m = GAP(phi(F_m))                       Eq. 1
    single_n: Tensor  # s_n
    coatt_m: Tensor  # s_m^{m∩n} = GAP(phi_co(F_m^{m∩n}))          Eq. 5
    coatt_n: Tensor  # s_n^{m∩n}
    contrast_m: Tensor  # s_m^{m\n} = GAP(phi_co(F_m ⊙ A_m^{m\n}))  Eq. 8-9
    contrast_n: Tensor  # s_n^{n\m}


class MCISClassifier(nn.Module):
    """Backbone + co-attention head (Eq. 1-9).

    Args:
        backbone: module with ``out_channels: int`` whose ``forward(x)`` returns
            (B, out_channels, H/8, W/8) (``forward_features`` and ``new_parameters`` optional).
        num_classes: K, foreground classes.
        domains: number of W_P matrices: 1, or 3 (target-target, extra-extra, cross-domain).
        shared_phi: use phi (with its bias) for the co-attentive and contrastive features too,
            as the paper says; default False is the authors' code: a separate bias-free phi_co.
        phi_bias: bias of the single-image phi (authors: True).
        phi_co_bias: give the separate phi_co a bias (authors: False; with ``shared_phi`` phi_co
            is phi, whose bias ``phi_bias`` sets, so it is refused there).
        gate_bias: bias of W_B (authors: False).
        chunk_size: positions per block of the memory-efficient co-attention.
        coattention_backend: "chunked" or "sdpa" (see ``coattention``).
        affinity: "bilinear", Eq. 2 exactly as the paper (default); "cosine", the normalised
            variant P = normalize(W_P^T F_m)^T normalize(F_n) / tau (``coattention_cosine``).
        temperature: tau of the cosine affinity.
        learn_temperature: train log(tau) with the head (cosine only).
        w_p_init: "uniform" (``nn.Linear``'s init, the authors'), or "identity" (W_P = I, so
            the cosine affinity starts as the plain feature similarity); default: uniform for
            bilinear, identity for cosine.
        freeze_backbone: train the head only: the backbone's parameters get
            ``requires_grad=False``, it stays in eval mode (no dropout, no stochastic depth, its
            BatchNorm statistics kept) and runs without autograd (a forward pass costs about a
            third of a forward + backward).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        domains: int = 1,
        shared_phi: bool = False,
        phi_bias: bool = True,
        phi_co_bias: bool = False,
        gate_bias: bool = False,
        chunk_size: int | None = None,
        coattention_backend: Backend = "chunked",
        affinity: str = "bilinear",
        temperature: float = 0.1,
        learn_temperature: bool = False,
        w_p_init: str | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        w_p_init = w_p_init or ("identity" if affinity == "cosine" else "uniform")
        if w_p_init not in W_P_INITS:
            raise ValueError(f"w_p_init must be one of {W_P_INITS}, got {w_p_init!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if learn_temperature and affinity != "cosine":
            raise ValueError("learn_temperature applies to affinity='cosine' only")
        if shared_phi and phi_co_bias:
            raise ValueError(
                "phi_co_bias applies to a separate phi_co only, not with shared_phi=True "
                "(phi_co is then phi, whose bias phi_bias sets)"
            )
        self.affinity, self.w_p_init = affinity, w_p_init
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"backbone needs an int attribute out_channels, got {channels!r}")
        if domains not in (1, 3):
            raise ValueError(f"domains must be 1 or 3, got {domains}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes, self.domains, self.shared_phi = num_classes, domains, shared_phi
        self.chunk_size, self.coattention_backend = chunk_size, coattention_backend
        self.phi = nn.Conv2d(channels, num_classes, 1, bias=phi_bias)  # Eq. 1
        self.phi_coatt = (  # Eq. 5, 8
            None if shared_phi else nn.Conv2d(channels, num_classes, 1, bias=phi_co_bias)
        )
        self.w_p = nn.Parameter(torch.empty(domains, channels, channels))  # Eq. 2
        self.w_b = nn.Conv2d(channels, 1, 1, bias=gate_bias)  # Eq. 6
        log_tau = torch.tensor(math.log(temperature))
        if learn_temperature:  # a 0-d parameter: no weight decay (see ``param_groups``)
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau, persistent=False)  # from config
        self.reset_head()
        self.backbone_frozen = bool(freeze_backbone)
        if self.backbone_frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def reset_head(self) -> None:
        """Initialise the head as the authors' code: phi ~ N(0, 2/K) with zero bias, W_P like
        ``nn.Linear`` (U(-1/sqrt(C), 1/sqrt(C))) or the identity (``w_p_init``), phi_co and
        W_B with PyTorch's conv default; phi_co's bias (``phi_co_bias``) starts at zero."""
        nn.init.normal_(self.phi.weight, 0.0, math.sqrt(2.0 / self.num_classes))
        if self.phi.bias is not None:
            nn.init.zeros_(self.phi.bias)
        with torch.no_grad():
            self.w_p.copy_(self.initial_w_p())
        for conv in (self.phi_coatt, self.w_b):
            if conv is not None:
                conv.reset_parameters()
        if self.phi_coatt is not None and self.phi_coatt.bias is not None:
            nn.init.zeros_(self.phi_coatt.bias)

    def initial_w_p(self) -> Tensor:
        """W_P at initialisation, reproducible anywhere (for the drift diagnostic): the identity,
        or U(-1/sqrt(C), 1/sqrt(C)) from a generator with a fixed seed (``W_P_SEED``)."""
        d, c, _ = self.w_p.shape
        if self.w_p_init == "identity":
            return torch.eye(c).expand(d, c, c).clone()
        bound = 1.0 / math.sqrt(c)
        gen = torch.Generator().manual_seed(W_P_SEED)
        return torch.rand((d, c, c), generator=gen).mul_(2 * bound).sub_(bound)

    def affinity_logits(self, fm: Tensor, fn: Tensor, w_p: Tensor | None = None) -> Tensor:
        """The affinity P (B, Hm*Wm, Hn*Wn) of Eq. 2 (or its cosine variant), materialised:
        for diagnostics, not training. ``w_p`` defaults to the first W_P."""
        w = self.w_p[0] if w_p is None else w_p
        keys = torch.matmul(w.transpose(-1, -2).to(fm.dtype), fm.flatten(2))  # (B, C, Lm)
        queries = fn.flatten(2)
        if self.affinity == "cosine":
            keys = F.normalize(keys, dim=1, eps=1e-6)
            queries = F.normalize(queries, dim=1, eps=1e-6) / self.temperature.to(fn.dtype)
        return torch.bmm(keys.transpose(1, 2), queries)

    @property
    def phi_co(self) -> nn.Conv2d:
        """The class-aware layer applied to co-attentive and contrastive features."""
        return self.phi if self.phi_coatt is None else self.phi_coatt

    def train(self, mode: bool = True) -> MCISClassifier:
        """As ``nn.Module.train``; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    # ---- forward ------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        """Backbone features (B, C, H/8, W/8); without autograd when the backbone is frozen."""
        if self.backbone_frozen:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(
        self, image_m: Tensor, image_n: Tensor, pair_type: int | Tensor | None = None
    ) -> MCISOutput:
        """Images (B, 3, H, W) (m and n may differ in size) -> ``MCISOutput``.

        Images of equal size go through the backbone as one batch of 2B (the built-in
        backbones keep BatchNorm frozen, so this equals two passes).
        """
        if image_m.shape == image_n.shape:  # one backbone pass for both images
            fm, fn = self.features(torch.cat([image_m, image_n])).chunk(2)
        else:
            fm, fn = self.features(image_m), self.features(image_n)
        return self.forward_features(fm, fn, pair_type)

    def forward_features(
        self, fm: Tensor, fn: Tensor, pair_type: int | Tensor | None = None
    ) -> MCISOutput:
        """The head on backbone features fm (B, C, Hm, Wm) and fn (B, C, Hn, Wn)."""
        m_coatt, n_coatt = self.coattentive_features(fm, fn, pair_type)
        gate_m = torch.sigmoid(self.w_b(m_coatt))  # (B, 1, Hm, Wm)  B_m^{m∩n}  Eq. 6
        gate_n = torch.sigmoid(self.w_b(n_coatt))  # (B, 1, Hn, Wn)  B_n^{m∩n}
        # the first pair's features and gates, for the training diagnostics (no copies)
        self.last_pair = (fm[:1].detach(), fn[:1].detach(), gate_m[:1].detach(), pair_type)
        return MCISOutput(
            single_m=_scores(self.phi, fm),
            single_n=_scores(self.phi, fn),
            coatt_m=_scores(self.phi_co, m_coatt),
            coatt_n=_scores(self.phi_co, n_coatt),
            contrast_m=_scores(self.phi_co, fm * (1 - gate_m)),  # Eq. 7-8
            contrast_n=_scores(self.phi_co, fn * (1 - gate_n)),
        )

    def coattentive_features(
        self, fm: Tensor, fn: Tensor, pair_type: int | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(F_m^{m∩n}, F_n^{m∩n}) of Eq. 4, each pair with the W_P of its pair type."""
        types = _pair_types(pair_type, fm.shape[0], self.domains, fm.device)
        if types is None or types.numel() == 0:
            return self._coattention(fm, fn, self.w_p[0])
        if bool((types == types[0]).all()):
            return self._coattention(fm, fn, self.w_p[int(types[0])])
        m_out, n_out = torch.empty_like(fm), torch.empty_like(fn)
        for d in types.unique().tolist():  # one co-attention call per pair type
            idx = (types == d).nonzero().squeeze(1)
            m_part, n_part = self._coattention(fm[idx], fn[idx], self.w_p[d])
            m_out = m_out.index_copy(0, idx, m_part.to(m_out.dtype))
            n_out = n_out.index_copy(0, idx, n_part.to(n_out.dtype))
        return m_out, n_out

    @property
    def temperature(self) -> Tensor:
        """tau of the cosine affinity (0-d)."""
        return self.log_temperature.exp()

    def _coattention(self, fm: Tensor, fn: Tensor, w_p: Tensor) -> tuple[Tensor, Tensor]:
        if self.affinity == "cosine":
            n_from_m, m_from_n = coattention_cosine(fm, fn, w_p, self.temperature)
        else:
            n_from_m, m_from_n = coattention(
                fm, fn, w_p, chunk_size=self.chunk_size, backend=self.coattention_backend
            )
        return m_from_n, n_from_m  # (F_m^{m∩n}, F_n^{m∩n})

    # ---- parameters ---------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        """phi, phi_co, W_P and W_B (and log tau when it is learnt)."""
        mods = [self.phi, self.w_b] + ([self.phi_coatt] if self.phi_coatt is not None else [])
        tau = [self.log_temperature] if isinstance(self.log_temperature, nn.Parameter) else []
        return [self.w_p, *tau] + [p for m in mods for p in m.parameters()]

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters trained from scratch (the authors' x10 lr): the head, plus the backbone's
        own ``new_parameters()`` when it has one."""
        own = self.head_parameters()
        extra = getattr(self.backbone, "new_parameters", None)
        return own + (list(extra()) if callable(extra) else [])

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split for the authors' lr multipliers: pretrained weights (x1)
        and biases (x2), new weights (x10) and biases (x20); 0-d parameters (log tau) go with
        the biases (no weight decay). Frozen parameters are left out."""
        return lr_groups(self.named_parameters(), {id(p) for p in self.new_parameters()})


def _scores(phi: nn.Conv2d, feats: Tensor) -> Tensor:
    """GAP(phi(F)) = phi(GAP(F)) for a 1x1 conv: (B, C, H, W) -> (B, K)."""
    pooled = feats.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return phi(pooled).flatten(1)  # (B, K)


def _pair_types(
    pair_type: int | Tensor | None, batch: int, domains: int, device: torch.device
) -> Tensor | None:
    if pair_type is None:
        if domains != 1:
            raise ValueError(f"pair_type is required with domains={domains}")
        return None
    types = torch.as_tensor(pair_type, device=device).long().reshape(-1)
    if types.numel() == 1:
        types = types.expand(batch)
    if types.numel() != batch:
        raise ValueError(f"pair_type needs one entry per pair ({batch}), got {types.numel()}")
    if batch and (int(types.min()) < 0 or int(types.max()) >= domains):
        raise ValueError(f"pair_type must be in [0, {domains}), got {types.tolist()}")
    return types


# ---- localization maps (§3.2) -----------------------------------------------------------
@torch.no_grad()
def single_round_cam(model: MCISClassifier, images: Tensor) -> Tensor:
    """Single-round maps S_n = phi(F_n), raw (pre-ReLU): (B, 3, H, W) -> (B, K, H/8, W/8)."""
    return model.phi(model.backbone(images))


@torch.no_grad()
def coattentive_cam(
    model: MCISClassifier,
    image: Tensor,
    related_images: Tensor,
    class_k: int,
    pair_type: int | None = None,
) -> Tensor:
    """Multi-round map of class k (§3.2): L_k = 1/|R| sum_r phi_co(F^{n∩r})[k], raw.

    The image takes the place of m and each related image that of n, as the authors'
    inference does: F^{n∩r} = F_r A_r is the image's co-attentive feature read from r, and the
    class layer is the one trained on co-attentive features (Eq. 5).

    Args:
        image: (3, H, W) or (1, 3, H, W).
        related_images: (R, 3, H', W') images labelled with class k.
    Returns:
        (H/8, W/8).
    """
    if not 0 <= class_k < model.num_classes:
        raise ValueError(f"class_k must be in [0, {model.num_classes}), got {class_k}")
    image = image.unsqueeze(0) if image.dim() == 3 else image
    feats = model.backbone(image)  # (1, C, h, w)
    related = model.backbone(related_images)  # (R, C, h', w')
    return coattentive_map(model, feats, related, class_k, pair_type)[0]


READOUT_LAYERS = ("phi_co", "phi")
EVIDENCE = (
    "raw",
    "minmax",
)  # contribution_map: the evidence as is, or min-max per pair  # the class layer a co-attentive map reads with


def _class_layer(
    model: MCISClassifier, class_k: int, layer: str = "phi_co"
) -> tuple[Tensor, Tensor | None]:
    """Row k of phi_co (Eq. 5, default) or of phi (Eq. 1): weight (1, C, 1, 1), bias (1,)."""
    if layer not in READOUT_LAYERS:
        raise ValueError(f"layer must be one of {READOUT_LAYERS}, got {layer!r}")
    conv = model.phi_co if layer == "phi_co" else model.phi
    w = conv.weight[class_k : class_k + 1]  # (1, C, 1, 1)
    b = None if conv.bias is None else conv.bias[class_k : class_k + 1]
    return w, b


def _pairs_of(feats: Tensor, related: Tensor) -> tuple[Tensor, Tensor]:
    """Every query with every related image: (B, C, h, w), (R, C, h', w') -> (B·R, ...) each."""
    b, r = feats.shape[0], related.shape[0]
    return feats.repeat_interleave(r, dim=0), related.repeat(b, 1, 1, 1)


@torch.no_grad()
def coattentive_map(
    model: MCISClassifier,
    feats: Tensor,
    related_feats: Tensor,
    class_k: int,
    pair_type: int | None = None,
    *,
    layer: str = "phi_co",
) -> Tensor:
    """``coattentive_cam`` on backbone features, for a batch of queries (e.g. an image and its
    flip): feats (B, C, h, w), related_feats (R, C, h', w') -> (B, h, w) raw maps
    1/|R| sum_r phi_co(F_q^{q∩r})[k]."""
    b, r = feats.shape[0], related_feats.shape[0]
    q, rel = _pairs_of(feats, related_feats)  # (B·R, C, h, w), (B·R, C, h', w')
    q_coatt, _ = model.coattentive_features(q, rel, pair_type)  # (B·R, C, h, w)
    w, bias = _class_layer(model, class_k, layer)
    maps = F.conv2d(q_coatt, w, bias)  # (B·R, 1, h, w)
    return maps.view(b, r, *maps.shape[-2:]).mean(dim=1)  # (B, h, w)


@torch.no_grad()
def contribution_map(
    model: MCISClassifier,
    feats: Tensor,
    related_feats: Tensor,
    class_k: int,
    pair_type: int | None = None,
    *,
    layer: str = "phi_co",
    from_object: bool = False,
    evidence: str = "raw",
) -> Tensor:
    """Where the related images' co-attentive class-k scores come from, on the query's grid.

    With the query as m and a related image r as n, the related image's co-attentive score of
    Eq. 5 is GAP(phi_co(F_m A_m)); phi_co is a 1x1 conv, w·f + b, and every column of A_m sums
    to 1 (Eq. 3), so phi_co(sum_i A_m[i, j] f_m,i) = sum_i A_m[i, j] phi_co(f_m,i), bias
    included, and

        s_r^{m∩r}[k] = 1/L_r sum_j phi_co(sum_i A_m[i, j] f_m,i)[k]
                     = sum_i (1/L_r sum_j A_m[i, j]) phi_co(f_m,i)[k],

    a sum over the query's positions i: the co-attentive score decomposes like a CAM (Eq. 1)
    into contributions, each position's own class-k evidence weighted by the attention it
    receives from the related image. This returns L_m * (1/L_r sum_j A_m[i, j]) *
    phi_co(f_m,i)[k] (received attention relative to uniform, times the evidence), averaged over
    the related images: feats (B, C, h, w), related_feats (R, C, h', w') -> (B, h, w) raw maps,
    whose mean over positions is s_r^{m∩r}[k]. A bias of phi_co (``shared_phi``, or
    ``phi_co_bias``) is part of each position's evidence, weighted like it: received * (w·f_i +
    b), not a constant added to the map (a position the related image does not attend to
    contributes nothing, the bias included; the mean, received averaging 1, is the same).

    Two options read the same attention differently (controls and variants, not the paper's):
    ``layer="phi"`` weights phi's evidence (Eq. 1, the single-round map's layer) instead of
    phi_co's; ``from_object=True`` counts only the attention paid by the related image's
    class-k region: the mean over j becomes a weighted mean with weights ReLU(phi(f_r,j)[k])
    normalised to sum 1 (the related image's own single-round map of k; uniform when it is 0
    everywhere), so a query position scores where it resembles the related image's object.

    ``evidence="minmax"`` maps each pair's evidence w·f_i + b to [0, 1] by its minimum and
    maximum over the query's positions before the attention weights it (for maps that are
    min-max normalised, ``cams.normalize: minmax``): received >= 0 times evidence that is
    negative everywhere (a class near the all-absent prior) would put the most attended
    positions lowest and invert the map; the decomposition into the score (the mean) then no
    longer holds.
    """
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}")
    b, r = feats.shape[0], related_feats.shape[0]
    q, rel = _pairs_of(feats, related_feats)  # (B·R, C, h, w), (B·R, C, h', w')
    types = _pair_types(pair_type, q.shape[0], model.domains, q.device)
    w_p = model.w_p[0 if types is None else int(types[0])]
    a = torch.softmax(model.affinity_logits(q.float(), rel.float(), w_p.float()), dim=1)  # A_m
    if from_object:  # only the related image's class-k region pays attention (its S_r[k])
        w_r, b_r = _class_layer(model, class_k, "phi")
        s_r = F.relu(F.conv2d(rel.float(), w_r.float(), None if b_r is None else b_r.float()))
        s_r = s_r.flatten(1)  # (B·R, Lr) single-round evidence of k on the related image (Eq. 1)
        total = s_r.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, s_r / total.clamp_min(1e-12), 1.0 / s_r.shape[1])
        received = torch.bmm(a, weights.unsqueeze(2)).squeeze(2) * a.shape[1]  # (B·R, Lm)
    else:
        received = a.mean(dim=2) * a.shape[1]  # (B·R, Lm), 1 = uniform
    w, bias = _class_layer(model, class_k, layer)
    own = F.conv2d(q, w, bias)  # (B·R, 1, h, w)
    if evidence == "minmax":
        own = minmax_cam(own)
    maps = received.view(own.shape).to(own.dtype) * own
    return maps.view(b, r, *maps.shape[-2:]).mean(dim=1)  # (B, h, w)


@torch.no_grad()
def contrastive_map(
    model: MCISClassifier,
    feats: Tensor,
    other_feats: Tensor,
    class_k: int,
    pair_type: int | None = None,
) -> Tensor:
    """Contrastive map of class k (Eq. 6-8) against images *without* k: the query's features
    with the parts it shares with each other image o masked out, F_q ⊙ (1 − B_q^{q∩o}), through
    phi_co; averaged over the others. feats (B, C, h, w), other_feats (O, C, h', w') -> (B, h, w)."""
    b, o = feats.shape[0], other_feats.shape[0]
    q, other = _pairs_of(feats, other_feats)
    q_coatt, _ = model.coattentive_features(q, other, pair_type)  # (B·O, C, h, w)
    gate = torch.sigmoid(model.w_b(q_coatt))  # (B·O, 1, h, w)   B_q^{q∩o}  Eq. 6
    w, bias = _class_layer(model, class_k)
    maps = F.conv2d(q * (1 - gate), w, bias)  # (B·O, 1, h, w)   Eq. 7-8
    return maps.view(b, o, *maps.shape[-2:]).mean(dim=1)


@torch.no_grad()
def coattentive_cams(model: MCISClassifier, image: Tensor, related: Mapping[int, Tensor]) -> Tensor:
    """``coattentive_cam`` for every labelled class k -> related images; other classes stay 0.

    Returns (K, H/8, W/8) raw maps.
    """
    maps = None
    for k, images in related.items():
        cam = coattentive_cam(model, image, images, k)
        if maps is None:
            maps = cam.new_zeros((model.num_classes, *cam.shape))
        maps[k] = cam
    if maps is None:
        raise ValueError("related must name at least one class")
    return maps


def normalize_cam(cams: Tensor, eps: float = 1e-5) -> Tensor:
    """ReLU, then divide every map by its own maximum: (..., h, w) -> values in [0, 1]."""
    cams = F.relu(cams)
    peak = cams.amax(dim=(-2, -1), keepdim=True)
    return cams / (peak + eps)


def minmax_cam(cams: Tensor) -> Tensor:
    """Min-max normalisation of every map, (m - min) / (max - min): (..., h, w) -> [0, 1] with
    peak 1 (a constant map -> 0). The score maps of Choe et al. (CVPR 2020) for box scores."""
    low = cams.amin(dim=(-2, -1), keepdim=True)
    span = cams.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (cams - low) / span.clamp_min(1e-12), torch.zeros_like(cams))
