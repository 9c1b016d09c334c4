"""Our LiteRT custom operators as PyTorch ops, and their lowering to ``tfl.custom``.

Each op exists three times: an eager PyTorch body (dequantize + matmul, what the model computes),
a fake (shape only, for torch.export) and a litert-torch lowering that emits a ``tfl.custom`` node
with our custom code and a 32-byte options record that the C++ kernels parse (kernels/litert_*).

Packed weights travel as int8: the converter rejects uint8 constants ("integer return type must
be signless"), and the bits are the same.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..quant.pack import FORMATS, unpack

# format name -> (options id, custom code of the matmul op)
OP_FORMATS = {
    "2bit": (0, "TernaryMatMul"),
    "1.6bit": (1, "TernaryMatMul158"),
    "1bit": (2, "BinaryMatMul"),
    "int8": (3, "Int8MatMul"),
    "int4": (4, "Int4MatMul"),
    "2bit-lut": (5, "TernaryMatMul"),  # tile-interleaved for the lookup-table kernel
}
UNPACK_CODE = "TernaryUnpack"
EMBEDDING_CODE = "PackedEmbedding"
_FMT_BY_ID = {v[0]: k for k, v in OP_FORMATS.items()}


@dataclass(frozen=True)
class OpOptions:
    """The custom options record: magic, version, format, flags, k, clip (little-endian).

    flags: bit 0 has_bias, bit 1 int8 activations (kernels/tvk.h TVK_ACT_INT8), bit 2 int7
    activations (TVK_ACT_INT7; 2bit-lut needs them).
    """

    fmt: str
    k: int
    has_bias: bool = False
    clip: float = 0.0  # <= 0: none
    act_int8: bool = False
    act_int7: bool = False

    def to_bytes(self) -> bytes:
        fid = OP_FORMATS[self.fmt][0]
        flags = int(self.has_bias) | (int(self.act_int8) << 1) | (int(self.act_int7) << 2)
        return struct.pack("<4siiiqfi", b"TVK1", 1, fid, flags, self.k, self.clip, 0)

    @classmethod
    def from_bytes(cls, b: bytes) -> OpOptions:
        magic, version, fid, flags, k, clip, _ = struct.unpack("<4siiiqfi", b)
        if magic != b"TVK1" or version != 1 or fid not in _FMT_BY_ID:
            raise ValueError("not a ternvlm custom-op options record")
        return cls(_FMT_BY_ID[fid], k, bool(flags & 1), clip, bool(flags & 2), bool(flags & 4))


def _codes(w: torch.Tensor, fmt: str, k: int, n: int) -> torch.Tensor:
    """Codes [n, k] (2bit-lut arrays hold whole tiles of rows: the first n are W's)."""
    return torch.from_numpy(unpack(w.detach().cpu().numpy().view(np.uint8), k, fmt)[:n])


def _dequant(w: torch.Tensor, scale: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    q = _codes(w, fmt, k, scale.shape[0]).float()
    return q * scale.repeat_interleave(k // scale.shape[1], dim=1)


def int8_act_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, qmax: int = 127
) -> torch.Tensor:
    """x [..., K] @ (codes * scale)^T with x quantized per row to int8 (qmax 127) or int7 (63),
    as kernels/tvk.h does.

    Same float32 operations in the same order as the C kernels (exact integer dots, groups
    summed in order), so an exported file reproduces this to the bit.
    """
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    amax = xf.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(float(qmax)) / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv).clamp(-127, 127)
    n, cols = scale.shape
    g = k // cols
    dots = torch.einsum(
        "mcg,ncg->cmn", xq.double().view(-1, cols, g), codes.double().view(n, cols, g)
    ).float()
    total = torch.zeros(xf.shape[0], n)
    for c in range(cols):
        total = total + scale[:, c] * dots[c]
    y = total * (amax / float(qmax))
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("ternvlm::packed_matmul", mutates_args=())
def packed_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    fmt_id: int,
    k: int,
    has_bias: bool,
    clip: float,
    act_int8: bool = False,
    act_int7: bool = False,
) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias) (clamped): our packed matmul (activations int8, int7 or
    f32)."""
    fmt = _FMT_BY_ID[fmt_id]
    if act_int8 or act_int7:
        codes = _codes(w, fmt, k, scale.shape[0])
        y = int8_act_linear(x, codes, scale, 63 if act_int7 else 127)
    else:
        y = torch.nn.functional.linear(x, _dequant(w, scale, fmt, k))
    if has_bias:
        y = y + bias
    return y.clamp(-clip, clip) if clip > 0 else y


@packed_matmul.register_fake
def _packed_matmul_fake(
    x, w, scale, bias, fmt_id, k, has_bias, clip, act_int8=False, act_int7=False
):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


@torch.library.custom_op("ternvlm::packed_embedding", mutates_args=())
def packed_embedding(
    ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, fmt_id: int, k: int
) -> torch.Tensor:
    """Rows ``ids`` of dequant(w): an embedding table kept packed (int8 / int4 / ternary)."""
    rows = w.index_select(0, ids.reshape(-1).long())
    s = scale.index_select(0, ids.reshape(-1).long())
    return _dequant(rows, s, _FMT_BY_ID[fmt_id], k).reshape(*ids.shape, k)


@packed_embedding.register_fake
def _packed_embedding_fake(ids, w, scale, fmt_id, k):
    return scale.new_empty((*ids.shape, k))


@torch.library.custom_op("ternvlm::packed_unpack", mutates_args=())
def packed_unpack(w: torch.Tensor, scale: torch.Tensor, fmt_id: int, k: int) -> torch.Tensor:
    """Dequantized float32 weights [N, k] (feeds a builtin FULLY_CONNECTED)."""
    return _dequant(w, scale, _FMT_BY_ID[fmt_id], k)


@packed_unpack.register_fake
def _packed_unpack_fake(w, scale, fmt_id, k):
    return scale.new_empty((w.shape[0], k))


ATTENTION_CODE = "DecodeAttention"


def attention_options(heads: int, kv_heads: int, head_dim: int, rot_dim: int, scale: float):
    """DecodeAttention's 32-byte options record (kernels/litert_ops.h)."""
    return struct.pack("<4siiiiifi", b"TVA1", 1, heads, kv_heads, head_dim, rot_dim, scale, 0)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    r, half = x[..., :rot], rot // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    return torch.cat([r * cos + rotated * sin, x[..., rot:]], dim=-1)


@torch.library.custom_op("ternvlm::decode_attention", mutates_args=())
def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rot_dim: int,
    scale: float,
) -> torch.Tensor:
    """One token at position ``pos`` attending to cache slots < pos (caches [1, L, kvh, D],
    position-major) and to itself, rotary
    embedding applied to q and k: [o | rotary(k) | v] (kernels/attention.cc; models/decoder.py
    Attention with a KV cache computes the same)."""
    d, g, p = head_dim, kv_heads, int(pos.reshape(-1)[0])
    q, k, v = qkv.reshape(-1).float().split([heads * d, g * d, g * d])
    c, s = cos.reshape(-1), sin.reshape(-1)
    qr = _rotary(q.view(heads, d), c, s, rot_dim)
    kr = _rotary(k.view(g, d), c, s, rot_dim)
    v = v.view(g, d)
    keys = torch.cat([k_cache[0, :p].transpose(0, 1), kr[:, None]], dim=1)  # [g, p + 1, d]
    values = torch.cat([v_cache[0, :p].transpose(0, 1), v[:, None]], dim=1)
    w = torch.softmax(qr.view(g, heads // g, d) @ keys.transpose(-1, -2) * scale, dim=-1)
    o = (w @ values).reshape(-1)
    return torch.cat([o, kr.reshape(-1), v.reshape(-1)]).reshape(qkv.shape)


@decode_attention.register_fake
def _decode_attention_fake(qkv, cos, sin, k_cache, v_cache, pos, heads, kv_heads, hd, rd, sc):
    return qkv.new_empty(qkv.shape)


def _register_lowerings() -> None:
    """Teach litert-torch to emit tfl.custom for our ops (imported only when exporting)."""
    from litert_converter.mlir import ir
    from litert_torch.backend import lowerings
    from litert_torch.backend.lowerings import utils as lowering_utils

    def custom(lctx, operands, code: str, options: bytes):
        op = ir.Operation.create(
            "tfl.custom",
            results=lowering_utils.node_meta_to_ir_types(lctx.node),
            operands=operands,
            attributes={
                "custom_code": ir.StringAttr.get(code),
                "custom_option": ir.Attribute.parse(f'#tfl<const_bytes: "0x{options.hex()}">'),
            },
        )
        return op.results[0]

    @lowerings.lower(torch.ops.ternvlm.packed_matmul)
    def _lower_matmul(
        lctx, x, w, scale, bias, fmt_id, k, has_bias, clip, act_int8=False, act_int7=False
    ):
        fmt = _FMT_BY_ID[fmt_id]
        opts = OpOptions(fmt, k, has_bias, clip, act_int8, act_int7).to_bytes()
        return custom(lctx, [x, w, scale, bias], OP_FORMATS[fmt][1], opts)

    @lowerings.lower(torch.ops.ternvlm.packed_embedding)
    def _lower_embedding(lctx, ids, w, scale, fmt_id, k):
        opts = OpOptions(_FMT_BY_ID[fmt_id], k).to_bytes()
        return custom(lctx, [ids, w, scale], EMBEDDING_CODE, opts)

    @lowerings.lower(torch.ops.ternvlm.decode_attention)
    def _lower_attention(lctx, qkv, cos, sin, kc, vc, pos, heads, kv_heads, hd, rd, scale):
        opts = attention_options(heads, kv_heads, hd, rd, scale)
        return custom(lctx, [qkv, cos, sin, kc, vc, pos], ATTENTION_CODE, opts)

    @lowerings.lower(torch.ops.ternvlm.packed_unpack)
    def _lower_unpack(lctx, w, scale, fmt_id, k):
        opts = OpOptions(_FMT_BY_ID[fmt_id], k).to_bytes()
        return custom(lctx, [w, scale], UNPACK_CODE, opts)


_registered = False


def register_lowerings() -> None:
    global _registered
    if not _registered:
        _register_lowerings()
        _registered = True


def fmt_id(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown pack format {fmt!r}")
    return OP_FORMATS[fmt][0]
