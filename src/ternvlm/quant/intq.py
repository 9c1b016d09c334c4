"""Symmetric int8 / int4 codes for the embedding table and LM head (kept out of ternarization).

At edge sizes the vocab x hidden table is a quarter of the parameters, so it is stored and
multiplied packed like the ternary layers (kernels/tvk.h formats ``int8`` and ``int4``):

- ``int8``: one scale per row, codes round(w / s) in [-127, 127] with s = max|w| / 127;
- ``int4``: one scale per group of 64 columns (32 or per row when K is not a multiple),
  codes in [-7, 7] with s = max|w| / 7; 4.5 bits per weight like llama.cpp's Q4_0.
"""

from __future__ import annotations

import torch

from ..errors import TernvlmError

INT_FORMATS = {"int8": 127, "int4": 7}  # format -> largest code


def group_size(k: int, fmt: str) -> int:
    """Columns per scale: the whole row for int8; 64, 32 or the whole row for int4."""
    if fmt == "int8":
        return k
    for g in (64, 32):
        if k % g == 0:
            return g
    return k


def quantize_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 codes [N, K], float32 scale [N, K / group])."""
    if fmt not in INT_FORMATS:
        raise TernvlmError(f"unknown integer format {fmt!r}; expected one of {list(INT_FORMATS)}")
    if w.ndim != 2:
        raise TernvlmError(f"quantize_rows expects a [N, K] matrix, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise TernvlmError("cannot quantize weights with inf or NaN")
    n, k = w.shape
    g = group_size(k, fmt)
    qmax = INT_FORMATS[fmt]
    groups = w.reshape(n, k // g, g)
    scale = groups.abs().amax(-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(groups / safe[..., None]).clamp(-qmax, qmax).to(torch.int8)
    return codes.reshape(n, k), scale.contiguous()
