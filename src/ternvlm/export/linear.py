"""Export-time replacements for QuantLinear: one per ``--ops`` variant.

- ``custom``: our TernaryMatMul / TernaryMatMul158 / BinaryMatMul op on packed weights;
- ``unpack``: our TernaryUnpack op, then the builtin FULLY_CONNECTED on the float weights;
- ``builtin``: 2-bit bytes decoded by builtin arithmetic (floor-div / floor-mod) then
  FULLY_CONNECTED, so the file runs on a stock LiteRT (the seed's q2-tf);
- ``float``: the dequantized weights as an ordinary Linear (fp32 / int8 baselines).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TernvlmError
from ..quant.api import quant_layers
from ..quant.linear import QuantLinear, expand
from ..quant.pack import pack
from . import ops

# --ops name -> (linear mode, pack format or None)
VARIANTS = {
    "ternary": ("custom", "2bit"),
    "ternary158": ("custom", "1.6bit"),
    "binary": ("custom", "1bit"),
    "unpack": ("unpack", "2bit"),
    "ternary-builtin": ("builtin", "2bit"),
    "fp32": ("float", None),
    "int8": ("float", None),
}


class PackedLinear(nn.Module):
    """y = x (codes * scale)^T (+ bias) (clamped), codes packed in ``fmt``."""

    def __init__(self, q: QuantLinear, mode: str, fmt: str) -> None:
        super().__init__()
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
                x, self.w, self.scale, self.bias, fid, self.k, self.has_bias, self.clip
            )
        if self.mode == "unpack":
            w = ops.packed_unpack(self.w, self.scale, ops.fmt_id(self.fmt), self.k)
        else:
            w = self._builtin_weight(x)
        y = F.linear(x, w, self.bias if self.has_bias else None)
        return y.clamp(-self.clip, self.clip) if self.clip > 0 else y


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


def export_copy(model: nn.Module, variant: str) -> nn.Module:
    """A deep copy of ``model`` with every QuantLinear replaced for ``variant``."""
    if variant not in VARIANTS:
        raise TernvlmError(f"unknown --ops {variant!r}; choose from {', '.join(VARIANTS)}")
    mode, fmt = VARIANTS[variant]
    layers = quant_layers(model)
    if mode != "float" and not layers:
        raise TernvlmError(
            f"--ops {variant} needs a ternary or binary model (ternarize it first); "
            "use --ops fp32 or int8 for a float model"
        )
    m = copy.deepcopy(model).eval()
    for name, q in quant_layers(m).items():
        new = FloatLinear(q) if mode == "float" else PackedLinear(q, mode, fmt)
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, new)
    for p in m.parameters():
        p.requires_grad_(False)
    return m
