"""Memory read bandwidth of this machine at 1 and 2 threads, in and beyond the last-level cache.

The ceiling for batch-1 decode: every weight byte is read once per token, so a kernel cannot beat
these numbers on matrices larger than the LLC (benchmarks/kernel_matvec.py reports each kernel as
a fraction of them). GB/s = 1e9 bytes/s, best of --repeats reads of one buffer (tvk_read_bandwidth),
each thread reading its part as 1, 2, 4 and 8 interleaved sequential streams: the ceiling is the
best of them (AMD CPUs stream faster with several), and the per-stream numbers go to --json.

    .venv/bin/python benchmarks/bandwidth.py                          # 4, 16, 256, 1024 MiB
    .venv/bin/python benchmarks/bandwidth.py --sizes-mb 1,64 --json bandwidth.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ternvlm.bench.machine import STREAMS, machine_info, read_bandwidth_by_streams
from ternvlm.errors import TernvlmError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", default="4,16,256,1024", help="comma-separated buffer sizes, MiB")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--repeats", type=int, default=5, help="timed reads per size (best is kept)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes_mb.split(",")]
    threads = [int(v) for v in args.threads.split(",")]

    info = machine_info()
    llc = info["llc_bytes"]
    rows = []
    for mb in sizes:
        where = "?" if llc is None else ("in LLC" if mb << 20 <= llc else "beyond LLC")
        try:
            by_streams = {
                str(t): read_bandwidth_by_streams(t, mb=mb, repeats=args.repeats) for t in threads
            }
        except TernvlmError as e:
            sys.exit(f"error: {e}")
        gbs = {t: max(v.values()) for t, v in by_streams.items()}
        best_streams = {t: max(v, key=v.get) for t, v in by_streams.items()}
        per_stream = {t: {str(s): g for s, g in v.items()} for t, v in by_streams.items()}
        rows.append(
            {
                "mb": mb,
                "where": where,
                "read_gbs": gbs,
                "best_streams": best_streams,
                "by_streams_gbs": per_stream,
            }
        )

    llc_text = "unknown" if llc is None else f"{info['llc_mib']} MiB"
    print(f"{info['cpu']}, {info['cores']} logical cores, LLC {llc_text}; GB/s = 1e9 B/s\n")
    streams = "/".join(str(s) for s in STREAMS)
    print(f"best of {streams} streams per thread (in brackets: GB/s with one stream)\n")
    print("| buffer MiB | vs LLC | " + " | ".join(f"{t} thread GB/s" for t in threads) + " |")
    print("| ---: | --- |" + " ---: |" * len(threads))
    for r in rows:
        cells = " | ".join(
            f"{r['read_gbs'][str(t)]:.1f} ({r['by_streams_gbs'][str(t)]['1']:.1f})" for t in threads
        )
        print(f"| {r['mb']} | {r['where']} | {cells} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
