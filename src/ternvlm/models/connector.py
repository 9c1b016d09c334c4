"""Idefics3-style connector: pixel shuffle trades sequence length for width, then projects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConnectorConfig


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, N, D] on a square grid -> [B, N / scale^2, D * scale^2] (same order as Idefics3)."""
    b, n, d = x.shape
    side = int(round(n**0.5))
    x = x.view(b, side, side, d)
    x = x.view(b, side, side // scale, d * scale)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(b, side // scale, side // scale, d * scale * scale)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(b, n // (scale * scale), d * scale * scale)


class Connector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        in_dim = vision_dim * cfg.scale_factor**2
        if cfg.kind == "mlp":
            mid = cfg.mlp_hidden or text_dim
            self.linear_1 = nn.Linear(in_dim, mid, bias=cfg.bias)
            self.linear_2 = nn.Linear(mid, text_dim, bias=cfg.bias)
        else:
            self.proj = nn.Linear(in_dim, text_dim, bias=cfg.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (
            pixel_shuffle(features, self.cfg.scale_factor)
            if self.cfg.scale_factor > 1
            else features
        )
        if self.cfg.kind == "mlp":
            approximate = "tanh" if self.cfg.gelu == "tanh" else "none"
            return self.linear_2(F.gelu(self.linear_1(x), approximate=approximate))
        return self.proj(x)
