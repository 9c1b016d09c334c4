"""Batch-1 time of our LiteRT custom ops against builtin fp32 and int8 FULLY_CONNECTED.

For each shape a chain of 8 Linear layers (alternating K->N and N->K, so shapes chain) is
k-means ternarized (binary for BinaryMatMul), exported once per variant with litert-torch and run
through our C API driver. Variants are timed round-robin, many rounds, so machine noise hits all
alike; the table gives the median microseconds per layer and the speed ratio to fp32 and int8.

    .venv/bin/python benchmarks/litert_ops.py                 # 576x1536 and 2048x2048, threads 1,2
    .venv/bin/python benchmarks/litert_ops.py --shapes 2048x2048 --threads 1 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

LAYERS = 8
VARIANTS = ["fp32", "int8", "ternary", "ternary158", "binary", "unpack", "ternary-builtin"]


class Chain(nn.Module):
    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        dims = [(k, n) if i % 2 == 0 else (n, k) for i in range(LAYERS)]
        self.decoder = nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


def build(n: int, k: int, variant: str, folder: Path) -> Path:
    """One .tflite with signature ``run(x [1, 1, k])`` for this variant."""
    import litert_torch

    from ternvlm.export import ops
    from ternvlm.export.align import realign
    from ternvlm.export.exporter import _dynamic_int8
    from ternvlm.export.linear import export_copy
    from ternvlm.quant.api import quantize_
    from ternvlm.quant.config import preset

    ops.register_lowerings()
    torch.manual_seed(0)
    m = Chain(n, k)
    for lin in m.decoder:
        nn.init.normal_(lin.weight, std=k**-0.5)
    quantize_(m, preset("binary" if variant == "binary" else "ternvlm", parts=("decoder",)))
    m = export_copy(m, variant).eval()
    with torch.no_grad():
        edge = litert_torch.signature("run", m, sample_kwargs={"x": torch.zeros(1, 1, k)}).convert()
    path = folder / f"{variant}_{n}x{k}.tflite"
    edge.export(str(path))
    data = path.read_bytes()
    if variant == "int8":
        data = _dynamic_int8(data)
    path.write_bytes(realign(data))
    return path


def measure(files: dict[str, Path], threads: int, rounds: int, calls: int) -> dict[str, list]:
    from ternvlm.runtime.litert import LiteRtModel

    models = {v: LiteRtModel(str(p), threads=threads) for v, p in files.items()}
    try:
        for m in models.values():
            m.input_array("run", "x")[...] = 0.1
            for _ in range(20):  # warm-up: caches, thread pools, XNNPACK packing
                m.run("run")
        times: dict[str, list] = {v: [] for v in models}
        for _ in range(rounds):
            for v, m in models.items():  # round-robin: noise hits every variant alike
                t = time.perf_counter()
                for _ in range(calls):
                    m.run("run")
                times[v].append((time.perf_counter() - t) / calls / LAYERS * 1e6)
        return times
    finally:
        for m in models.values():
            m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="576x1536,2048x2048", help="NxK list")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20, help="runs per timing sample")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes.split(","):
            n, k = map(int, shape.split("x"))
            files = {v: build(n, k, v, Path(tmp)) for v in a.variants.split(",")}
            for threads in map(int, a.threads.split(",")):
                times = measure(files, threads, a.rounds, a.calls)
                med = {v: statistics.median(t) for v, t in times.items()}
                for v, t in times.items():
                    rows.append(
                        {
                            "shape": shape,
                            "threads": threads,
                            "variant": v,
                            "us_per_layer": round(med[v], 2),
                            "iqr_us": round(
                                statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0], 2
                            ),
                            "file_bytes": files[v].stat().st_size,
                            "speed_vs_fp32": round(med["fp32"] / med[v], 2)
                            if "fp32" in med
                            else None,
                            "speed_vs_int8": round(med["int8"] / med[v], 2)
                            if "int8" in med
                            else None,
                        }
                    )
    print("| shape NxK | threads | variant | us/layer (median) | IQR | file | x fp32 | x int8 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['threads']} | {r['variant']} | {r['us_per_layer']:.1f} | "
            f"{r['iqr_us']:.1f} | {r['file_bytes'] / 1e6:.2f} MB | {r['speed_vs_fp32']} | "
            f"{r['speed_vs_int8']} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
