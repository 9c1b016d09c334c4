"""What the machine can do: memory read bandwidth and a description of the CPU.

Kernel timings only mean something next to the machine's ceiling: a batch-1 matmul reads every
weight byte once, so its speed is bounded by memory bandwidth once the weights do not fit in the
last-level cache. ``read_bandwidth`` measures that ceiling with the compiled ``tvk_read_bandwidth``
(kernels/bandwidth.cc); ``machine_info`` records what the numbers were measured on.

    read_bandwidth(1)             # GB/s, one thread, 512 MiB buffer, best of 5 x 4 stream counts
    read_bandwidth(2, mb=1024)
    read_bandwidth(1, streams=(1,))  # one sequential stream per thread only
    machine_info()["llc_bytes"]   # None where /sys does not say
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import numbers
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TernvlmError
from ..runtime.kernels import open_library

MAX_THREADS = 64  # the kernel's limit (kernels/bandwidth.cc)
MAX_STREAMS = 64
# Interleaved sequential streams per thread that read_bandwidth tries, keeping the best: AMD's
# prefetchers reach full speed only with several streams (Zen 2 VM, 1 thread: 13-14 GB/s with
# one, 19-20 with eight). A kernel that reads 4 rows at once is 4 streams.
STREAMS = (1, 2, 4, 8)
_FILL = 1  # every byte; the checksum of n bytes is then (n // 8) * 0x0101010101010101
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
_read_fn: Any = None


def _read_kernel() -> Any:
    """tvk_read_bandwidth with its signature declared (once per process)."""
    global _read_fn
    if _read_fn is None:
        fn = open_library().tvk_read_bandwidth
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64),
        ]
        fn.restype = ctypes.c_int
        _read_fn = fn
    return _read_fn


def _positive_int(name: str, v: object, upper: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise TernvlmError(f"{name} must be a positive integer, got {v!r}")
    if upper is not None and v > upper:
        raise TernvlmError(f"{name}={v} is above the limit {upper}")
    return int(v)


def read_checksum(buf: np.ndarray, threads: int = 1, streams: int = 1) -> int:
    """Sum mod 2**64 of buf's 64-bit words as the kernel reads them (tests check the reads)."""
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous or buf.nbytes == 0:
        raise TernvlmError("buf must be a non-empty C-contiguous numpy array")
    threads = _positive_int("threads", threads, MAX_THREADS)
    streams = _positive_int("streams", streams, MAX_STREAMS)
    out = ctypes.c_int64()
    code = _read_kernel()(buf.ctypes.data, buf.nbytes, threads, streams, ctypes.byref(out))
    if code != 0:
        raise TernvlmError(f"tvk_read_bandwidth failed (error {code})")
    return out.value % 2**64


def read_bandwidth(
    threads: int, mb: int = 512, repeats: int = 5, streams: int | tuple[int, ...] = STREAMS
) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s) with ``threads`` threads over an ``mb`` MiB buffer.

    The buffer is allocated and written once, read once untimed (page faults, and warming the
    cache for buffers that fit in it), then each thread reads its part as 1, 2, 4 and 8
    interleaved streams (``streams``), ``repeats`` times each in turn, and the best read is
    returned: the ceiling is what the memory system can deliver in its best arrangement, and the
    best run is the one least disturbed by other work on the machine. Buffers well above the
    last-level cache give the DRAM ceiling. Each call starts its threads, so for buffers of a few
    MiB the thread start-up (tens of microseconds) is part of the time.
    """
    return max(read_bandwidth_by_streams(threads, mb, repeats, streams).values())


def read_bandwidth_by_streams(
    threads: int, mb: int = 512, repeats: int = 5, streams: int | tuple[int, ...] = STREAMS
) -> dict[int, float]:
    """GB/s for each stream count of ``read_bandwidth`` (see there), measured interleaved."""
    threads = _positive_int("threads", threads, MAX_THREADS)
    nbytes = _positive_int("mb", mb) << 20
    repeats = _positive_int("repeats", repeats)
    if isinstance(streams, numbers.Integral):
        streams = (streams,)
    if not streams:
        raise TernvlmError("streams must name at least one stream count")
    streams = tuple(_positive_int("streams", s, MAX_STREAMS) for s in streams)
    buf = np.full(nbytes, _FILL, dtype=np.uint8)
    expected = (nbytes // 8) * int.from_bytes(bytes([_FILL]) * 8, "little") % 2**64
    fn, out = _read_kernel(), ctypes.c_int64()
    best = dict.fromkeys(streams, float("inf"))
    for i in range(repeats + 1):
        for s in streams:  # interleaved, so a slow minute of the machine hits every count
            t0 = time.perf_counter()
            code = fn(buf.ctypes.data, nbytes, threads, s, ctypes.byref(out))
            elapsed = time.perf_counter() - t0
            if code != 0:
                raise TernvlmError(f"tvk_read_bandwidth failed (error {code})")
            if out.value % 2**64 != expected:
                raise TernvlmError("tvk_read_bandwidth returned a wrong checksum")
            if i > 0:  # the first round is the warm-up
                best[s] = min(best[s], elapsed)
    return {s: nbytes / t / 1e9 for s, t in best.items()}


def _size_bytes(text: str) -> int | None:
    """sysfs cache sizes: "32768K", "32M", "1G" or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if m is None:
        return None
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def llc_bytes(cache_dir: Path = _CACHE_DIR) -> int | None:
    """Size of cpu0's highest-level data/unified cache, or None where sysfs does not say."""
    best: tuple[int, int] | None = None
    for index in sorted(cache_dir.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size is None:
            continue
        if best is None or (level, size) > best:
            best = (level, size)
    return None if best is None else best[1]


def _cpuinfo() -> tuple[str | None, bool | None]:
    """(model name, has avx2) from /proc/cpuinfo; (None, None) where it is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return (
        model.group(1).strip() if model else None,
        ("avx2" in flags.group(1).split()) if flags else None,
    )


def _ram_bytes() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) << 10 if m else None


def _version(dist: str) -> str | None:
    """Installed version without importing the package (importing torch takes seconds)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cache, memory and library versions, so benchmark numbers say what produced them.

    Keys: cpu, cores (logical), llc_bytes, llc_mib, ram_bytes, avx2, python, torch, numpy;
    values the system does not report are None.
    """
    cpu, avx2 = _cpuinfo()
    llc = llc_bytes()
    return {
        "cpu": cpu or platform.processor() or None,
        "cores": os.cpu_count(),
        "llc_bytes": llc,
        "llc_mib": None if llc is None else round(llc / 2**20, 1),
        "ram_bytes": _ram_bytes(),
        "avx2": avx2,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": np.__version__,
    }


def beyond_llc_mb(llc: int | None, minimum: int = 512) -> int:
    """A buffer size (MiB) that streams from DRAM: twice the LLC, at least ``minimum``."""
    if llc is None:
        return minimum
    return max(minimum, 2 * -(-llc // 2**20))
