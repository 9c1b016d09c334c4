"""Batch-1 (decode) timing of the compiled kernels against numpy float32 and the memory roofline.

For each weight shape N x K, format (2bit, 2bit-lut, 1.6bit, 1bit, int8, int4) and activation
mode (f32, int8; 2bit-lut takes int7 only, and int7 is shown for 2bit-lut only): the median
microseconds of y[M, N] = x[M, K] . W^T through the generic C entry point tvk_matmul at 1 and 2
threads, next to numpy's float32 ``x @ W.T`` (single-threaded BLAS unless
--numpy-threads says otherwise). Decode reads every weight byte once per token, so each row also
shows its effective weight bandwidth (packed weight bytes / median time; scales excluded) and that
as a fraction of the machine's read bandwidth at the same thread count, measured in the same run
on a buffer beyond the last-level cache (ternvlm.bench.machine.read_bandwidth). That ceiling is a
best-of-runs number, so the kernel's best run is set against it as well ("of read BW, best"), next
to the median (a noisy machine slows some runs of a long measurement). For matrices beyond the
LLC the read bandwidth is measured again right after each kernel's timing ("of nearby read BW"):
on a shared VM a busy neighbour that slows the kernel for a while slows that read too, so the
ratio to it tells the kernel from the machine's moment. Matrices that fit
in the LLC are called repeatedly on the same weights (what decode of a small layer sees), so
their fraction can exceed 1; larger ones stream from DRAM on every call. The kernels are called
through ctypes with preallocated buffers, so the Python wrapper's argument checks are not timed.

    .venv/bin/python benchmarks/kernel_matvec.py                 # M=1, per-row scales
    .venv/bin/python benchmarks/kernel_matvec.py --shapes 2048x2048 --paths scalar,avx2
    .venv/bin/python benchmarks/kernel_matvec.py --m 64 --group 128 --json matvec.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

_p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_p.add_argument("--m", type=int, default=1, help="rows of x (1 = decode)")
_p.add_argument("--group", type=int, default=0, help="scale group size G (0 = per row)")
_p.add_argument(
    "--shapes",
    default="576x1536,2048x2048,49152x576,16384x16384,32768x8192",
    help="comma-separated NxK (default: three below a 32 MiB LLC, two above it)",
)
_p.add_argument("--formats", default="2bit,2bit-lut,1.6bit,1bit,int8,int4", help="comma-separated")
_p.add_argument("--acts", default="f32,int8,int7", help="activation modes, comma-separated")
_p.add_argument("--threads", default="1,2", help="kernel thread counts, comma-separated")
_p.add_argument("--paths", default="auto", help="auto (the best this CPU has) or scalar,avx2")
_p.add_argument("--numpy-threads", default="1", help="BLAS threads for the numpy baseline")
_p.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
_p.add_argument("--llc-mib", type=float, default=None, help="override the detected LLC size")
_p.add_argument("--bw-mb", type=int, default=None, help="read-bandwidth buffer (default 2x LLC)")
_p.add_argument("--json", type=Path, default=None, help="also write the rows here")
ARGS = _p.parse_args()
THREADS = [int(v) for v in ARGS.threads.split(",")]
PATHS = ARGS.paths.split(",")
NUMPY_THREADS = int(ARGS.numpy_threads) if ARGS.numpy_threads.isdigit() else None
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = ARGS.numpy_threads  # must be set before numpy loads its BLAS

import numpy as np  # noqa: E402

from ternvlm.bench.machine import beyond_llc_mb, machine_info, read_bandwidth  # noqa: E402
from ternvlm.quant.pack import CODE_RANGE, pack, packed_row_bytes, packed_rows  # noqa: E402
from ternvlm.runtime import kernels  # noqa: E402

PACK_LIMIT = 1 << 25  # codes; bigger matrices get random packed bytes (numpy packing is slow)


def timed_us(fn, budget: float) -> tuple[float, float]:
    """(median, best) microseconds of fn over at least 5 calls and about ``budget`` seconds."""
    fn()  # warm caches and the thread pool
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 2000):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e3, float(np.min(times)) / 1e3


def packed_weights(n: int, k: int, fmt: str, rng) -> np.ndarray:
    """uint8 [n, row bytes]: packed random codes, or random bytes (any byte value is valid)."""
    if n * k > PACK_LIMIT:
        rb, rows = packed_row_bytes(k, fmt), packed_rows(n, fmt)
        return np.frombuffer(rng.bytes(rows * rb), dtype=np.uint8).reshape(rows, rb)
    lo, hi = CODE_RANGE[fmt]
    if fmt == "1bit":
        codes = rng.choice(np.array([-1, 1], dtype=np.int8), (n, k))
    else:
        codes = rng.integers(lo, hi + 1, (n, k), dtype=np.int8)
    return pack(codes, fmt)


def numpy_timed_us(x: np.ndarray, n: int, y: np.ndarray, rng) -> tuple[float, float]:
    """numpy float32 x @ W.T on a random [n, K] W (freed on return: 1 GiB for the big shapes)."""
    w_float = rng.random((n, x.shape[1]), dtype=np.float32)
    w_float -= 0.5
    return timed_us(lambda: np.matmul(x, w_float.T, out=y), ARGS.budget)


def where(nbytes: int, llc: int | None) -> str:
    return "?" if llc is None else ("in LLC" if nbytes <= llc else "beyond LLC")


def bench_shape(
    n: int, k: int, rng, read_gbs: dict[int, float], llc: int | None, bw_mb: int
) -> list[dict]:
    m = ARGS.m
    if ARGS.group and k % ARGS.group:
        sys.exit(f"--group {ARGS.group} does not divide K={k}")
    cols = k // ARGS.group if ARGS.group else 1
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, size=(n, cols)).astype(np.float32)
    y = np.empty((m, n), dtype=np.float32)
    numpy_us, numpy_best = numpy_timed_us(x, n, y, rng)

    def row(nbytes: int, fmt: str, act: str, path: str, threads, us, best, scalar_us=None):
        gbs = nbytes / (us * 1e-6) / 1e9
        best_gbs = nbytes / (best * 1e-6) / 1e9
        ceiling = read_gbs.get(threads)
        nearby = None
        if ceiling is not None and where(nbytes, llc) == "beyond LLC":
            nearby = read_bandwidth(threads, mb=bw_mb, repeats=2)
        return {
            "shape": f"{n}x{k}",
            "weight_bytes": nbytes,
            "vs_llc": where(nbytes, llc),
            "format": fmt,
            "act": act,
            "path": path,
            "threads": threads,
            "median_us": us,
            "best_us": best,
            "weight_gbs": gbs,
            "of_read_bw": None if ceiling is None else gbs / ceiling,
            "of_read_bw_best": None if ceiling is None else best_gbs / ceiling,
            "read_gbs_nearby": nearby,
            "of_read_bw_nearby": None if nearby is None else gbs / nearby,
            "vs_numpy": numpy_us / us,
            "vs_scalar_1t": None if scalar_us is None else scalar_us / us,
        }

    rows = [row(4 * n * k, "float32", "-", "numpy", NUMPY_THREADS, numpy_us, numpy_best)]
    lib = kernels._library()
    for fmt in ARGS.formats.split(","):
        packed = packed_weights(n, k, fmt, rng)
        for act in ARGS.acts.split(","):
            if (fmt == "2bit-lut") != (act == "int7"):
                continue  # 2bit-lut needs int7; int7 elsewhere only repeats int8's speed
            args = (kernels.FORMAT_IDS[fmt], kernels.ACTS[act], x.ctypes.data, m, k)
            args += (packed.ctypes.data, n, scale.ctypes.data, cols, None, 0.0, y.ctypes.data)
            scalar_us = None
            for path in PATHS:
                kernels.force_path(path)
                path_name = kernels.active_path()
                for threads in THREADS:
                    call = functools.partial(lib.tvk_matmul, *args, threads)
                    code = call()
                    if code != 0:
                        sys.exit(f"tvk_matmul {n}x{k} {fmt} act={act} failed with error {code}")
                    us, best = timed_us(call, ARGS.budget)
                    if path_name == "scalar" and threads == 1:
                        scalar_us = us
                    rows.append(
                        row(packed.nbytes, fmt, act, path_name, threads, us, best, scalar_us)
                    )
        del packed
    kernels.force_path("auto")
    return rows


def main() -> None:
    info = machine_info()
    llc = int(ARGS.llc_mib * 2**20) if ARGS.llc_mib is not None else info["llc_bytes"]
    bw_mb = ARGS.bw_mb or beyond_llc_mb(llc)
    bw_threads = sorted(set(THREADS) | ({NUMPY_THREADS} if NUMPY_THREADS else set()))
    read_gbs = {t: read_bandwidth(t, mb=bw_mb) for t in bw_threads}

    rng = np.random.default_rng(0)
    rows = []
    for shape in ARGS.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(n, k, rng, read_gbs, llc, bw_mb)

    scales = "per-row scales" if ARGS.group == 0 else f"scale groups of {ARGS.group}"
    llc_text = "unknown" if llc is None else f"{llc / 2**20:.0f} MiB"
    bw_text = ", ".join(f"{t} thread {g:.1f} GB/s" for t, g in read_gbs.items())
    print(f"{info['cpu']}, {info['cores']} logical cores, LLC {llc_text}")
    print(f"read bandwidth ({bw_mb} MiB buffer): {bw_text}")
    print(f"M={ARGS.m}, {scales}; W is N x K; speedup = time(other) / time(this row)")
    print("weight GB/s = packed weight bytes / median time; of read BW = that / read bandwidth;")
    print("best = the same with the fastest call (the read bandwidth is a best-of as well);")
    print("nearby = median against the read bandwidth measured right after (beyond the LLC)\n")
    print(
        "| N x K | W MiB | vs LLC | format | act | path | threads | median us | weight GB/s "
        "| of read BW | of read BW, best | of nearby read BW | vs numpy f32 | vs scalar 1t |"
    )
    print(
        "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |"
    )
    for r in rows:
        frac = "" if r["of_read_bw"] is None else f"{r['of_read_bw']:.2f}"
        frac_best = "" if r["of_read_bw_best"] is None else f"{r['of_read_bw_best']:.2f}"
        near = r["of_read_bw_nearby"]
        frac_near = "" if near is None else f"{near:.2f}"
        rel = "" if r["vs_scalar_1t"] is None else f"{r['vs_scalar_1t']:.1f}x"
        threads = "" if r["threads"] is None else r["threads"]
        print(
            f"| {r['shape']} | {r['weight_bytes'] / 2**20:.1f} | {r['vs_llc']} | {r['format']} "
            f"| {r['act']} | {r['path']} | {threads} | {r['median_us']:.1f} "
            f"| {r['weight_gbs']:.1f} | {frac} | {frac_best} | {frac_near} "
            f"| {r['vs_numpy']:.2f}x | {rel} |"
        )
    if ARGS.json is not None:
        settings = {k: v for k, v in vars(ARGS).items() if k != "json"}
        out = {
            "machine": info,
            "llc_bytes": llc,
            "read_buffer_mb": bw_mb,
            "read_gbs": {str(t): g for t, g in read_gbs.items()},
            "settings": settings,
            "rows": rows,
        }
        ARGS.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {ARGS.json}")


if __name__ == "__main__":
    main()
