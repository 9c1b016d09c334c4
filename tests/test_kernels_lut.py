"""2bit-lut (tile-interleaved ternary for the lookup-table kernel) and int7 activations."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternvlm.errors import TernvlmError
from ternvlm.quant.pack import LUT_TILE, pack, packed_row_bytes, unpack
from ternvlm.runtime import kernels

from .test_kernels import PATHS, int8_act_reference, random_codes

LUT = "2bit-lut"


@pytest.fixture(autouse=True)
def _auto_path():
    yield
    kernels.force_path("auto")


def lut_matmul(x, packed, k, scale, **kw):
    return kernels.matmul(x, packed, k, scale, fmt=LUT, act="int7", **kw)


def test_lut_pack_layout_and_round_trip():
    codes = np.zeros((33, 6), np.int64)
    codes[0, :4] = [-1, 1, 0, 1]  # pairs (0, 2) -> 0 + 3 * 2 = 6 and (1, 2) -> 1 + 6 = 7
    codes[32, 4:] = [1, -1]
    p = pack(codes, LUT)
    assert p.shape == (64, 2) and p.dtype == np.uint8  # two tiles of 32 rows, ceil(6 / 4) bytes
    flat = p.reshape(-1)
    assert flat[0] == 6 | (7 << 4)  # row 0, byte 0: first byte of tile 0
    assert flat[32 + 0] == 4 | (4 << 4)  # row 0, byte 1: codes 4-5 zero, 6-7 padding
    assert flat[64 + 32] == (2 + 3 * 0) | (4 << 4)  # row 32, byte 1 (tile 1)
    assert np.array_equal(unpack(p, 6, LUT)[:33], codes)
    assert not unpack(p, 6, LUT)[33:].any()  # padding rows are zero codes
    raw = np.full((32, 1), 0xF9, np.uint8)  # nibbles 9 and 15: both pairs decode as zeros
    assert not unpack(raw, 4, LUT).any()
    lib = kernels._library()
    assert lib.tvk_weight_bytes(5, 33, 6) == 64 * 2
    assert lib.tvk_weight_bytes(0, 33, 6) == 33 * 2
    assert lib.tvk_weight_bytes(5, 0, 6) < 0 and lib.tvk_weight_bytes(9, 1, 1) < 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 41), st.integers(0, 99))
def test_lut_round_trip_and_c_decoder(n, k, seed):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, k, LUT)
    p = pack(codes, LUT)
    assert p.shape == (-(-n // LUT_TILE) * LUT_TILE, packed_row_bytes(k, LUT))
    assert np.array_equal(unpack(p, k, LUT)[:n], codes)
    scale = rng.uniform(0.5, 2, size=n).astype(np.float32)
    w = (codes * scale[:, None]).astype(np.float32)
    for path in PATHS:
        kernels.force_path(path)
        np.testing.assert_array_equal(kernels.unpack(p, k, scale, LUT, threads=2), w)
        ids = np.array([n - 1, 0, n // 2], np.int32)
        np.testing.assert_array_equal(kernels.gather(ids, p, k, scale, LUT), w[ids])


def test_lut_rejects_other_activation_modes_and_bad_shapes():
    rng = np.random.default_rng(0)
    n, k = 40, 20
    packed = pack(random_codes(rng, n, k, LUT), LUT)
    scale = np.ones(n, np.float32)
    x = np.ones((1, k), np.float32)
    for act in ("f32", "int8"):
        with pytest.raises(TernvlmError, match="int7"):
            kernels.matmul(x, packed, k, scale, fmt=LUT, act=act)
    with pytest.raises(TernvlmError, match="packed has shape"):
        kernels.matmul(x, packed[:n], k, scale, fmt=LUT, act="int7")  # rows not padded to tiles
    with pytest.raises(TernvlmError, match="packed has shape"):
        kernels.matmul(x, packed, k, np.ones(80, np.float32), fmt=LUT, act="int7")
    lib = kernels._library()
    y = np.empty(n, np.float32)
    args = (x.ctypes.data, 1, k, packed.ctypes.data, n, scale.ctypes.data, 1, None, 0.0)
    assert lib.tvk_matmul(5, 1, *args, y.ctypes.data, 1) == -7  # TVK_ERR_BAD_FORMAT
    assert lib.tvk_matmul(5, 3, *args, y.ctypes.data, 1) == -7
    assert lib.tvk_matmul(5, 2, *args, y.ctypes.data, 1) == 0
    assert ctypes.c_char_p(lib.tvk_error_string(-7)).value is not None


@pytest.mark.parametrize("k", [4, 512, 516, 1028, 4100])
@pytest.mark.parametrize("sign", [1, -1])
def test_lut_extreme_sums(k, sign):
    """Every lookup at its largest (254: all codes +1, all activations +63) or smallest (2) for
    whole int16 blocks of 128 bytes and beyond: no wrap-around."""
    n = 130
    packed = pack(np.full((n, k), sign), LUT)
    x = np.full((2, k), 0.5, np.float32)
    x[1] *= -1
    scale = np.ones(n, np.float32)
    want = int8_act_reference(x, packed, k, scale, LUT, qmax=63)
    assert want[0, 0] == np.float32(sign * 63 * k) * np.float32(0.5 / 63)
    for path in PATHS:
        kernels.force_path(path)
        np.testing.assert_array_equal(lut_matmul(x, packed, k, scale, threads=2), want)


def test_lut_many_rows_of_x():
    """Prefill-sized M: the kernel builds tables for 16 rows of x at a time."""
    rng = np.random.default_rng(7)
    m, k, n = 130, 100, 70
    packed = pack(random_codes(rng, n, k, LUT), LUT)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.01, 2.0, size=(n, 5)).astype(np.float32)
    want = int8_act_reference(x, packed, k, scale, LUT, qmax=63)
    for path in PATHS:
        kernels.force_path(path)
        for threads in (1, 2):
            np.testing.assert_array_equal(lut_matmul(x, packed, k, scale, threads=threads), want)
