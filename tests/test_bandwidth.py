"""tvk_read_bandwidth, ternvlm.bench.machine and benchmarks/bandwidth.py (no timing assertions)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ternvlm.bench import machine
from ternvlm.errors import TernvlmError
from ternvlm.runtime import kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def read_fn():
    return machine._read_kernel()  # tvk_read_bandwidth with its argtypes declared


@pytest.fixture(autouse=True)
def _auto_path():
    yield
    kernels.force_path("auto")


def expected_checksum(data: bytes) -> int:
    """Sum mod 2**64 of little-endian 64-bit words, the last one zero-padded."""
    padded = data + bytes(-len(data) % 8)
    return int(np.frombuffer(padded, dtype="<u8").sum(dtype=np.uint64))


@pytest.mark.parametrize("path", kernels.available_paths())
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("streams", [1, 3, 8])
@pytest.mark.parametrize("nbytes", [1, 7, 8, 31, 33, 129, 1000, 4099, 65536 + 13])
def test_checksum(read_fn, path, threads, streams, nbytes):
    kernels.force_path(path)
    rng = np.random.default_rng(nbytes)
    buf = rng.integers(0, 256, nbytes + 1, dtype=np.uint8)
    for offset in (0, 1):  # an unaligned start too
        view = buf[offset : offset + nbytes]
        want = expected_checksum(view.tobytes())
        out = ctypes.c_int64(-1)
        assert read_fn(view.ctypes.data, nbytes, threads, streams, ctypes.byref(out)) == 0
        assert out.value % 2**64 == want
        assert machine.read_checksum(view, threads, streams) == want


def test_checksum_wraps(read_fn):
    buf = np.full(4096 + 5, 0xFF, dtype=np.uint8)  # every word 2**64 - 1: the sum wraps
    assert machine.read_checksum(buf, 2) == expected_checksum(buf.tobytes())


def test_bad_arguments(read_fn):
    buf = np.zeros(64, dtype=np.uint8)
    out = ctypes.c_int64()
    assert read_fn(None, 64, 1, 1, ctypes.byref(out)) == -1  # TVK_ERR_NULL_POINTER
    assert read_fn(buf.ctypes.data, 64, 1, 1, None) == -1
    assert read_fn(buf.ctypes.data, 0, 1, 1, ctypes.byref(out)) == -2  # TVK_ERR_BAD_SHAPE
    assert read_fn(buf.ctypes.data, -8, 1, 1, ctypes.byref(out)) == -2
    for streams in (0, -1, 65):
        assert read_fn(buf.ctypes.data, 64, 1, streams, ctypes.byref(out)) == -2
    for threads in (0, -1, 65):
        assert read_fn(buf.ctypes.data, 64, threads, 1, ctypes.byref(out)) == -4  # BAD_THREADS
    assert read_fn(buf.ctypes.data, 64, 64, 64, ctypes.byref(out)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threads": 0},
        {"threads": 65},
        {"threads": 1.5},
        {"threads": True},
        {"threads": 1, "mb": 0},
        {"threads": 1, "repeats": 0},
        {"threads": 1, "streams": ()},
        {"threads": 1, "streams": (0,)},
        {"threads": 1, "streams": (1, 65)},
    ],
)
def test_read_bandwidth_bad_arguments(kwargs):
    with pytest.raises(TernvlmError):
        machine.read_bandwidth(**kwargs)


def test_read_bandwidth_small():
    assert machine.read_bandwidth(2, mb=1, repeats=1) > 0


def test_read_bandwidth_by_streams():
    got = machine.read_bandwidth_by_streams(1, mb=1, repeats=1, streams=(1, 4))
    assert list(got) == [1, 4] and all(v > 0 for v in got.values())
    assert list(machine.read_bandwidth_by_streams(1, mb=1, repeats=1, streams=2)) == [2]


def test_machine_info_keys():
    info = machine.machine_info()
    keys = {"cpu", "cores", "llc_bytes", "llc_mib", "ram_bytes", "avx2"}
    assert keys | {"python", "torch", "numpy"} <= set(info)
    assert info["numpy"] == np.__version__
    json.dumps(info)  # benchmark output


def test_llc_bytes_missing_and_parsed(tmp_path):
    assert machine.llc_bytes(tmp_path / "absent") is None
    for name, level, kind, size in [
        ("index0", 1, "Data", "48K"),
        ("index1", 1, "Instruction", "64K"),
        ("index2", 2, "Unified", "2048K"),
        ("index3", 3, "Unified", "32M"),
        ("index4", 4, "Unified", "garbage"),  # unparsable sizes are skipped
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert machine.llc_bytes(tmp_path) == 32 << 20
    assert machine.beyond_llc_mb(32 << 20) == 512
    assert machine.beyond_llc_mb(480 << 20) == 960
    assert machine.beyond_llc_mb(None) == 512


def test_bandwidth_script(tmp_path):
    out = tmp_path / "bw.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bandwidth.py"), "--sizes-mb", "1"]
    cmd += ["--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert "| 1 |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["rows"][0]["read_gbs"]) == {"1", "2"}
    assert all(v > 0 for v in data["rows"][0]["read_gbs"].values())
    assert data["rows"][0]["mb"] == 1 and "cpu" in data["machine"]
    assert set(data["rows"][0]["by_streams_gbs"]["1"]) == {"1", "2", "4", "8"}
    best = data["rows"][0]["best_streams"]["1"]
    assert data["rows"][0]["read_gbs"]["1"] == data["rows"][0]["by_streams_gbs"]["1"][str(best)]


def test_kernel_matvec_script(tmp_path):
    out = tmp_path / "mv.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_matvec.py"), "--shapes", "64x96"]
    cmd += ["--formats", "2bit,int8", "--acts", "int8", "--threads", "1,2", "--budget", "0.01"]
    cmd += ["--bw-mb", "1", "--llc-mib", "0.001", "--json", str(out)]  # all "beyond the LLC"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert "| 64x96 |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["threads"]) for r in rows[1:]] == [
        ("2bit", 1),
        ("2bit", 2),
        ("int8", 1),
        ("int8", 2),
    ]
    for r in rows:
        assert 0 < r["best_us"] <= r["median_us"]
        assert r["vs_llc"] == "beyond LLC"
        assert r["of_read_bw_best"] >= r["of_read_bw"] > 0
        # the ceiling read again after the kernel's timing, and the ratio to it
        assert r["read_gbs_nearby"] > 0
        assert r["of_read_bw_nearby"] == pytest.approx(r["weight_gbs"] / r["read_gbs_nearby"])
