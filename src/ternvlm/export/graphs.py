"""The three static-shape graphs written to the .tflite: encode_image, prefill and decode.

They reuse the model's own modules (norms, MLPs, projections), so the file computes what the
PyTorch model computes; only attention and the KV cache are rewritten for static shapes:

- ``prefill(input_ids [1, T], image_features [1, I, H] [, last [1]])``: the prompt padded to T
  tokens, image features written over the image-token slots, causal attention; returns logits
  [1, T, V] (or [1, 1, V] at position ``last`` when exported with ``--prefill-logits last``) and
  each layer's keys/values [1, T, kvh, D]. Padding after the prompt cannot change earlier
  positions.
- ``decode(token [1, 1], pos [1], k_<i>/v_<i> [1, L, kvh, D])``: one token at position ``pos``
  attending to cache slots < pos and to itself; returns logits [1, 1, V] and the new key/value
  [1, 1, kvh, D] per layer. The caller writes them into its cache at ``pos``: the cache is
  read-only for the graph (no in-place aliasing, no dynamic-update-slice).

The cache is position-major ([1, L, kvh, D]) so that prefill's keys/values [1, T, kvh, D] are the
first T rows of it: a runtime binds them straight into its cache (no copy, no second buffer).

Attention groups query heads by kv head ([1, kvh, rep*T, D] against [1, kvh, T, D]) instead of
repeating keys and values: the same math as the model's repeat_interleave, less work.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.decoder import Attention, Decoder
from ..models.vlm import VLM

NEG = -1e30  # additive mask value (finite: a fully masked row cannot occur, self is visible)


class EncodeImage(nn.Module):
    def __init__(self, model: VLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


def _heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """[1, T, heads*dim] -> [1, heads, T, dim]."""
    return x.view(1, x.shape[1], heads, dim).transpose(1, 2)


def _grouped(q: torch.Tensor, kvh: int) -> torch.Tensor:
    """[1, heads, T, D] -> [1, kvh, rep*T, D]: query head h joins kv head h // rep."""
    _, h, t, d = q.shape
    return q.reshape(1, kvh, (h // kvh) * t, d)


def _ungroup(o: torch.Tensor, heads: int, t: int) -> torch.Tensor:
    """[1, kvh, rep*T, D] -> [1, T, heads*D]."""
    d = o.shape[-1]
    return o.reshape(1, heads, t, d).transpose(1, 2).reshape(1, t, heads * d)


def _qkv(att: Attention, dec: Decoder, h: torch.Tensor, cos, sin, rot):
    if hasattr(att, "qkv_proj"):  # export/linear.py fused the three projections
        kv = att.kv_heads * att.head_dim
        q, k, v = att.qkv_proj(h).split([att.heads * att.head_dim, kv, kv], dim=-1)
    else:
        q, k, v = att.q_proj(h), att.k_proj(h), att.v_proj(h)
    q = _heads(q, att.heads, att.head_dim)
    t = h.shape[1]
    k = k.view(1, t, att.kv_heads, att.head_dim)  # position-major, as the cache stores it
    v = v.view(1, t, att.kv_heads, att.head_dim)
    rd = dec.rope.rot_dim
    k = _rope(k, cos[:, None], sin[:, None], rd, rot)
    return _rope(q, cos, sin, rd, rot), k, v


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """R [dim, dim] with x @ R == cat(-x[dim/2:], x[:dim/2]) exactly (one signed 1 per column)."""
    half = dim // 2
    r = torch.zeros(dim, dim)
    idx = torch.arange(half)
    r[idx + half, idx] = -1.0
    r[idx, idx + half] = 1.0
    return r


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int, rot) -> torch.Tensor:
    """RotaryEmbedding.forward with cos/sin [T, rot] given (gathered once per graph).

    Full rotary: rotate-half as one product with a constant matrix, 4 ops instead of 2 slices, a
    negation, a concatenation and the products (fewer ops: less dispatch and runtime memory).
    """
    if rot_dim == x.shape[-1]:
        return x * cos + torch.matmul(x, rot) * sin
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def _block(layer, x: torch.Tensor, attn_out) -> torch.Tensor:
    """DecoderBlock.forward around an attention result computed by ``attn_out(h)``."""
    h = layer.input_layernorm(x)
    a = attn_out(h)
    if layer.parallel:
        return x + a + layer.mlp(h)
    x = x + a
    return x + layer.mlp(layer.post_attention_layernorm(x))


class Prefill(nn.Module):
    """``last_only``: an extra input ``last`` [1] picks the one position whose logits are
    returned ([1, 1, V]): what generation needs, without a [T, V] head product and buffer."""

    def __init__(self, model: VLM, length: int, last_only: bool = False) -> None:
        super().__init__()
        self.model, self.length, self.last_only = model, length, last_only
        mask = torch.full((length, length), NEG).triu(1)
        rep = model.cfg.decoder.heads // model.cfg.decoder.kv_heads
        self.register_buffer("mask", mask.repeat(rep, 1), persistent=False)  # [rep*T, T]
        rd = model.decoder.rope.rot_dim
        self.register_buffer("rot", rotate_half_matrix(rd), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        last: torch.Tensor | None = None,
    ):
        m, dec = self.model, self.model.decoder
        ids = input_ids.long()
        x = dec.embed_tokens(ids)  # [1, T, H]
        is_img = (ids == m.cfg.image_token_id)[..., None]
        slot = (torch.cumsum(is_img.long(), dim=1) - 1).clamp(min=0)  # [1, T, 1]
        feats = torch.gather(image_features, 1, slot.expand(-1, -1, x.shape[-1]))
        x = torch.where(is_img, feats, x)
        cos, sin = dec.rope.cos[: self.length], dec.rope.sin[: self.length]
        caches = []
        scale = dec.cfg.head_dim**-0.5
        for layer in dec.layers:
            att = layer.self_attn

            def attn_out(h, att=att):
                q, k, v = _qkv(att, dec, h, cos, sin, self.rot)
                caches.extend([k, v])  # [1, T, kvh, D]
                k, v = k.transpose(1, 2), v.transpose(1, 2)
                s = _grouped(q, att.kv_heads) @ k.transpose(-1, -2) * scale + self.mask
                o = torch.softmax(s, dim=-1) @ v
                return att.o_proj(_ungroup(o, att.heads, self.length))

            x = _block(layer, x, attn_out)
        if self.last_only:
            x = torch.index_select(x, 1, last.long())
        return (dec.lm_head(dec.norm(x)), *caches)


class Decode(nn.Module):
    def __init__(self, model: VLM, cache_len: int) -> None:
        super().__init__()
        self.model, self.cache_len = model, cache_len
        self.register_buffer("slots", torch.arange(cache_len), persistent=False)
        rd = model.decoder.rope.rot_dim
        self.register_buffer("rot", rotate_half_matrix(rd), persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, **cache: torch.Tensor):
        dec = self.model.decoder
        x = dec.embed_tokens(token.long())  # [1, 1, H]
        p = pos.long()
        cos, sin = dec.rope.cos[p], dec.rope.sin[p]  # [1, rot]
        visible = torch.where(self.slots[None, :] < p[:, None], 0.0, NEG)  # [1, L]
        scale = dec.cfg.head_dim**-0.5
        new = []
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            kc, vc = cache[f"k_{i}"], cache[f"v_{i}"]

            def attn_out(h, att=att, kc=kc, vc=vc):
                if hasattr(att, "qkv_proj"):  # custom-op files: one DecodeAttention node
                    return self._fused(att, h, cos, sin, kc, vc, pos, new)
                q, k, v = _qkv(att, dec, h, cos, sin, self.rot)
                new.extend([k, v])  # [1, 1, kvh, D]
                k, v = k.transpose(1, 2), v.transpose(1, 2)
                kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)  # [1, kvh, L, D]
                qg = _grouped(q, att.kv_heads) * scale  # [1, kvh, rep, D]
                s_cache = qg @ kc.transpose(-1, -2) + visible  # [1, kvh, rep, L]
                s_self = (qg * k).sum(-1, keepdim=True)  # [1, kvh, rep, 1]
                w = torch.softmax(torch.cat([s_cache, s_self], dim=-1), dim=-1)
                o = w[..., : self.cache_len] @ vc + w[..., self.cache_len :] * v
                return att.o_proj(_ungroup(o, att.heads, 1))

            x = _block(layer, x, attn_out)
        return (dec.lm_head(dec.norm(x)), *new)

    def _fused(self, att, h, cos, sin, kc, vc, pos, new: list) -> torch.Tensor:
        """Attention as our DecodeAttention op (export/ops.py): about 30 builtin nodes fewer
        per layer, and the cache is read in place (XNNPACK copies the cache it reads)."""
        from .ops import decode_attention

        hd, g = att.head_dim, att.kv_heads
        out = decode_attention(
            att.qkv_proj(h), cos, sin, kc, vc, pos, att.heads, g, hd,
            self.model.decoder.rope.rot_dim, hd**-0.5,
        )  # fmt: skip
        width = att.heads * hd
        new.append(out[..., width : width + g * hd].reshape(1, 1, g, hd))
        new.append(out[..., width + g * hd :].reshape(1, 1, g, hd))
        return att.o_proj(out[..., :width])


def sample_inputs(
    model: VLM, prefill_len: int, cache_len: int, last_only: bool = False
) -> dict[str, tuple]:
    """Example inputs per signature (shapes and dtypes are what the .tflite will take)."""
    c = model.cfg
    v, d = c.vision, c.decoder
    ids = torch.full((1, prefill_len), c.pad_token_id, dtype=torch.int32)
    ids[0, 1 : 1 + c.image_tokens] = c.image_token_id
    kv_shape = (1, cache_len, d.kv_heads, d.head_dim)  # position-major (module docstring)
    return {
        "encode_image": (torch.zeros(1, 3, v.image_size, v.image_size),),
        "prefill": (ids, torch.zeros(1, c.image_tokens, d.hidden))
        + ((torch.zeros(1, dtype=torch.int32),) if last_only else ()),
        "decode": (
            torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
            # distinct tensors: torch.export merges inputs that are one object
            *(torch.zeros(kv_shape) for _ in range(2 * d.layers)),
        ),
    }
