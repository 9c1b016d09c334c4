"""SigLIP-style ViT image encoder (patch embedding, learned positions, pre-LN blocks).

CLIP (LLaVA's tower) is the same network with options: a class token with its own position,
no bias on the patch conv, ``pre_layernorm`` before the blocks, quick-GELU MLPs; LLaVA reads
the hidden state after ``layers`` blocks without ``post_layernorm`` and may drop token 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from .layers import MLP


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg.hidden, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.hidden, cfg.mlp, "gelu", bias=True, act=cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ConvStem(nn.Module):
    """3x3 stride-2 conv + GELU, then patchify the half-resolution map: finer features for text."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        mid = max(16, cfg.hidden // 4)
        self.conv1 = nn.Conv2d(3, mid, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(mid, cfg.hidden, cfg.patch_size // 2, stride=cfg.patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


def bucket_position_ids(side: int, rows: int, cols: int) -> torch.Tensor:
    """transformers' Idefics3VisionEmbeddings position ids for an unpadded ``rows x cols`` grid.

    Same float32 arithmetic (fraction, clamp, bucketize against ``arange(1/side, 1, 1/side)``),
    so the ids match transformers bit for bit, rounding quirks included.
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side)

    def buckets(n: int) -> torch.Tensor:
        frac = torch.arange(n, dtype=torch.float32) * (1.0 / torch.tensor(n))
        return torch.bucketize(torch.clamp(frac, max=1.0 - 1e-6), boundaries, right=True)

    return (buckets(rows)[:, None] * side + buckets(cols)[None, :]).reshape(-1)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "conv":
            self.patch_embedding = ConvStem(cfg)
        else:
            self.patch_embedding = nn.Conv2d(
                3, cfg.hidden, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
            )
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.randn(cfg.hidden) * 0.02)
        self.position_embedding = nn.Embedding(cfg.num_patches + int(cfg.class_token), cfg.hidden)
        if cfg.position_buckets:
            side = cfg.image_size // cfg.patch_size
            self.register_buffer(
                "position_ids", bucket_position_ids(side, side, side), persistent=False
            )
        if cfg.pre_norm:
            self.pre_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        if cfg.post_norm:
            self.post_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.gradient_checkpointing = False  # see VLM.set_gradient_checkpointing

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] normalised -> features [B, cfg.num_tokens, hidden]."""
        cfg = self.cfg
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if cfg.class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        if cfg.position_buckets:
            x = x + self.position_embedding.weight[self.position_ids][None]
        else:
            x = x + self.position_embedding.weight[None]
        if cfg.pre_norm:
            x = self.pre_layernorm(x)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        if cfg.post_norm:
            x = self.post_layernorm(x)
        return x[:, 1:] if cfg.drop_first_token else x
