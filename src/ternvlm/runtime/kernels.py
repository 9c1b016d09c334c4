"""numpy access to the compiled kernels in ``ternvlm._kernels`` (C ABI in kernels/tvk.h).

The extension is built by ``pip install [-e] .``; it is loaded with ctypes on first use.
Arguments are checked here (dtype, shape, contiguity) because the C side only sees pointers;
the C side checks sizes, scale groups and thread counts. Every problem raises TernvlmError.

    y = ternary_matmul(x, packed, k, scale)          # x [M, k] f32, packed [N, bytes] u8
    y = ternary_matmul(x, packed, k, scale, bias=b, clip=6.0, fmt="1.6bit", threads=2)
    y = matmul(x, packed, k, scale, fmt="int4", act="int8")  # any format; int8 activations
    e = gather(ids, packed, k, scale, fmt="int8")    # embedding rows [len(ids), k]

``scale`` is [N] (per row) or [N, C] with C dividing k (one scale per group of k // C columns).
"""

from __future__ import annotations

import ctypes
import importlib.util
import numbers
import os

import numpy as np

from ..errors import TernvlmError
from ..quant.pack import packed_row_bytes, packed_rows

PATHS = {"auto": 0, "scalar": 1, "avx2": 2}
_PATH_NAMES = {1: "scalar", 2: "avx2", 3: "neon"}
FORMAT_IDS = {"2bit": 0, "1.6bit": 1, "1bit": 2, "int8": 3, "int4": 4, "2bit-lut": 5}  # TVK_FMT_*
ACTS = {"f32": 0, "int8": 1, "int7": 2}  # TVK_ACT_*
_lib: ctypes.CDLL | None = None


def library_path() -> str:
    """The compiled kernel library; TERNVLM_KERNELS_LIB overrides it (the ASan build in CI)."""
    override = os.environ.get("TERNVLM_KERNELS_LIB")
    if override:
        return override
    spec = importlib.util.find_spec("ternvlm._kernels")
    if spec is None or not spec.origin:
        raise TernvlmError("compiled kernels ternvlm._kernels not found; run `pip install -e .`")
    return spec.origin


def open_library() -> ctypes.CDLL:
    """The compiled library, opened with no signatures declared (each user declares its own)."""
    origin = library_path()
    try:
        return ctypes.CDLL(origin)
    except OSError as e:
        raise TernvlmError(f"cannot load compiled kernels {origin}: {e}") from None


def _library() -> ctypes.CDLL:
    """Load the extension once and declare the C signatures."""
    global _lib
    if _lib is not None:
        return _lib
    lib = open_library()
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.tvk_matmul.argtypes = [i32, i32, p, i64, i64, p, i64, p, i64, p, f32, p, i32]
    lib.tvk_matmul.restype = i32
    lib.tvk_unpack.argtypes = [i32, p, i64, i64, p, i64, p, i32]
    lib.tvk_unpack.restype = i32
    lib.tvk_gather.argtypes = [i32, p, i64, p, i64, i64, p, i64, p]
    lib.tvk_gather.restype = i32
    lib.tvk_decode_attention.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, f32, p]
    lib.tvk_decode_attention.restype = i32
    lib.tvk_row_bytes.argtypes = [i32, i64]
    lib.tvk_row_bytes.restype = i64
    lib.tvk_weight_bytes.argtypes = [i32, i64, i64]
    lib.tvk_weight_bytes.restype = i64
    lib.tvk_error_string.argtypes = [i32]
    lib.tvk_error_string.restype = ctypes.c_char_p
    lib.tvk_force_path.argtypes = [i32]
    lib.tvk_force_path.restype = None
    lib.tvk_active_path.argtypes = []
    lib.tvk_active_path.restype = i32
    _lib = lib
    return lib


def _array(name: str, a, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` must already be a C-contiguous, aligned ndarray of ``dtype`` and ``shape``."""
    if not isinstance(a, np.ndarray):
        raise TernvlmError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TernvlmError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.shape != shape:
        raise TernvlmError(f"{name} has shape {a.shape}, expected {shape}")
    if not (a.flags.c_contiguous and a.flags.aligned):
        raise TernvlmError(f"{name} must be C-contiguous and aligned")
    return a


def _int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TernvlmError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if not -(2**31) <= v < 2**31:  # C int; the kernel reports the real range
        raise TernvlmError(f"{name}={v} is out of range")
    return v


def _fmt(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise TernvlmError(f"unknown format {fmt!r}; expected one of {', '.join(allowed)}")
    return fmt


def _weights(packed, k, scale, fmt: str) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Check packed [N, row bytes] and scale [N] / [N, C]; returns (packed, k, scale, C)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
        raise TernvlmError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if not isinstance(packed, np.ndarray) or packed.ndim != 2:
        raise TernvlmError(f"packed must be a 2-D numpy array [N, {packed_row_bytes(k, fmt)}]")
    if not isinstance(scale, np.ndarray) or scale.ndim not in (1, 2):
        raise TernvlmError(f"scale must be a numpy array [N] or [N, C] with N={packed.shape[0]}")
    # N: the packed rows, or for 2bit-lut (whole tiles of rows) the scale's rows
    n = scale.shape[0] if fmt == "2bit-lut" else packed.shape[0]
    _array("packed", packed, np.uint8, (packed_rows(n, fmt), packed_row_bytes(k, fmt)))
    cols = 1 if scale.ndim == 1 else scale.shape[1]
    _array("scale", scale, np.float32, (n,) if scale.ndim == 1 else (n, cols))
    return packed, k, scale, cols


def _check(code: int, fn: str) -> None:
    if code != 0:
        msg = _library().tvk_error_string(code).decode()
        raise TernvlmError(f"{fn}: {msg} (error {code})")


def _matmul(x, packed, k, scale, bias, clip, fmt: str, threads, act: str = "f32") -> np.ndarray:
    if act not in ACTS:
        raise TernvlmError(f"unknown activation mode {act!r}; expected one of {', '.join(ACTS)}")
    packed, k, scale, cols = _weights(packed, k, scale, fmt)
    n = scale.shape[0]
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise TernvlmError(f"x must be a 2-D numpy array [M, {k}]")
    _array("x", x, np.float32, (x.shape[0], k))
    if bias is not None:
        _array("bias", bias, np.float32, (n,))
    if clip is None:
        clip_value = 0.0
    elif isinstance(clip, numbers.Real) and not isinstance(clip, bool) and clip > 0:
        clip_value = float(clip)  # NaN fails `clip > 0`
    else:
        raise TernvlmError(f"clip must be a positive number or None, got {clip!r}")
    threads = _int("threads", threads)
    y = np.empty((x.shape[0], n), dtype=np.float32)
    code = _library().tvk_matmul(
        FORMAT_IDS[fmt],
        ACTS[act],
        x.ctypes.data,
        x.shape[0],
        k,
        packed.ctypes.data,
        n,
        scale.ctypes.data,
        cols,
        None if bias is None else bias.ctypes.data,
        clip_value,
        y.ctypes.data,
        threads,
    )
    _check(code, "tvk_matmul")
    return y


def matmul(
    x, packed, k, scale, fmt: str, act: str = "f32", bias=None, clip=None, threads: int = 1
) -> np.ndarray:
    """y [M, N] for any packed format; act="int8" quantizes each row of x first (see tvk.h)."""
    return _matmul(x, packed, k, scale, bias, clip, _fmt(fmt, tuple(FORMAT_IDS)), threads, act)


def ternary_matmul(
    x, packed, k, scale, bias=None, clip=None, fmt: str = "2bit", threads: int = 1
) -> np.ndarray:
    """y [M, N] = x [M, k] @ (codes * scale)^T (+ bias, clamped to [-clip, clip]); float32."""
    return _matmul(x, packed, k, scale, bias, clip, _fmt(fmt, ("2bit", "1.6bit")), threads)


def binary_matmul(x, packed, k, scale, bias=None, clip=None, threads: int = 1) -> np.ndarray:
    """Like ternary_matmul for 1-bit packed {-1, +1} weights."""
    return _matmul(x, packed, k, scale, bias, clip, "1bit", threads)


def _unpack(packed, k, scale, fmt: str, threads) -> np.ndarray:
    packed, k, scale, cols = _weights(packed, k, scale, fmt)
    threads = _int("threads", threads)
    out = np.empty((scale.shape[0], k), dtype=np.float32)
    code = _library().tvk_unpack(
        FORMAT_IDS[fmt],
        packed.ctypes.data,
        scale.shape[0],
        k,
        scale.ctypes.data,
        cols,
        out.ctypes.data,
        threads,
    )
    _check(code, "tvk_unpack")
    return out


def unpack(packed, k, scale, fmt: str, threads: int = 1) -> np.ndarray:
    """Dequantized float32 weights [N, k] of any packed format."""
    return _unpack(packed, k, scale, _fmt(fmt, tuple(FORMAT_IDS)), threads)


def gather(ids, packed, k, scale, fmt: str) -> np.ndarray:
    """Embedding lookup: float32 [len(ids), k] rows ``ids`` of the dequantized weights."""
    packed, k, scale, cols = _weights(packed, k, scale, _fmt(fmt, tuple(FORMAT_IDS)))
    if not isinstance(ids, np.ndarray) or ids.ndim != 1:
        raise TernvlmError("ids must be a 1-D numpy array of int32")
    _array("ids", ids, np.int32, ids.shape)
    out = np.empty((ids.shape[0], k), dtype=np.float32)
    if ids.shape[0] == 0:
        return out
    code = _library().tvk_gather(
        FORMAT_IDS[fmt],
        ids.ctypes.data,
        ids.shape[0],
        packed.ctypes.data,
        scale.shape[0],
        k,
        scale.ctypes.data,
        cols,
        out.ctypes.data,
    )
    _check(code, "tvk_gather")
    return out


def decode_attention(
    qkv, cos, sin, k_cache, v_cache, pos: int, heads: int, kv_heads: int, scale: float
) -> np.ndarray:
    """One token's attention against a KV cache (the DecodeAttention op; tvk.h).

    qkv [(heads + 2 kv_heads) * D] = [q | k | v]; cos/sin [rot]; caches [L, kv_heads, D].
    Returns [o | rotary(k) | v], same length as qkv."""
    heads, kv_heads, pos = _int("heads", heads), _int("kv_heads", kv_heads), _int("pos", pos)
    if not isinstance(k_cache, np.ndarray) or k_cache.ndim != 3:
        raise TernvlmError("k_cache must be a 3-D float32 array [L, kv_heads, D]")
    cache_len, _, d = k_cache.shape
    _array("k_cache", k_cache, np.float32, (cache_len, kv_heads, d))
    _array("v_cache", v_cache, np.float32, (cache_len, kv_heads, d))
    _array("qkv", qkv, np.float32, ((heads + 2 * kv_heads) * d,))
    rot = cos.shape[0] if isinstance(cos, np.ndarray) and cos.ndim == 1 else -1
    _array("cos", cos, np.float32, (rot,))
    _array("sin", sin, np.float32, (rot,))
    out = np.empty_like(qkv)
    code = _library().tvk_decode_attention(
        qkv.ctypes.data,
        cos.ctypes.data,
        sin.ctypes.data,
        k_cache.ctypes.data,
        v_cache.ctypes.data,
        pos,
        heads,
        kv_heads,
        d,
        rot,
        cache_len,
        float(scale),
        out.ctypes.data,
    )
    _check(code, "tvk_decode_attention")
    return out


def ternary_unpack(packed, k, scale, fmt: str = "2bit", threads: int = 1) -> np.ndarray:
    """Dequantized float32 weights [N, k] = codes * scale (per row or per group)."""
    return _unpack(packed, k, scale, _fmt(fmt, ("2bit", "1.6bit")), threads)


def binary_unpack(packed, k, scale, threads: int = 1) -> np.ndarray:
    """Dequantized float32 weights [N, k] of 1-bit packed {-1, +1} codes."""
    return _unpack(packed, k, scale, "1bit", threads)


def force_path(name: str) -> None:
    """Force "scalar" or "avx2" for all later calls in this process ("auto" undoes it)."""
    if name not in PATHS:
        raise TernvlmError(f"unknown kernel path {name!r}; expected one of {', '.join(PATHS)}")
    lib = _library()
    lib.tvk_force_path(PATHS[name])
    if name != "auto" and active_path() != name:
        lib.tvk_force_path(PATHS["auto"])
        raise TernvlmError(f"kernel path {name!r} is not available on this CPU or build")


def active_path() -> str:
    """The path the next call runs: "scalar" or "avx2"."""
    return _PATH_NAMES[_library().tvk_active_path()]


def available_paths() -> list[str]:
    """Paths force_path accepts on this machine (besides "auto")."""
    lib = _library()
    current = lib.tvk_active_path()
    found = ["scalar"]
    lib.tvk_force_path(PATHS["auto"])
    if lib.tvk_active_path() == PATHS["avx2"]:
        found.append("avx2")
    # restore: auto resolves to the best path, so only a forced scalar needs re-forcing
    lib.tvk_force_path(PATHS["scalar"] if current == PATHS["scalar"] else PATHS["auto"])
    return found
