"""Packing formats for ternary and binary codes, rows padded independently (ggml-style docs).

- ``2bit``: 4 codes per byte along K; code q in {-1,0,1} stored as q+1 in bits 2i..2i+1 of byte
  k//4 (i = k % 4). Row length ceil(K/4) bytes. Padding codes are 0.
- ``1.6bit``: 5 trits per byte: byte = sum_i (q_i + 1) * 3^i over k = 5j..5j+4 (max 242).
  Row length ceil(K/5) bytes: 1.6 bits per weight, 20% denser than 2-bit.
- ``1bit``: 8 codes per byte, bit i of byte k//8 is 1 for +1 and 0 for -1. Row length ceil(K/8).
- ``int8``: one signed byte per code in [-127, 127] (embedding / LM head). Row length K.
- ``int4``: 2 codes per byte, q in [-8, 7] stored as q+8 in bits 4i..4i+3 of byte k//2.
  Row length ceil(K/2) (embedding / LM head).
"""

from __future__ import annotations

import numpy as np

from ..errors import TernvlmError

FORMATS = {"2bit": 4, "1.6bit": 5, "1bit": 8, "int8": 1, "int4": 2}  # codes per byte
CODE_RANGE = {
    "2bit": (-1, 1),
    "1.6bit": (-1, 1),
    "1bit": (-1, 1),
    "int8": (-127, 127),
    "int4": (-8, 7),
}
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)


def packed_row_bytes(k: int, fmt: str) -> int:
    return -(-k // FORMATS[fmt])


def _padded(codes: np.ndarray, per: int, fill: int) -> np.ndarray:
    n, k = codes.shape
    kp = -(-k // per) * per
    out = np.full((n, kp), fill, dtype=np.int32)
    out[:, :k] = codes
    return out.reshape(n, kp // per, per)


def pack(codes: np.ndarray, fmt: str) -> np.ndarray:
    """int codes [N, K] -> uint8 [N, packed_row_bytes(K)]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise TernvlmError(f"pack expects [N, K] codes, got shape {codes.shape}")
    if fmt not in FORMATS:
        raise TernvlmError(f"unknown pack format {fmt!r}; expected one of {', '.join(FORMATS)}")
    lo, hi = CODE_RANGE[fmt]
    if codes.size and (
        codes.min() < lo or codes.max() > hi or (fmt == "1bit" and (codes == 0).any())
    ):
        raise TernvlmError(f"codes out of range [{lo}, {hi}] for {fmt}")
    if fmt == "int8":
        return codes.astype(np.int8).view(np.uint8).copy()
    if fmt == "int4":
        g = _padded(codes + 8, 2, 8)
        return (g << (4 * np.arange(2))).sum(-1).astype(np.uint8)
    if fmt == "2bit":
        g = _padded(codes + 1, 4, 1)
        return (g << (2 * np.arange(4))).sum(-1).astype(np.uint8)
    if fmt == "1.6bit":
        g = _padded(codes + 1, 5, 1)
        return (g * _POW3).sum(-1).astype(np.uint8)
    g = _padded((codes > 0).astype(np.int32), 8, 0)
    return (g << np.arange(8)).sum(-1).astype(np.uint8)


def unpack(packed: np.ndarray, k: int, fmt: str) -> np.ndarray:
    """uint8 [N, bytes] -> int8 codes [N, K]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if fmt not in FORMATS:
        raise TernvlmError(f"unknown pack format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if packed.ndim != 2 or packed.shape[1] != packed_row_bytes(k, fmt):
        raise TernvlmError(f"packed shape {packed.shape} does not hold K={k} codes in {fmt}")
    if fmt == "int8":
        return packed.view(np.int8).copy()
    p = packed.astype(np.int32)[..., None]
    if fmt == "int4":
        q = ((p >> (4 * np.arange(2))) & 15) - 8
    elif fmt == "2bit":
        q = ((p >> (2 * np.arange(4))) & 3) - 1
    elif fmt == "1.6bit":
        q = (p // _POW3) % 3 - 1
    else:
        q = ((p >> np.arange(8)) & 1) * 2 - 1
    return q.reshape(packed.shape[0], -1)[:, :k].astype(np.int8)
