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
}
UNPACK_CODE = "TernaryUnpack"
_FMT_BY_ID = {v[0]: k for k, v in OP_FORMATS.items()}


@dataclass(frozen=True)
class OpOptions:
    """The custom options record: magic, version, format, flags, k, clip (little-endian)."""

    fmt: str
    k: int
    has_bias: bool = False
    clip: float = 0.0  # <= 0: none

    def to_bytes(self) -> bytes:
        fid = OP_FORMATS[self.fmt][0]
        return struct.pack("<4siiiqfi", b"TVK1", 1, fid, int(self.has_bias), self.k, self.clip, 0)

    @classmethod
    def from_bytes(cls, b: bytes) -> OpOptions:
        magic, version, fid, flags, k, clip, _ = struct.unpack("<4siiiqfi", b)
        if magic != b"TVK1" or version != 1 or fid not in _FMT_BY_ID:
            raise ValueError("not a ternvlm custom-op options record")
        return cls(_FMT_BY_ID[fid], k, bool(flags & 1), clip)


def _dequant(w: torch.Tensor, scale: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    codes = unpack(w.detach().cpu().numpy().view(np.uint8), k, fmt)
    q = torch.from_numpy(codes.astype(np.float32))
    return q * scale.repeat_interleave(k // scale.shape[1], dim=1)


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
) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias) (clamped): our ternary/binary matmul."""
    y = torch.nn.functional.linear(x, _dequant(w, scale, _FMT_BY_ID[fmt_id], k))
    if has_bias:
        y = y + bias
    return y.clamp(-clip, clip) if clip > 0 else y


@packed_matmul.register_fake
def _packed_matmul_fake(x, w, scale, bias, fmt_id, k, has_bias, clip):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("ternvlm::packed_unpack", mutates_args=())
def packed_unpack(w: torch.Tensor, scale: torch.Tensor, fmt_id: int, k: int) -> torch.Tensor:
    """Dequantized float32 weights [N, k] (feeds a builtin FULLY_CONNECTED)."""
    return _dequant(w, scale, _FMT_BY_ID[fmt_id], k)


@packed_unpack.register_fake
def _packed_unpack_fake(w, scale, fmt_id, k):
    return scale.new_empty((w.shape[0], k))


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
    def _lower_matmul(lctx, x, w, scale, bias, fmt_id, k, has_bias, clip):
        fmt = _FMT_BY_ID[fmt_id]
        opts = OpOptions(fmt, k, has_bias, clip).to_bytes()
        return custom(lctx, [x, w, scale, bias], OP_FORMATS[fmt][1], opts)

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
