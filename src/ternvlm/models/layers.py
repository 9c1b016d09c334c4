"""Building blocks shared by the vision encoder and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``rmsnorm`` (llama) or ``layernorm`` (SigLIP, Phi)."""
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh`` (tanh-approximated GELU), ``gelu`` (exact) or ``quick_gelu`` (CLIP)."""
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class MLP(nn.Module):
    """``swiglu``: down(silu(gate(x)) * up(x)); ``gelu``: fc2(act(fc1(x))), ``act`` gelu_tanh."""

    def __init__(
        self, dim: int, hidden: int, kind: str, bias: bool, act: str = "gelu_tanh"
    ) -> None:
        super().__init__()
        self.kind, self.act = kind, act
        if kind == "swiglu":
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
            self.up_proj = nn.Linear(dim, hidden, bias=bias)
            self.down_proj = nn.Linear(hidden, dim, bias=bias)
        else:
            self.fc1 = nn.Linear(dim, hidden, bias=bias)
            self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(activation(self.act, self.fc1(x)))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``rot_dim`` dims of each head (HF rotate-half)."""

    def __init__(self, head_dim: int, partial: float, theta: float, max_len: int) -> None:
        super().__init__()
        self.rot_dim = int(head_dim * partial) // 2 * 2
        inv = 1.0 / (
            theta ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float32) / self.rot_dim)
        )
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D]; positions: [T] or [B, T]."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        if cos.dim() == 2:
            cos, sin = cos[None, None], sin[None, None]
        else:
            cos, sin = cos[:, None], sin[:, None]
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        half = self.rot_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
