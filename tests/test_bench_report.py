"""bench report: markdown table, strict atomic JSON and small valid PNGs from a synthetic result."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest

from ternvlm.bench import report
from ternvlm.errors import TernvlmError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stat(median: float, lo: float, hi: float) -> dict[str, float]:
    return {"median": median, "min": lo, "max": hi}


def row(variant: str, threads: int, decode: float | None, **kw) -> dict:
    r = {
        "variant": variant,
        "runtime": "litert",
        "threads": threads,
        "parts": {"layers": "ternary 2-bit", "head": "int8"},
        "file_mb": 50.0,
        "peak_rss_mb": 80.0,
        "baseline_rss_mb": 30.0,
        "kv_cache_mb": 3.1,
        "encode_ms": stat(120.0, 118.0, 130.0),
        "ttft_ms": stat(40.0, 38.0, 45.0),
        "decode_tok_s": None if decode is None else stat(decode, decode - 1, decode + 1),
        "perplexity": 1.25,
        "qa_accuracy": 0.875,
        "error": None,
    }
    r.update(kw)
    return r


def synthetic() -> dict:
    fp32_parts = {"layers": "fp32", "head": "fp32", "embedding": "fp32"}
    peer_parts = {"layers": "TQ2_0 x 14", "head": "Q4_0", "embedding": "Q4_0"}
    return {
        "model": "tiny",
        "command": "ternvlm bench --model tiny",
        "date": "2026-12-01T00:00:00Z",
        "machine": {"cpu": "Test CPU", "cores": 2, "read_gbs": {"1": 20.0, "2": 30.0}},
        "settings": {"prompt_tokens": 32, "gen_tokens": 64, "repeats": 5},
        "rows": [
            row("fp32", 1, 10.0, parts=fp32_parts, file_mb=400.0, peak_rss_mb=450.0),
            row("fp32", 2, 16.0, parts=fp32_parts, file_mb=400.0, peak_rss_mb=452.0),
            row("ternary", 1, 25.0, perplexity=1.3),
            row("ternary", 2, 36.0, perplexity=1.3),
            # failed: only the file size is known; the error text has a pipe and a newline
            row(
                "int8",
                1,
                None,
                encode_ms=None,
                ttft_ms=None,
                peak_rss_mb=None,
                perplexity=None,
                qa_accuracy=None,
                error="converter crashed | exit 139\nsee log",
            ),
            # no perplexity, no TTFT: shown as missing
            row("binary", 2, 40.0, perplexity=None, ttft_ms=None, qa_accuracy=None),
            # the peer: another runtime, no perplexity, no encoder
            row(
                "llama.cpp TQ2_0",
                1,
                30.0,
                runtime="llama.cpp",
                parts=peer_parts,
                encode_ms=None,
                perplexity=None,
                qa_accuracy=None,
                file_mb=20.0,
                peak_rss_mb=60.0,
            ),
        ],
    }


def table(md: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the one markdown table, cells split on unescaped pipes."""
    lines = [line for line in md.splitlines() if line.startswith("|")]

    def cells(line: str) -> list[str]:
        parts = line.replace("\\|", "\0").strip().strip("|").split("|")
        return [c.strip().replace("\0", "\\|") for c in parts]

    return cells(lines[0]), [cells(line) for line in lines[2:]]


def by_variant(md: str) -> dict[tuple[str, str], dict[str, str]]:
    head, body = table(md)
    return {(r[0], r[2]): dict(zip(head, r, strict=True)) for r in body}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = synthetic()
    paths = report.write_report(result, out)
    return result, out, paths


def test_files_written_atomically(written):
    _, out, paths = written
    assert set(paths) == {"json", "md", "bars", "pareto"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())


def test_json_round_trips(written):
    result, _, paths = written
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == result


def test_json_is_strict(tmp_path):
    result = synthetic()
    result["rows"][0]["peak_rss_mb"] = float("nan")
    result["rows"][0]["file_mb"] = math.inf
    result["out"] = tmp_path  # a Path
    saved = copy.deepcopy(result["rows"][1])
    path = report.write_json(result, tmp_path / "b.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["rows"][0]["peak_rss_mb"] is None and back["rows"][0]["file_mb"] is None
    assert back["out"] == str(tmp_path) and back["rows"][1] == saved


def test_pngs_are_small_and_valid(written):
    _, _, paths = written
    for key in ("bars", "pareto"):
        w, h = png_size(paths[key])
        assert 300 < w <= 1600 and 200 < h <= 1000, (key, w, h)  # dpi 100
        assert 5_000 < paths[key].stat().st_size < 150_000


def test_markdown_columns_and_rows(written):
    result, _, paths = written
    md = paths["md"].read_text(encoding="utf-8")
    assert md == report.markdown_table(result)
    head, body = table(md)
    assert head == [
        "Variant",
        "Runtime",
        "Threads",
        "Embedding",
        "Layers",
        "Head",
        "File MB",
        "Peak RSS MB",
        "Decode RSS MB",
        "Encode ms",
        "TTFT ms",
        "Decode tok/s",
        "Speed-up vs fp32",
        "Perplexity",
        "QA accuracy",
        "Error",
    ]
    assert all(len(r) == len(head) for r in body)
    assert len(body) == len(result["rows"])  # one line per (variant, threads)
    assert [r[2] for r in body] == ["1", "1", "1", "1", "2", "2", "2"]  # grouped by threads
    assert "`ternvlm bench --model tiny`" in md and "Test CPU" in md


def test_speedup_vs_fp32_at_same_threads(written):
    rows = by_variant(written[2]["md"].read_text(encoding="utf-8"))
    speed = {k: r["Speed-up vs fp32"] for k, r in rows.items()}
    assert speed == {
        ("fp32", "1"): "1.00x",
        ("fp32", "2"): "1.00x",
        ("ternary", "1"): "2.50x",  # 25 / 10
        ("ternary", "2"): "2.25x",  # 36 / 16, not 36 / 10
        ("binary", "2"): "2.50x",  # 40 / 16
        ("llama.cpp TQ2_0", "1"): "3.00x",  # 30 / 10: the peer against our fp32
        ("int8", "1"): "–",  # failed
    }


def test_cells_values_missing_and_errors(written):
    rows = by_variant(written[2]["md"].read_text(encoding="utf-8"))
    t = rows[("ternary", "1")]
    assert t["Decode tok/s"] == "25.0 (24.0–26.0)"
    assert t["TTFT ms"] == "40.0 (38.0–45.0)"
    assert t["Encode ms"] == "120 (118–130)"
    assert t["Layers"] == "ternary 2-bit" and t["Head"] == "int8" and t["Embedding"] == "–"
    assert t["Perplexity"] == "1.30" and t["QA accuracy"] == "87.5%" and t["Error"] == ""
    b = rows[("binary", "2")]
    assert b["Perplexity"] == "–" and b["TTFT ms"] == "–" and b["QA accuracy"] == "–"
    e = rows[("int8", "1")]
    assert e["Error"] == "converter crashed \\| exit 139 see log"
    assert e["Decode tok/s"] == "–" and e["Peak RSS MB"] == "–" and e["File MB"] == "50.0"
    p = rows[("llama.cpp TQ2_0", "1")]
    assert p["Runtime"] == "llama.cpp" and p["Layers"] == "TQ2_0 x 14" and p["Head"] == "Q4_0"
    assert p["Encode ms"] == "–" and p["Peak RSS MB"] == "60.0"


def test_no_error_column_without_errors():
    result = synthetic()
    result["rows"] = [r for r in result["rows"] if not r["error"]]
    head, _ = table(report.markdown_table(result))
    assert "Error" not in head


def test_no_fp32_means_no_speedup(tmp_path):
    result = {"rows": [row("ternary", 1, 20.0), row("fp32", 2, 10.0)]}
    rows = by_variant(report.markdown_table(result))
    assert rows[("ternary", "1")]["Speed-up vs fp32"] == "–"
    assert rows[("fp32", "2")]["Speed-up vs fp32"] == "1.00x"


def test_plots_without_perplexity_or_data(tmp_path):
    result = synthetic()
    for r in result["rows"]:
        r["perplexity"] = None
    report.plot_pareto(result, tmp_path / "p.png")
    png_size(tmp_path / "p.png")
    failed = {"rows": [row("fp32", 1, None, error="boom")]}
    paths = report.write_report(failed, tmp_path / "failed")
    for key in ("bars", "pareto"):
        png_size(paths[key])
    assert "boom" in paths["md"].read_text()


def test_pareto_front():
    pts = [(10.0, 5.0), (20.0, 8.0), (15.0, 4.0), (30.0, 8.0), (5.0, 1.0)]
    assert report.pareto_front(pts) == [4, 0, 1]


@pytest.mark.parametrize("bad", [None, {}, {"rows": []}, {"rows": [1]}])
def test_nothing_to_report(bad, tmp_path):
    with pytest.raises(TernvlmError):
        report.write_report(bad, tmp_path)
