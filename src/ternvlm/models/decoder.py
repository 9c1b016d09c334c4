"""Decoder-only language model: llama by default, Phi-1.5 style through config options."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DecoderConfig
from .kvcache import KVCache
from .layers import MLP, RotaryEmbedding, make_norm


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and an optional KV cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=cfg.attn_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, positions), rope(k, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_block
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden, cfg.norm_eps)
        self.mlp = MLP(cfg.hidden, cfg.mlp, cfg.mlp_type, cfg.mlp_bias)

    def forward(self, x, rope, positions, cache, layer, attn_mask) -> torch.Tensor:
        h = self.input_layernorm(x)
        a = self.self_attn(h, rope, positions, cache, layer, attn_mask)
        if self.parallel:
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.layers))
        self.norm = make_norm(cfg.norm, cfg.hidden, cfg.norm_eps)
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.partial_rotary, cfg.rope_theta, cfg.max_seq_len
        )
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False  # see VLM.set_gradient_checkpointing

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        c = self.cfg
        dtype = self.norm.weight.dtype  # the embedding may be a packed table (export)
        return KVCache.empty(
            c.layers, batch, c.kv_heads, max_len or c.max_seq_len, c.head_dim, dtype
        )

    def forward(self, embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """embeds [B, T, hidden] -> logits [B, T, vocab]; appends to ``cache`` when given."""
        t = embeds.shape[1]
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the context of {self.cfg.max_seq_len}"
            )
        positions = torch.arange(start, start + t)
        attn_mask = None
        if cache is not None and start > 0 and t > 1:
            # Chunked prefill: query i sees every cached position and the causal part of the chunk.
            kpos = torch.arange(start + t)
            attn_mask = kpos[None, :] <= positions[:, None]
        x = embeds
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:  # keep only the block inputs; recompute the rest in the backward pass
                x = checkpoint(
                    layer, x, self.rope, positions, None, i, attn_mask, use_reentrant=False
                )
            else:
                x = layer(x, self.rope, positions, cache, i, attn_mask)
        if cache is not None:
            cache.length = start + t
        return self.lm_head(self.norm(x))
