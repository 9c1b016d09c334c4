"""Batch-1 (decode) timing of the compiled kernels against a numpy float32 matmul.

For each weight shape N x K and format: median microseconds of y[M, N] = x[M, K] . W^T for the
scalar and AVX2 paths at 1 and 2 threads, next to numpy's float32 ``x @ W.T`` on the dequantized
weights (single-threaded BLAS unless --numpy-threads says otherwise). The kernels are called through
ctypes directly with preallocated buffers, so the Python wrapper's argument checks are not timed.

    .venv/bin/python benchmarks/kernel_matvec.py                # M=1, per-row scales
    .venv/bin/python benchmarks/kernel_matvec.py --m 64 --group 128
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

_p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_p.add_argument("--m", type=int, default=1, help="rows of x (1 = decode)")
_p.add_argument("--group", type=int, default=0, help="scale group size G (0 = per row)")
_p.add_argument("--shapes", default="576x1536,2048x2048", help="comma-separated NxK")
_p.add_argument("--numpy-threads", default="1", help="BLAS threads for the numpy baseline")
_p.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
ARGS = _p.parse_args()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = ARGS.numpy_threads  # must be set before numpy loads its BLAS

import numpy as np  # noqa: E402

from ternvlm.quant.pack import pack  # noqa: E402
from ternvlm.runtime import kernels  # noqa: E402

FUNCS = {
    "2bit": "tvk_ternary_matmul_2bit",
    "1.6bit": "tvk_ternary_matmul_1p6bit",
    "1bit": "tvk_binary_matmul_1bit",
}


def median_us(fn, budget: float) -> float:
    fn()  # warm caches and the thread pool
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 2000):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e3


def bench_shape(n: int, k: int, rng) -> list[tuple]:
    m = ARGS.m
    if ARGS.group and k % ARGS.group:
        sys.exit(f"--group {ARGS.group} does not divide K={k}")
    cols = k // ARGS.group if ARGS.group else 1
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, size=(n, cols)).astype(np.float32)
    y = np.empty((m, n), dtype=np.float32)
    w_float = rng.standard_normal((n, k)).astype(np.float32)
    numpy_us = median_us(lambda: np.matmul(x, w_float.T, out=y), ARGS.budget)
    rows = [(f"{n}x{k}", "float32", "numpy", ARGS.numpy_threads, numpy_us, 1.0, None)]

    lib = kernels._library()
    for fmt, name in FUNCS.items():
        codes = rng.choice([-1, 1], (n, k)) if fmt == "1bit" else rng.integers(-1, 2, (n, k))
        packed = pack(codes, fmt)
        fn = getattr(lib, name)
        args = (x.ctypes.data, m, k, packed.ctypes.data, n, scale.ctypes.data, cols, None, 0.0)
        scalar_us = None
        for path in kernels.available_paths():
            kernels.force_path(path)
            for threads in (1, 2):
                call = functools.partial(fn, *args, y.ctypes.data, threads)
                if call() != 0:
                    sys.exit(f"{name} failed with error {call()}")
                us = median_us(call, ARGS.budget)
                if path == "scalar" and threads == 1:
                    scalar_us = us
                rows.append((f"{n}x{k}", fmt, path, threads, us, numpy_us / us, scalar_us / us))
    kernels.force_path("auto")
    return rows


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for shape in ARGS.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(n, k, rng)
    scales = "per-row scales" if ARGS.group == 0 else f"scale groups of {ARGS.group}"
    print(f"M={ARGS.m}, {scales}; W is N x K; speedup = time(other) / time(this row)\n")
    print("| N x K | format | path | threads | median us | vs numpy f32 | vs scalar 1t |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: |")
    for shape, fmt, path, threads, us, vs_np, vs_scalar in rows:
        rel = "" if vs_scalar is None else f"{vs_scalar:.1f}x"
        print(f"| {shape} | {fmt} | {path} | {threads} | {us:.1f} | {vs_np:.2f}x | {rel} |")


if __name__ == "__main__":
    main()
