"""Packing formats for ternary and binary codes, rows padded independently (ggml-style docs).

- ``2bit``: 4 codes per byte along K; code q in {-1,0,1} stored as q+1 in bits 2i..2i+1 of byte
  k//4 (i = k % 4). Row length ceil(K/4) bytes. Padding codes are 0.
- ``1.6bit``: 5 trits per byte: byte = sum_i (q_i + 1) * 3^i over k = 5j..5j+4 (max 242).
  Row length ceil(K/5) bytes: 1.6 bits per weight, 20% denser than 2-bit.
- ``1bit``: 8 codes per byte, bit i of byte k//8 is 1 for +1 and 0 for -1. Row length ceil(K/8).
- ``int8``: one signed byte per code in [-127, 127] (embedding / LM head). Row length K.
- ``int4``: 2 codes per byte, q in [-8, 7] stored as q+8 in bits 4i..4i+3 of byte k//2.
  Row length ceil(K/2) (embedding / LM head).
- ``2bit-lut``: ternary at 2 bits, for the lookup-table kernel (kernels/lut_avx2.cc). Codes pair
  up along K: (q_k + 1) + 3 (q_{k+1} + 1), k even, is a nibble; byte j of a row holds pairs 4j (low
  nibble) and 4j+2 (high). Rows are interleaved in tiles of 32 (byte j of row n at
  ((n // 32) * ceil(K/4) + j) * 32 + n % 32), so the array is a [ceil(N/32) * 32, ceil(K/4)]
  buffer whose rows are not rows of W; padding rows and codes are 0.
"""

from __future__ import annotations

import numpy as np

from ..errors import TernvlmError

FORMATS = {"2bit": 4, "1.6bit": 5, "1bit": 8, "int8": 1, "int4": 2, "2bit-lut": 4}  # codes/byte
LUT_TILE = 32  # rows per interleaved tile of 2bit-lut
CODE_RANGE = {
    "2bit": (-1, 1),
    "1.6bit": (-1, 1),
    "1bit": (-1, 1),
    "int8": (-127, 127),
    "int4": (-8, 7),
    "2bit-lut": (-1, 1),
}
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)


def packed_row_bytes(k: int, fmt: str) -> int:
    return -(-k // FORMATS[fmt])


def packed_rows(n: int, fmt: str) -> int:
    """Rows of the packed array for N rows of W (whole tiles for 2bit-lut)."""
    return -(-n // LUT_TILE) * LUT_TILE if fmt == "2bit-lut" else n


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
    if fmt == "2bit-lut":
        return _pack_lut(codes)
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
    if fmt == "2bit-lut":
        return _unpack_lut(packed, k)
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


def _pack_lut(codes: np.ndarray) -> np.ndarray:
    n, k = codes.shape
    rows = packed_rows(n, "2bit-lut")
    full = np.zeros((rows, k), dtype=np.int32)
    full[:n] = codes
    g = _padded(full + 1, 4, 1)  # [rows, bytes, 4]
    nib = g[..., 0::2] + 3 * g[..., 1::2]  # pair indices [rows, bytes, 2]
    b = (nib[..., 0] | (nib[..., 1] << 4)).astype(np.uint8)
    tiles = b.reshape(rows // LUT_TILE, LUT_TILE, -1).transpose(0, 2, 1)
    return np.ascontiguousarray(tiles).reshape(rows, -1)


def _unpack_lut(packed: np.ndarray, k: int) -> np.ndarray:
    rows, rb = packed.shape
    if rows % LUT_TILE:
        raise TernvlmError(f"2bit-lut arrays hold whole tiles of {LUT_TILE} rows, got {rows}")
    b = packed.reshape(rows // LUT_TILE, rb, LUT_TILE).transpose(0, 2, 1).reshape(rows, rb)
    nib = (b.astype(np.int32)[..., None] >> np.array([0, 4])) & 15  # [rows, bytes, 2]
    valid = nib <= 8
    qa = np.where(valid, nib % 3 - 1, 0)
    qb = np.where(valid, nib // 3 - 1, 0)
    q = np.stack([qa[..., 0], qb[..., 0], qa[..., 1], qb[..., 1]], axis=-1)
    return q.reshape(rows, -1)[:, :k].astype(np.int8)
