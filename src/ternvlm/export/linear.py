"""Export-time replacements for QuantLinear: one per ``--ops`` variant.

- ``custom``: our TernaryMatMul / TernaryMatMul158 / BinaryMatMul op on packed weights;
- ``unpack``: our TernaryUnpack op, then the builtin FULLY_CONNECTED on the float weights;
- ``builtin``: 2-bit bytes decoded by builtin arithmetic (floor-div / floor-mod) then
  FULLY_CONNECTED, so the file runs on a stock LiteRT (the seed's q2-tf);
- ``float``: the dequantized weights as an ordinary Linear (fp32 / int8 baselines).

Packed layers take float activations or quantize them per row to int8 first (``act``), and the
token embedding / LM head can be stored packed in int8 or int4 (``head``) in every variant.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TernvlmError
from ..quant.api import quant_layers
from ..quant.intq import quantize_rows
from ..quant.linear import QuantLinear, expand
from ..quant.pack import pack, unpack
from . import ops

# --ops name -> (linear mode, pack format or None)
VARIANTS = {
    "ternary": ("custom", "2bit"),
    "ternary158": ("custom", "1.6bit"),
    "ternary-lut": ("custom", "2bit-lut"),
    "binary": ("custom", "1bit"),
    "unpack": ("unpack", "2bit"),
    "ternary-builtin": ("builtin", "2bit"),
    "fp32": ("float", None),
    "int8": ("float", None),
}
ACTS = ("int8", "f32", "int7")
HEADS = ("auto", "fp32", "int8", "int4")
_BITS = {
    "2bit": "ternary 2-bit",
    "1.6bit": "ternary 1.6-bit",
    "1bit": "binary 1-bit",
    "2bit-lut": "ternary 2-bit LUT",
}


def resolve_head(variant: str, head: str) -> str:
    """``auto``: int8 beside our custom ops; fp32 (left to the quantizer for int8) for float
    variants and for ternary-builtin, whose point is to run on a stock LiteRT."""
    if head not in HEADS:
        raise TernvlmError(f"unknown --head {head!r}; choose from {', '.join(HEADS)}")
    if head != "auto":
        return head
    return "fp32" if VARIANTS[variant][0] in ("float", "builtin") else "int8"


def resolve_act(variant: str, act: str) -> str:
    """Checks ``act``; every packed format has an int8-activation kernel (1.6-bit too).

    ternary-lut's lookup tables add two activations in a byte, so its layers always quantize
    activations to int7 (``int8`` is taken to mean "integer activations"; ``f32`` is refused).
    """
    if act not in ACTS:
        raise TernvlmError(f"unknown --act {act!r}; choose from {', '.join(ACTS)}")
    if VARIANTS[variant][1] == "2bit-lut":
        if act == "f32":
            raise TernvlmError("--ops ternary-lut takes integer activations (int7), not --act f32")
        return "int7"
    return act


class PackedLinear(nn.Module):
    """y = x (codes * scale)^T (+ bias) (clamped), codes packed in ``fmt``."""

    def __init__(self, q: QuantLinear, mode: str, fmt: str, act: str = "f32") -> None:
        super().__init__()
        self.act_int8 = act == "int8" and mode == "custom"
        self.act_int7 = act == "int7" and mode == "custom"
        codes = q.codes()
        scale = q.effective_scale(codes.float()).detach().float()
        n, k = codes.shape
        if scale.shape[0] == 1:  # per-tensor: the kernels take per-row (or per-group) scales
            scale = scale.expand(n, scale.shape[1])
        if fmt == "1bit" and (codes == 0).any():
            raise TernvlmError("--ops binary needs a binary model (its weights have zeros)")
        self.mode, self.fmt, self.k, self.n = mode, fmt, k, n
        packed = pack(codes.numpy(), fmt).view(np.int8)
        self.register_buffer("w", torch.from_numpy(packed.copy()))
        self.register_buffer("scale", scale.contiguous().clone())
        self.has_bias = q.bias is not None
        bias = q.bias.detach().float() if self.has_bias else torch.zeros(n)
        self.register_buffer("bias", bias.clone())
        self.clip = float(q.cfg.output_clip or 0.0)
        if mode == "builtin":
            if fmt != "2bit":
                raise TernvlmError("the builtin unpack variant supports 2-bit weights only")
            self.register_buffer("powers", 4.0 ** torch.arange(4.0), persistent=False)
            self.register_buffer("rows", torch.arange(n, dtype=torch.int32), persistent=False)

    def _builtin_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Decode 2-bit bytes with float arithmetic only: digit i = floor(b / 4^i) mod 4 - 1.

        The rows are gathered with indices that depend on the input (``+ 0 * x``): otherwise the
        converter folds the whole decode into fp32 constants and the file is fp32-sized.
        """
        zero = (x.reshape(-1)[:1] * 0.0).to(torch.int32)
        b = torch.index_select(self.w, 0, self.rows + zero).float()
        b = torch.where(b < 0, b + 256.0, b)  # int8 bits -> unsigned byte value
        digits = torch.remainder(torch.floor(b[..., None] / self.powers), 4.0) - 1.0
        q = digits.reshape(self.n, -1)[:, : self.k]
        return q * expand(self.scale, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "custom":
            fid = ops.fmt_id(self.fmt)
            return ops.packed_matmul(
                x,
                self.w,
                self.scale,
                self.bias,
                fid,
                self.k,
                self.has_bias,
                self.clip,
                self.act_int8,
                self.act_int7,
            )
        if self.mode == "unpack":
            w = ops.packed_unpack(self.w, self.scale, ops.fmt_id(self.fmt), self.k)
        else:
            w = self._builtin_weight(x)
        y = F.linear(x, w, self.bias if self.has_bias else None)
        return y.clamp(-self.clip, self.clip) if self.clip > 0 else y


def concat_linears(mods: list[PackedLinear]) -> PackedLinear:
    """One PackedLinear computing ``mods`` side by side (outputs concatenated along N).

    Rows are independent, so each output equals its own layer's to the bit; the fused layer
    streams one bigger matrix and quantizes its input once instead of once per layer.
    """
    first = mods[0]
    keys = {
        (m.mode, m.fmt, m.k, m.has_bias, m.clip, m.act_int8, m.act_int7, m.scale.shape[1])
        for m in mods
    }
    if len(keys) != 1:
        raise TernvlmError("internal error: fused layers differ in format, input size or options")
    f = copy.deepcopy(first)
    if first.fmt == "2bit-lut":  # rows interleave in tiles: pack the joined codes again
        codes = np.concatenate(
            [unpack(m.w.numpy().view(np.uint8), m.k, m.fmt)[: m.n] for m in mods]
        )
        f.w = torch.from_numpy(pack(codes, first.fmt).view(np.int8).copy())
    else:
        f.w = torch.cat([m.w for m in mods])
    f.scale = torch.cat([m.scale for m in mods])
    f.bias = torch.cat([m.bias for m in mods])
    f.n = sum(m.n for m in mods)
    return f


class FusedMLP(nn.Module):
    """SwiGLU with gate and up projections as one packed matmul: down(silu(g) * u)."""

    def __init__(self, gate: PackedLinear, up: PackedLinear, down: PackedLinear) -> None:
        super().__init__()
        self.hidden = gate.n
        self.gate_up = concat_linears([gate, up])
        self.down_proj = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down_proj(F.silu(g) * u)


def _fuse_projections(m: nn.Module) -> None:
    """q/k/v and gate/up of every decoder block as single matmuls (custom ops only).

    The export graphs use ``self_attn.qkv_proj`` when it exists (graphs._qkv); q_proj, k_proj
    and v_proj stay for the eager model, which computes the same numbers.
    """
    for layer in m.decoder.layers:
        att, mlp = layer.self_attn, layer.mlp
        qkv = [att.q_proj, att.k_proj, att.v_proj]
        if all(isinstance(p, PackedLinear) and p.mode == "custom" for p in qkv):
            att.qkv_proj = concat_linears(qkv)
        if mlp.kind == "swiglu":
            parts = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if all(isinstance(p, PackedLinear) and p.mode == "custom" for p in parts):
                layer.mlp = FusedMLP(*parts)


class FloatLinear(nn.Module):
    """The dequantized QuantLinear as a plain (constant-weight) Linear, output clip kept."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        with torch.no_grad():
            self.lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            self.lin.weight.copy_(q.weight_q())
            if q.bias is not None:
                self.lin.bias.copy_(q.bias)
        self.clip = float(q.cfg.output_clip or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y.clamp(-self.clip, self.clip) if self.clip > 0 else y


class PackedTable(nn.Module):
    """A vocab x hidden table in int8 / int4: looked up as the embedding, multiplied as the head.

    A tied model registers the same two buffers in both places, so the file stores them once.
    """

    def __init__(
        self,
        w: torch.Tensor,
        scale: torch.Tensor,
        fmt: str,
        k: int,
        role: str,
        bias: torch.Tensor | None = None,
        act_int8: bool = False,
    ) -> None:
        super().__init__()
        self.fmt, self.k, self.role, self.act_int8 = fmt, k, role, act_int8
        self.register_buffer("w", w)
        self.register_buffer("scale", scale)
        self.has_bias = bias is not None
        self.register_buffer("bias", bias if bias is not None else torch.zeros(w.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fid = ops.fmt_id(self.fmt)
        if self.role == "embedding":
            return ops.packed_embedding(x.to(torch.int32), self.w, self.scale, fid, self.k)
        return ops.packed_matmul(
            x, self.w, self.scale, self.bias, fid, self.k, self.has_bias, 0.0, self.act_int8
        )


def _pack_table(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = quantize_rows(weight, fmt)
    packed = pack(codes.numpy(), fmt).view(np.int8)
    return torch.from_numpy(packed.copy()), scale


def _replace_head(m: nn.Module, fmt: str, act_int8: bool) -> None:
    """Token embedding and LM head of ``m.decoder`` as PackedTable modules."""
    dec = m.decoder
    emb, head = dec.embed_tokens, dec.lm_head
    k = emb.weight.shape[1]
    w, scale = _pack_table(emb.weight, fmt)
    new_emb = PackedTable(w, scale, fmt, k, "embedding")
    if head.weight is not emb.weight:
        w, scale = _pack_table(head.weight, fmt)
    bias = head.bias.detach().float().clone() if head.bias is not None else None
    new_head = PackedTable(w, scale, fmt, k, "head", bias, act_int8)
    dec.embed_tokens, dec.lm_head = new_emb, new_head


def _head_act_int8(act: str) -> bool:
    """The int8 / int4 head takes int8 activations whenever the layers take integer ones."""
    return act in ("int8", "int7")


def describe_parts(model: nn.Module, variant: str, act: str = "int8", head: str = "auto") -> dict:
    """Precision of each part of the file: vision, connector, layers (decoder blocks),
    embedding and head, e.g. {"layers": "ternary 2-bit, int8 act", "head": "int8 (tied)"}."""
    mode, fmt = VARIANTS[variant]
    head, layer_act = resolve_head(variant, head), resolve_act(variant, act)
    quantized = {name.split(".", 1)[0] for name in quant_layers(model)}
    if mode == "float":
        layer = "int8 dynamic-range" if variant == "int8" else "fp32"
    else:
        layer = _BITS[fmt] + {"custom": "", "unpack": " (unpack)", "builtin": " (builtin)"}[mode]
        if mode == "custom":
            layer += f", {layer_act} act"
    names = {"vision": "vision", "connector": "connector", "decoder": "layers"}
    parts = {k: (layer if p in quantized else "fp32") for p, k in names.items()}
    if variant == "int8":
        parts = dict.fromkeys(parts, "int8 dynamic-range")
    tied = model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    if head == "fp32":
        parts["embedding"] = "fp32"
        lm = "int8 dynamic-range" if variant == "int8" else "fp32"
    else:
        parts["embedding"] = head
        lm = head + (", int8 act" if _head_act_int8(act) else ", f32 act")
    parts["head"] = lm + (" (tied)" if tied else "")
    return parts


def export_copy(model: nn.Module, variant: str, act: str = "int8", head: str = "auto") -> nn.Module:
    """A deep copy of ``model`` with every QuantLinear replaced for ``variant``.

    ``act``: activations of the packed matmuls ("int8": quantized per row, "f32"); ``head``:
    storage of the token embedding and LM head ("fp32", "int8", "int4"; "auto": see
    resolve_head).
    """
    if variant not in VARIANTS:
        raise TernvlmError(f"unknown --ops {variant!r}; choose from {', '.join(VARIANTS)}")
    head, layer_act = resolve_head(variant, head), resolve_act(variant, act)
    mode, fmt = VARIANTS[variant]
    layers = quant_layers(model)
    if mode != "float" and not layers:
        raise TernvlmError(
            f"--ops {variant} needs a ternary or binary model (ternarize it first); "
            "use --ops fp32 or int8 for a float model"
        )
    m = copy.deepcopy(model).eval()
    for name, q in quant_layers(m).items():
        new = FloatLinear(q) if mode == "float" else PackedLinear(q, mode, fmt, layer_act)
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, new)
    if mode == "custom":
        _fuse_projections(m)
    if head != "fp32":
        _replace_head(m, head, _head_act_int8(act))
    for p in m.parameters():
        p.requires_grad_(False)
    return m
