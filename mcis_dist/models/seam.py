"""SEAM's equivariant attention (Wang et al., CVPR 2020), the regulariser MCIS adds on LID (§4.4).

Pieces (as in the SEAM authors' code):

* ``max_norm``: ReLU, then per-map (p - min - eps)^+ / (max - min + eps).
* ``pcm_seed``: the CAM the pixel correlation module (PCM) propagates, computed without
  gradient: ReLU, per-class max-normalisation, background = 1 - max over classes, and at every
  pixel only the strongest foreground class kept.
* ``PixelCorrelationModule``: features f = W_9 [image downsized; ReLU(W_3 conv4); ReLU(W_4
  conv5)] (taps detached, 1x1 convs without bias), L2-normalised per pixel; affinity
  a_ij = ReLU(f_i . f_j), normalised over i (sum_i a_ij = 1); refined map y_j = sum_i cam_i a_ij.
* ``equivariant_regularization`` (ER): mean |rescale(cam_1) - cam_2| over foreground classes.
* ``equivariant_cross_regularization`` (ECR): mean of the top 20% of
  |max_onehot(cam_other, detached) - PCM(cam)| over all (class, pixel) entries of a sample.
* ``seam_losses``: both of them for a view pair (image, image rescaled by 0.3).

The classifier's K foreground maps stand in for SEAM's fc8: SEAM's fc8 has a background channel,
but every use overwrites it with 1 - max(foreground), so it is built here from the K maps.
ER and ECR are computed at the second view's CAM resolution: view-1 maps are max-normalised at
their own resolution, then resized (bilinear, align_corners) to view 2's (SEAM's code first
upsamples both views' maps to their input-image sizes; the comparison is the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PixelCorrelationModule",
    "add_background",
    "equivariant_cross_regularization",
    "equivariant_regularization",
    "max_norm",
    "max_onehot",
    "pcm_seed",
    "seam_cams",
    "seam_losses",
    "seam_view",
]


def max_norm(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """ReLU and per-map min-max normalisation: (B, K, h, w) -> (B, K, h, w) in [0, 1)."""
    cam = F.relu(cam)
    hi = cam.amax(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    lo = cam.amin(dim=(2, 3), keepdim=True)
    return F.relu(cam - lo - eps) / (hi - lo + eps)


def add_background(cam_fg: Tensor) -> Tensor:
    """Prepend a background channel 1 - max_k cam_k: (B, K, h, w) -> (B, K+1, h, w)."""
    return torch.cat([1 - cam_fg.amax(dim=1, keepdim=True), cam_fg], dim=1)


@torch.no_grad()
def pcm_seed(cam_fg: Tensor, eps: float = 1e-5) -> Tensor:
    """The map the PCM propagates (no gradient): (B, K, h, w) raw -> (B, K+1, h, w)."""
    cam = F.relu(cam_fg)
    cam = F.relu(cam - eps) / (cam.amax(dim=(2, 3), keepdim=True) + eps)  # per class
    top = cam.amax(dim=1, keepdim=True)  # (B, 1, h, w)
    return torch.cat([1 - top, cam * (cam >= top)], dim=1)


def max_onehot(cam: Tensor) -> Tensor:
    """Keep, per pixel, only the largest foreground channel (channel 0 is background and is
    kept as it is): (B, K+1, h, w) -> (B, K+1, h, w)."""
    fg = cam[:, 1:]
    return torch.cat([cam[:, :1], fg * (fg == fg.amax(dim=1, keepdim=True))], dim=1)


def seam_view(images: Tensor, scale: float = 0.3) -> Tensor:
    """SEAM's second view: the images rescaled by ``scale`` (bilinear, align_corners)."""
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=True)


class PixelCorrelationModule(nn.Module):
    """SEAM's PCM: refines a CAM with a pixel affinity from low-level features.

    Args:
        low_channels, high_channels: channels of the two backbone taps (ResNet-38: conv4 512,
            conv5 1024).
        low_out, high_out: their 1x1 projections (SEAM: 64 and 128).
        out_channels: the affinity features (SEAM: 192).
        taps: names of the two taps in the backbone's ``forward_features`` dict.
    """

    def __init__(
        self,
        *,
        low_channels: int = 512,
        high_channels: int = 1024,
        low_out: int = 64,
        high_out: int = 128,
        out_channels: int = 192,
        taps: Sequence[str] = ("conv4", "conv5"),
    ) -> None:
        super().__init__()
        if len(taps) != 2:
            raise ValueError(f"taps must name two features, got {taps!r}")
        self.taps = tuple(taps)
        self.proj_low = nn.Conv2d(low_channels, low_out, 1, bias=False)
        self.proj_high = nn.Conv2d(high_channels, high_out, 1, bias=False)
        self.embed = nn.Conv2d(3 + low_out + high_out, out_channels, 1, bias=False)
        nn.init.kaiming_normal_(self.proj_low.weight)
        nn.init.kaiming_normal_(self.proj_high.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)

    def embedding(self, feats: Mapping[str, Tensor], image: Tensor, size: tuple[int, int]):
        """Per-pixel affinity features, L2-normalised: -> (B, D, h*w)."""
        missing = [t for t in self.taps if t not in feats]
        if missing:
            raise KeyError(f"PCM needs taps {missing}; the backbone gave {sorted(feats)}")
        low, high = (_resize(feats[t].detach(), size) for t in self.taps)
        x = torch.cat(
            [
                _resize(image, size),  # (B, 3, h, w)
                F.relu(self.proj_low(low)),  # (B, low_out, h, w)
                F.relu(self.proj_high(high)),  # (B, high_out, h, w)
            ],
            dim=1,
        )
        f = self.embed(x).flatten(2)  # (B, D, h*w)
        return f / (f.norm(dim=1, keepdim=True) + 1e-5)

    def affinity(self, feats: Mapping[str, Tensor], image: Tensor, size: tuple[int, int]):
        """a_ij = ReLU(f_i . f_j) / sum_i ReLU(f_i . f_j): (B, h*w, h*w), columns sum to 1."""
        f = self.embedding(feats, image, size)  # (B, D, L)
        aff = F.relu(torch.bmm(f.transpose(1, 2), f))  # (B, L, L)
        return aff / (aff.sum(dim=1, keepdim=True) + 1e-5)

    def forward(self, seed: Tensor, feats: Mapping[str, Tensor], image: Tensor) -> Tensor:
        """seed (B, K+1, h, w) (``pcm_seed``), taps, image (B, 3, H, W) -> (B, K+1, h, w)."""
        b, k, h, w = seed.shape
        aff = self.affinity(feats, image, (h, w))  # (B, L, L)
        return torch.bmm(seed.flatten(2), aff).view(b, k, h, w)  # y_j = sum_i seed_i a_ij


def seam_cams(
    phi: nn.Module, backbone: nn.Module, pcm: PixelCorrelationModule, images: Tensor
) -> tuple[Tensor, Tensor]:
    """One view through the classifier's phi and the PCM -> (cam (B, K, h, w) raw,
    cam_rv (B, K+1, h, w)). ``backbone.forward_features`` must give ``out`` and the taps."""
    feats = backbone.forward_features(images)
    cam = phi(feats["out"])  # (B, K, h, w)
    return cam, pcm(pcm_seed(cam), feats, images)


def equivariant_regularization(cam_a: Tensor, cam_b: Tensor) -> Tensor:
    """ER: mean |cam_a - cam_b| over foreground maps (B, K, h, w) of the same size."""
    if cam_a.shape != cam_b.shape:
        raise ValueError(f"ER needs equal shapes, got {tuple(cam_a.shape)}, {tuple(cam_b.shape)}")
    return (cam_a - cam_b).abs().mean()


def equivariant_cross_regularization(
    cam_other: Tensor, cam_rv: Tensor, top_ratio: float = 0.2
) -> Tensor:
    """ECR: mean of the largest ``top_ratio`` of |max_onehot(cam_other) - cam_rv| per sample;
    cam_other (detached here) and cam_rv are (B, K+1, h, w) with background first."""
    diff = (max_onehot(cam_other.detach()) - cam_rv).abs().flatten(1)  # (B, (K+1)*h*w)
    k = max(1, int(diff.shape[1] * top_ratio))
    return diff.topk(k, dim=1).values.mean()


def seam_losses(
    cam1: Tensor,
    cam_rv1: Tensor,
    cam2: Tensor,
    cam_rv2: Tensor,
    labels: Tensor,
    *,
    top_ratio: float = 0.2,
) -> dict[str, Tensor]:
    """ER and ECR for a view pair (view 2 = ``seam_view`` of view 1).

    Args:
        cam1, cam2: raw foreground CAMs (B, K, h1, w1), (B, K, h2, w2).
        cam_rv1, cam_rv2: PCM outputs (B, K+1, ...) of the same views.
        labels: (B, K) image labels; maps of absent classes are zeroed.
    Returns:
        ``er``, ``ecr`` and ``total`` (their sum, SEAM's weights).
    """
    size = tuple(cam2.shape[-2:])
    fg = labels.to(cam1.dtype)[:, :, None, None]  # (B, K, 1, 1)
    with_bg = F.pad(fg, (0, 0, 0, 0, 1, 0), value=1.0)  # (B, K+1, 1, 1), background on
    c1 = _resize(max_norm(cam1), size) * fg  # (B, K, h2, w2)
    c2 = max_norm(cam2) * fg
    rv1 = _resize(max_norm(cam_rv1), size) * with_bg  # (B, K+1, h2, w2)
    rv2 = max_norm(cam_rv2) * with_bg
    er = equivariant_regularization(c1, c2)
    ecr = equivariant_cross_regularization(
        add_background(c2), rv1, top_ratio
    ) + equivariant_cross_regularization(add_background(c1), rv2, top_ratio)
    return {"er": er, "ecr": ecr, "total": er + ecr}


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
