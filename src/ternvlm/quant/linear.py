"""QuantLinear: a ternary/binary nn.Linear trained with a straight-through estimator.

Latent weights live in normalized units, ``latent = clip(w / m, -1, 1)`` with ``m`` the per-group
normalizer from the init (k-means: its centroid a, so the k-means decision |w| > a/2 becomes
|latent| > 0.5, as in the seed). The forward pass uses ``codes * scale``: codes = threshold(latent)
in {-1, 0, 1} (binary: sign), scale learned or recomputed as the L2-optimal centroid given the
codes. The backward pass sends dL/dcodes straight to the latent (identity STE); the trainer
clips latents back to [-latent_clip, latent_clip] after each step (BinaryConnect).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .groups import Granularity
from .init import quantize_groups


def scale_shape(gran: Granularity, n: int, k: int) -> tuple[int, int]:
    if gran.kind == "tensor":
        return (1, 1)
    if gran.kind == "row":
        return (n, 1)
    return (n, k // gran.group_size)


def expand(s: torch.Tensor, k: int) -> torch.Tensor:
    """[N or 1, K/G or 1] per-group values -> broadcastable to [N, K]."""
    if s.shape[1] in (1, k):
        return s
    return s.repeat_interleave(k // s.shape[1], dim=1)


def threshold(latent: torch.Tensor, bits: str) -> torch.Tensor:
    if bits == "binary":
        return torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
    return torch.sign(latent) * (latent.abs() > 0.5)


class QuantLinear(nn.Module):
    """y = x (codes * scale)^T + bias, codes from the latent weights by thresholding."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig) -> None:
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self.bits = cfg.bits
        shape = scale_shape(cfg.gran, out_features, in_features)
        self.latent = nn.Parameter(torch.zeros(out_features, in_features))
        self.register_buffer("norm", torch.ones(shape))  # m: latent unit, in weight units
        if cfg.scale == "learned":
            self.scale = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("scale", torch.ones(shape))  # unused; kept for the export path
        has_bias = bias or cfg.learn_bias
        self.bias = nn.Parameter(torch.zeros(out_features)) if has_bias else None
        self.init_iterations = 0
        self.init_rel_error = float("nan")

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: QuantConfig) -> QuantLinear:
        """Initialise codes and scales from the pre-trained weight with ``cfg.init``."""
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, cfg)
        w = lin.weight.detach().float()
        n, k = w.shape
        gran = cfg.gran
        groups = gran.to_groups(w)
        kw = {"max_iter": cfg.kmeans_iters} if cfg.init == "kmeans" else {}
        if cfg.init == "random":
            kw = {"seed": cfg.seed}
        r = quantize_groups(groups, cfg.init, cfg.bits, **kw)
        shape = scale_shape(gran, n, k)
        a = r.scale.reshape(shape)
        codes = r.codes.reshape(n, k).float()
        m = a
        if cfg.init == "twn":  # TWN's decision threshold is 0.7 mean|w|, not a/2
            m = 1.4 * groups.abs().mean(1).reshape(shape)
        with torch.no_grad():
            lat = w / expand(m, k)
            if cfg.latent_clip is not None:
                lat = lat.clamp(-cfg.latent_clip, cfg.latent_clip)
            bad = threshold(lat, cfg.bits) != codes  # ties, and the random init: follow the codes
            lat[bad] = codes[bad] * 0.75
            q.latent.copy_(lat)
            q.norm.copy_(m)
            q.scale.copy_(a)
            if lin.bias is not None:
                q.bias.copy_(lin.bias.detach())
        q.init_iterations = r.iterations
        q.init_rel_error = float((r.dequant().reshape(n, k) - w).norm() / w.norm().clamp(min=1e-12))
        return q

    def codes(self) -> torch.Tensor:
        """int8 [N, K] codes of the current latent weights."""
        return threshold(self.latent.detach(), self.bits).to(torch.int8)

    def effective_scale(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Per-group scale in weight units (learned, or the L2-optimal centroid for the codes)."""
        if self.cfg.scale == "learned":
            return self.scale
        lat = self.latent
        c = threshold(lat.detach(), self.bits) if codes is None else codes
        nz = (c != 0).float()
        g = self.cfg.gran
        n, k = lat.shape
        num, den = g.to_groups(lat.abs() * nz).sum(1), g.to_groups(nz).sum(1)
        shape = self.norm.shape
        return self.norm * (num / den.clamp(min=1)).reshape(shape)

    def weight_q(self) -> torch.Tensor:
        """Dequantized weight used in the forward pass (STE: gradient flows to the latent)."""
        lat = self.latent
        hard = threshold(lat.detach(), self.bits)
        q = lat + (hard - lat).detach()
        return q * expand(self.effective_scale(hard), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_q(), self.bias)
        c = self.cfg.output_clip
        return y.clamp(-c, c) if c is not None else y

    @torch.no_grad()
    def clip_latent_(self) -> None:
        c = self.cfg.latent_clip
        if c is not None:
            self.latent.clamp_(-c, c)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, bits={self.bits}, "
            f"granularity={self.cfg.granularity}, bias={self.bias is not None}"
        )
