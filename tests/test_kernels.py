"""Compiled kernels (ternvlm.runtime.kernels) against numpy and against their own scalar path."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternvlm.errors import TernvlmError
from ternvlm.quant.pack import CODE_RANGE, pack, packed_row_bytes, packed_rows, unpack
from ternvlm.runtime import kernels

FORMATS = ["2bit", "1.6bit", "1bit"]
PATHS = kernels.available_paths()
RTOL = 1e-4  # relative to sum_k |x| |w| (+ |bias|): float32 sums in any order stay well inside


@pytest.fixture(autouse=True)
def _auto_path():
    yield
    kernels.force_path("auto")


def random_codes(rng, n, k, fmt, p_zero=0.3):
    if fmt in ("int8", "int4"):
        lo, hi = CODE_RANGE[fmt]
        return rng.integers(lo, hi + 1, size=(n, k))
    if fmt == "1bit":
        return rng.choice([-1, 1], size=(n, k))
    return rng.choice([-1, 0, 1], size=(n, k), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])


def matmul(fmt, x, packed, k, scale, **kw):
    if fmt == "1bit":
        return kernels.binary_matmul(x, packed, k, scale, **kw)
    return kernels.ternary_matmul(x, packed, k, scale, fmt=fmt, **kw)


def unpack_kernel(fmt, packed, k, scale, **kw):
    if fmt == "1bit":
        return kernels.binary_unpack(packed, k, scale, **kw)
    return kernels.ternary_unpack(packed, k, scale, fmt=fmt, **kw)


def dequant(packed, k, scale, fmt):
    """float64 reference weights [N, k] from the Python unpacker."""
    s = scale.astype(np.float64).reshape(scale.shape[0], -1)  # N rows (2bit-lut pads packed)
    codes = unpack(packed, k, fmt)[: s.shape[0]]
    return codes.astype(np.float64) * np.repeat(s, k // s.shape[1], axis=1)


def reference(x, w, bias, clip):
    y = x.astype(np.float64) @ w.T
    mag = np.abs(x.astype(np.float64)) @ np.abs(w).T
    if bias is not None:
        y = y + bias
        mag = mag + np.abs(bias)
    if clip is not None:
        y = np.clip(y, -clip, clip)
    return y, mag


def assert_close(y, ref, mag):
    assert y.dtype == np.float32 and y.shape == ref.shape
    bad = np.abs(y - ref) > RTOL * mag
    assert not bad.any(), f"{bad.sum()} elements off, worst {np.abs(y - ref).max()}"


def check_all_paths(fmt, x, packed, k, scale, bias=None, clip=None):
    """Every path and thread count against numpy, against scalar, and threads 1 == 2 bitwise."""
    w = dequant(packed, k, scale, fmt)
    ref, mag = reference(x, w, bias, clip)
    scalar = None
    for path in PATHS:
        kernels.force_path(path)
        assert kernels.active_path() == path
        y1 = matmul(fmt, x, packed, k, scale, bias=bias, clip=clip, threads=1)
        y2 = matmul(fmt, x, packed, k, scale, bias=bias, clip=clip, threads=2)
        assert_close(y1, ref, mag)
        np.testing.assert_array_equal(y1, y2)  # threads only split N
        if scalar is None:
            scalar = y1
        else:
            assert_close(y1, scalar.astype(np.float64), mag)
        for threads in (1, 2):
            u = unpack_kernel(fmt, packed, k, scale, threads=threads)
            np.testing.assert_array_equal(u, w.astype(np.float32))  # q * s is exact
    return scalar


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    group_pick=st.integers(0, 1000),
    per_group=st.booleans(),
    use_bias=st.booleans(),
    use_clip=st.booleans(),
    raw_bytes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes(fmt, m, k, n, group_pick, per_group, use_bias, use_clip, raw_bytes, seed):
    rng = np.random.default_rng(seed)
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    cols = divisors[group_pick % len(divisors)] if per_group else 1
    if raw_bytes:  # any byte: unused code values and padding bits must behave like unpack()
        packed = rng.integers(0, 256, size=(n, packed_row_bytes(k, fmt)), dtype=np.uint8)
    else:
        packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.01, 2.0, size=(n, cols) if per_group else (n,)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    clip = None
    if use_clip:
        raw, _ = reference(x, dequant(packed, k, scale, fmt), bias, None)
        clip = float(0.5 * np.abs(raw).max()) or 1.0
    check_all_paths(fmt, x, packed, k, scale, bias, clip)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("m", "k", "n", "cols"),
    [
        (1, 1, 1, 1),  # smallest
        (7, 1, 3, 1),  # K=1, M>1
        (5, 13, 1, 1),  # N=1
        (1, 4, 9, 2),
        (3, 5, 9, 5),
        (2, 8, 9, 4),
        (1, 40, 17, 8),  # group of 5: not byte aligned in 2bit/1bit
        (1, 64, 33, 2),  # whole dwords of codes
        (4, 96, 12, 3),
        (5, 96, 12, 3),  # first M that takes the blocked path
        (1, 1305, 19, 1),  # K crosses the 640-column tile, not a multiple of 4 or 8
        (6, 1320, 21, 10),  # tiles x groups of 132 (not a multiple of 5 or 8)
        (9, 2048, 10, 16),
    ],
)
def test_edge_shapes(fmt, m, k, n, cols):
    rng = np.random.default_rng(m * 1000 + k + n)
    packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.1, 1.0, size=(n, cols)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    check_all_paths(fmt, x, packed, k, scale)
    check_all_paths(fmt, x, packed, k, scale, bias=bias, clip=0.7)


@pytest.mark.parametrize("fmt", ["2bit", "1.6bit"])
@pytest.mark.parametrize("m", [1, 6])
def test_all_zero_codes_give_bias(fmt, m):
    k, n = 77, 11
    packed = pack(np.zeros((n, k), dtype=np.int64), fmt)
    x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    scale = np.full(n, 3.0, dtype=np.float32)
    bias = np.arange(n, dtype=np.float32) - 5
    for path in PATHS:
        kernels.force_path(path)
        np.testing.assert_array_equal(matmul(fmt, x, packed, k, scale), np.zeros((m, n)))
        y = matmul(fmt, x, packed, k, scale, bias=bias, clip=2.5, threads=2)
        np.testing.assert_array_equal(y, np.broadcast_to(np.clip(bias, -2.5, 2.5), (m, n)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5])
def test_large_values(fmt, m):
    rng = np.random.default_rng(1)
    k, n = 300, 7
    packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = (rng.standard_normal((m, k)) * 1e6).astype(np.float32)
    scale = rng.uniform(1e3, 1e4, size=(n, 3)).astype(np.float32)
    y = check_all_paths(fmt, x, packed, k, scale)
    assert np.isfinite(y).all() and np.abs(y).max() > 1e9


def test_thread_count_changes_and_concurrent_callers():
    rng = np.random.default_rng(2)
    k, n = 520, 45
    packed = pack(random_codes(rng, n, k, "2bit"), "2bit")
    scale = rng.uniform(0.5, 1.0, size=n).astype(np.float32)
    xs = [rng.standard_normal((m, k)).astype(np.float32) for m in (1, 3, 8)]
    want = [kernels.ternary_matmul(x, packed, k, scale) for x in xs]
    for threads in (2, 3, 1, 4, 2):  # the pool is resized each time
        for x, y in zip(xs, want, strict=True):
            np.testing.assert_array_equal(
                kernels.ternary_matmul(x, packed, k, scale, threads=threads), y
            )

    errors = []

    def worker(i):
        try:
            for j in range(20):
                t = 1 + (i + j) % 3
                x, y = xs[j % 3], want[j % 3]
                np.testing.assert_array_equal(
                    kernels.ternary_matmul(x, packed, k, scale, threads=t), y
                )
        except Exception as e:  # reported below: a failing thread must fail the test
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors


def test_paths():
    assert "scalar" in PATHS
    kernels.force_path("scalar")
    assert kernels.active_path() == "scalar"
    kernels.force_path("auto")
    assert kernels.active_path() == PATHS[-1]
    with pytest.raises(TernvlmError, match="unknown kernel path"):
        kernels.force_path("gpu")


def _ok_args(fmt="2bit", m=2, k=10, n=3):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((m, k)).astype(np.float32),
        pack(random_codes(rng, n, k, fmt), fmt),
        k,
        np.ones(n, dtype=np.float32),
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "x": a["x"].astype(np.float64)}, "x must be float32"),
        (lambda a: {**a, "x": a["x"].tolist()}, "x must be a 2-D numpy array"),
        (lambda a: {**a, "x": a["x"][:, 0]}, "x must be a 2-D"),
        (lambda a: {**a, "x": np.asfortranarray(np.ones((10, 2), np.float32).T)}, "C-contiguous"),
        (lambda a: {**a, "x": np.ones((2, 20), np.float32)[:, ::2]}, "C-contiguous"),
        (lambda a: {**a, "x": np.ones((0, 10), np.float32)}, "M, K and N"),
        (lambda a: {**a, "packed": a["packed"].view(np.int8)}, "packed must be uint8"),
        (lambda a: {**a, "packed": np.zeros((3, 4), np.uint8)}, "packed has shape"),
        (lambda a: {**a, "packed": np.zeros(3, np.uint8)}, "packed must be a 2-D"),
        (lambda a: {**a, "k": 0}, "k must be a positive integer"),
        (lambda a: {**a, "k": 10.0}, "k must be a positive integer"),
        (lambda a: {**a, "scale": a["scale"].astype(np.float64)}, "scale must be float32"),
        (lambda a: {**a, "scale": np.ones(4, np.float32)}, "scale has shape"),
        (lambda a: {**a, "scale": np.ones((3, 3), np.float32)}, "divide K"),
        (lambda a: {**a, "bias": np.ones(4, np.float32)}, "bias has shape"),
        (lambda a: {**a, "bias": np.ones(3, np.float64)}, "bias must be float32"),
        (lambda a: {**a, "clip": 0.0}, "clip must be a positive"),
        (lambda a: {**a, "clip": -1.0}, "clip must be a positive"),
        (lambda a: {**a, "clip": float("nan")}, "clip must be a positive"),
        (lambda a: {**a, "threads": 0}, "threads must be in"),
        (lambda a: {**a, "threads": 65}, "threads must be in"),
        (lambda a: {**a, "threads": -(2**40)}, "out of range"),
        (lambda a: {**a, "threads": 1.5}, "threads must be an integer"),
        (lambda a: {**a, "fmt": "1bit"}, "unknown format"),
        (lambda a: {**a, "fmt": "3bit"}, "unknown format"),
    ],
)
def test_bad_arguments_raise(change, match):
    x, packed, k, scale = _ok_args()
    args = change({"x": x, "packed": packed, "k": k, "scale": scale})
    with pytest.raises(TernvlmError, match=match):
        kernels.ternary_matmul(**args)


def test_bad_arguments_other_entry_points():
    x, packed, k, scale = _ok_args("1bit")
    with pytest.raises(TernvlmError, match="threads must be in"):
        kernels.binary_matmul(x, packed, k, scale, threads=0)
    with pytest.raises(TernvlmError, match="packed has shape"):
        kernels.binary_matmul(x, packed[:, :1].copy(), k, scale)
    with pytest.raises(TernvlmError, match="divide K"):
        kernels.binary_unpack(packed, k, np.ones((3, 4), np.float32))
    x, packed, k, scale = _ok_args("1.6bit")
    with pytest.raises(TernvlmError, match="threads must be in"):
        kernels.ternary_unpack(packed, k, scale, fmt="1.6bit", threads=0)
    with pytest.raises(TernvlmError, match="packed has shape"):
        kernels.ternary_unpack(packed, k, scale)  # 1.6-bit rows read as 2-bit
    with pytest.raises(TernvlmError, match="unknown format"):
        kernels.ternary_unpack(packed, k, scale, fmt="1bit")


def test_c_abi_rejects_bad_arguments_without_crashing():
    lib = kernels._library()
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    for name in ("tvk_ternary_matmul_2bit",):
        getattr(lib, name).argtypes = [p, i64, i64, p, i64, p, i64, p, f32, p, i32]
    for name in ("tvk_ternary_unpack_2bit", "tvk_ternary_unpack_1p6bit", "tvk_binary_unpack_1bit"):
        getattr(lib, name).argtypes = [p, i64, i64, p, i64, p, i32]
    x = np.ones((2, 8), np.float32)
    w = np.zeros((3, 2), np.uint8)
    s = np.ones(3, np.float32)
    y = np.empty((2, 3), np.float32)
    xp, wp, sp, yp = x.ctypes.data, w.ctypes.data, s.ctypes.data, y.ctypes.data

    def call(**kw):
        a = dict(x=xp, m=2, k=8, w=wp, n=3, s=sp, cols=1, bias=None, clip=0.0, y=yp, t=1)
        a.update(kw)
        return lib.tvk_ternary_matmul_2bit(*a.values())

    assert call() == 0
    codes = {
        "null x": call(x=None),
        "null w": call(w=None),
        "null scale": call(s=None),
        "null y": call(y=None),
        "M=0": call(m=0),
        "K<0": call(k=-8),
        "N=0": call(n=0),
        "huge M": call(m=2**40),
        "cols=0": call(cols=0),
        "cols=3": call(cols=3),
        "cols>K": call(cols=16),
        "threads=0": call(t=0),
        "threads=65": call(t=65),
        "clip nan": call(clip=float("nan")),
    }
    assert all(c < 0 for c in codes.values()), codes
    assert lib.tvk_ternary_unpack_2bit(None, 3, 8, sp, 1, yp, 1) < 0
    assert lib.tvk_ternary_unpack_1p6bit(wp, -1, 8, sp, 1, yp, 1) < 0
    assert lib.tvk_binary_unpack_1bit(wp, 3, 8, sp, 1, yp, 99) < 0
    for code in [*codes.values(), 0, -6, -1000, 7]:
        assert isinstance(lib.tvk_error_string(code), bytes)
    lib.tvk_force_path(12345)  # ignored
    assert lib.tvk_active_path() in (1, 2)
    assert ctypes.c_int(lib.tvk_active_path()).value == kernels.PATHS[kernels.active_path()]


ALL_FORMATS = ["2bit", "1.6bit", "1bit", "int8", "int4"]


def int8_act_reference(x, packed, k, scale, fmt, bias=None, clip=None, qmax=127):
    """tvk.h's int8 (qmax 127) / int7 (63) activation formula in float32 numpy, op for op."""
    n = scale.shape[0]
    codes = unpack(packed, k, fmt)[:n].astype(np.int64)
    s = scale.reshape(n, -1).astype(np.float32)
    cols = s.shape[1]
    g = k // cols
    y = np.zeros((x.shape[0], n), np.float32)
    for m, row in enumerate(x):
        amax = np.abs(row).max()
        if not np.isfinite(row).all():
            y[m] = np.nan
            continue
        if amax == 0:
            continue
        inv = np.float32(qmax) / amax
        xq = np.clip(np.rint(row * inv), -127, 127).astype(np.int64)
        total = np.zeros(n, np.float32)
        for j in range(cols):
            dot = (codes[:, j * g : (j + 1) * g] @ xq[j * g : (j + 1) * g]).astype(np.float32)
            total = total + s[:, j] * dot
        y[m] = total * (amax / np.float32(qmax))
    if bias is not None:
        y = y + bias
    if clip is not None:
        y = np.clip(y, np.float32(-clip), np.float32(clip))
    return y


# (format, activation mode): int8 for every format, int7 (any format takes it) for two, and the
# lookup-table format, which takes int7 only.
ACT_CASES = [(f, "int8") for f in ALL_FORMATS] + [
    ("2bit", "int7"),
    ("int4", "int7"),
    ("2bit-lut", "int7"),
]
QMAX = {"int8": 127, "int7": 63}


@settings(max_examples=400, deadline=None)
@given(
    case=st.sampled_from(ACT_CASES),
    m=st.integers(1, 9),
    k=st.integers(1, 400),
    n=st.integers(1, 300),
    group_pick=st.integers(0, 1000),
    use_bias=st.booleans(),
    raw_bytes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_int8_activations_exact(case, m, k, n, group_pick, use_bias, raw_bytes, seed):
    """Every path and thread count equals the float32 formula bit for bit, for any N and K
    (2bit-lut: partial tiles of 32 and groups of 4 tiles; groups of whole bytes or not)."""
    fmt, act = case
    rng = np.random.default_rng(seed)
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    cols = divisors[group_pick % len(divisors)]
    if raw_bytes:  # any byte (1.6-bit 243-255, 2-bit code 3, 2bit-lut nibbles 9-15): as unpack()
        shape = (packed_rows(n, fmt), packed_row_bytes(k, fmt))
        packed = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 100)).astype(np.float32)
    if m > 1:
        x[rng.integers(m)] = 0  # an all-zero row gives 0 (+ bias)
    scale = rng.uniform(0.01, 2.0, size=(n, cols)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    want = int8_act_reference(x, packed, k, scale, fmt, bias, 3.0, qmax=QMAX[act])
    for path in PATHS:
        kernels.force_path(path)
        for threads in (1, 2):
            y = kernels.matmul(
                x, packed, k, scale, fmt=fmt, act=act, bias=bias, clip=3.0, threads=threads
            )
            np.testing.assert_array_equal(y, want, err_msg=f"{path} threads={threads}")


@pytest.mark.parametrize(("fmt", "act"), ACT_CASES)
@pytest.mark.parametrize(
    ("m", "k", "n", "cols"),
    [
        (1, 576, 1536, 1),
        (1, 1536, 576, 1),
        (3, 960, 37, 15),
        (5, 576, 64, 9),
        (1, 4096, 8, 1),
        (2, 2048, 1000, 1),
        (1, 16, 130, 4),
    ],
)
def test_int8_activations_model_shapes(fmt, act, m, k, n, cols):
    """Real model widths (576, 960, 1536: not multiples of 256), group scales, and N past whole
    blocks of rows (2bit-lut reads 4 tiles of 32 at a time)."""
    rng = np.random.default_rng(k + n)
    packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.01, 2.0, size=(n, cols)).astype(np.float32)
    want = int8_act_reference(x, packed, k, scale, fmt, qmax=QMAX[act])
    for path in PATHS:
        kernels.force_path(path)
        np.testing.assert_array_equal(
            kernels.matmul(x, packed, k, scale, fmt=fmt, act=act, threads=2), want
        )
    # close to the float-activation product: activation rounding is the only difference
    w = dequant(packed, k, scale, fmt)
    ref, mag = reference(x, w, None, None)
    assert (np.abs(want - ref) <= 2.5 / QMAX[act] * mag + 1e-6).all()


@pytest.mark.parametrize(("fmt", "act"), ACT_CASES)
def test_int8_activations_non_finite_rows_are_nan(fmt, act):
    rng = np.random.default_rng(3)
    k, n = 70, 40
    packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[0, 5], x[2, 0] = np.inf, np.nan
    scale = np.ones(n, np.float32)
    for path in PATHS:
        kernels.force_path(path)
        y = kernels.matmul(x, packed, k, scale, fmt=fmt, act=act)
        assert np.isnan(y[0]).all() and np.isnan(y[2]).all() and np.isfinite(y[1]).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize(("m", "k", "n", "cols"), [(1, 13, 5, 1), (4, 576, 33, 9), (9, 130, 8, 2)])
def test_int_formats_float_activations(fmt, m, k, n, cols):
    rng = np.random.default_rng(m + k)
    packed = pack(random_codes(rng, n, k, fmt), fmt)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.01, 2.0, size=(n, cols)).astype(np.float32)
    w = dequant(packed, k, scale, fmt)
    ref, mag = reference(x, w, None, None)
    for path in PATHS:
        kernels.force_path(path)
        assert_close(kernels.matmul(x, packed, k, scale, fmt=fmt, threads=2), ref, mag)
        np.testing.assert_array_equal(kernels.unpack(packed, k, scale, fmt), w.astype(np.float32))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_gather_rows(fmt):
    rng = np.random.default_rng(4)
    k, n = 97, 50
    packed = pack(random_codes(rng, n, k, fmt), fmt)
    scale = rng.uniform(0.01, 2.0, size=n).astype(np.float32)
    ids = np.array([0, 49, 7, 7, 3], np.int32)
    w = dequant(packed, k, scale, fmt).astype(np.float32)
    np.testing.assert_array_equal(kernels.gather(ids, packed, k, scale, fmt), w[ids])
    assert kernels.gather(ids[:0], packed, k, scale, fmt).shape == (0, k)


@pytest.mark.parametrize("bad", [-1, 50, 2**31 - 1])
def test_gather_bad_index(bad):
    rng = np.random.default_rng(5)
    packed = pack(random_codes(rng, 50, 16, "int8"), "int8")
    scale = np.ones(50, np.float32)
    with pytest.raises(TernvlmError, match="index"):
        kernels.gather(np.array([1, bad], np.int32), packed, 16, scale, "int8")
    with pytest.raises(TernvlmError, match="int32"):
        kernels.gather(np.array([1, 2], np.int64), packed, 16, scale, "int8")


def test_new_entry_points_reject_bad_arguments():
    x, packed, k, scale = _ok_args("int4")
    with pytest.raises(TernvlmError, match="activation mode"):
        kernels.matmul(x, packed, k, scale, fmt="int4", act="fp8")
    with pytest.raises(TernvlmError, match="packed has shape"):
        kernels.matmul(x, packed, k, scale, fmt="int8")
    lib = kernels._library()
    y = np.empty((2, 3), np.float32)
    args = (x.ctypes.data, 2, k, packed.ctypes.data, 3, scale.ctypes.data, 1, None, 0.0)
    assert lib.tvk_matmul(4, 1, *args, y.ctypes.data, 1) == 0
    assert lib.tvk_matmul(6, 1, *args, y.ctypes.data, 1) == -7  # bad format
    assert lib.tvk_matmul(-1, 0, *args, y.ctypes.data, 1) == -7
    assert lib.tvk_matmul(4, 3, *args, y.ctypes.data, 1) < 0  # bad activation mode
    assert lib.tvk_row_bytes(4, 11) == 6 and lib.tvk_row_bytes(1, 11) == 3
    assert lib.tvk_row_bytes(9, 11) < 0 and lib.tvk_row_bytes(0, -1) < 0
    assert (
        lib.tvk_gather(3, None, 1, packed.ctypes.data, 3, k, scale.ctypes.data, 1, y.ctypes.data)
        < 0
    )


def attention_reference(qkv, cos, sin, kc, vc, pos, heads, kv_heads, scale):
    """numpy: rotary on q and k, softmax over cache slots < pos plus the token itself."""
    d, rot = kc.shape[-1], cos.shape[0]
    q, k, v = np.split(qkv.astype(np.float64), [heads * d, (heads + kv_heads) * d])
    q, k, v = q.reshape(heads, d), k.reshape(kv_heads, d), v.reshape(kv_heads, d)

    def rotary(x):
        r, half = x[:, :rot], rot // 2
        turned = np.concatenate([-r[:, half:], r[:, :half]], axis=1)
        return np.concatenate([r * cos + turned * sin, x[:, rot:]], axis=1)

    q, k = rotary(q), rotary(k)
    o = np.empty((heads, d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        keys = np.concatenate([kc[:pos, g], k[g : g + 1]])  # caches [L, G, D]
        values = np.concatenate([vc[:pos, g], v[g : g + 1]])
        s = keys @ q[h] * scale
        w = np.exp(s - s.max())
        o[h] = (w / w.sum()) @ values
    return np.concatenate([o.ravel(), k.ravel(), v.ravel()])


@settings(max_examples=40, deadline=None)
@given(
    heads_per_group=st.integers(1, 4),
    kv_heads=st.integers(1, 3),
    d=st.sampled_from([1, 2, 7, 8, 16, 33, 64]),
    rot_frac=st.sampled_from([0.0, 0.5, 1.0]),
    cache_len=st.integers(1, 40),
    pos_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_decode_attention_paths_equal_numpy(
    heads_per_group, kv_heads, d, rot_frac, cache_len, pos_frac, seed
):
    """DecodeAttention (kernels/attention.cc), scalar and AVX2, == numpy on random shapes,
    including pos 0 (only the token itself) and the last cache slot."""
    rng = np.random.default_rng(seed)
    heads = heads_per_group * kv_heads
    rot = int(d * rot_frac) // 2 * 2
    pos = min(cache_len - 1, int(pos_frac * cache_len))
    qkv = rng.standard_normal((heads + 2 * kv_heads) * d).astype(np.float32) * 2
    kc = rng.standard_normal((cache_len, kv_heads, d)).astype(np.float32)
    vc = rng.standard_normal((cache_len, kv_heads, d)).astype(np.float32)
    angle = rng.uniform(-3, 3, rot // 2).astype(np.float32)
    cos = np.concatenate([np.cos(angle)] * 2).astype(np.float32)
    sin = np.concatenate([np.sin(angle)] * 2).astype(np.float32)
    ref = attention_reference(qkv, cos, sin, kc, vc, pos, heads, kv_heads, d**-0.5)
    outs = []
    for path in ("scalar", "auto"):
        kernels.force_path(path)
        outs.append(kernels.decode_attention(qkv, cos, sin, kc, vc, pos, heads, kv_heads, d**-0.5))
    for y in outs:
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_decode_attention_bad_input():
    kc = np.zeros((8, 2, 4), np.float32)
    qkv, cs = np.zeros(6 * 4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(TernvlmError, match="tvk_decode_attention"):
        kernels.decode_attention(qkv, cs, cs, kc, kc, 8, 2, 2, 0.5)  # pos past the cache
    with pytest.raises(TernvlmError, match="tvk_decode_attention"):
        kernels.decode_attention(np.zeros(28, np.float32), cs, cs, kc, kc, 0, 3, 2, 0.5)  # 3 / 2
    with pytest.raises(TernvlmError, match="qkv has shape"):
        kernels.decode_attention(qkv[:20], cs, cs, kc, kc, 0, 2, 2, 0.5)
