"""`ternvlm bench --quick` runs every variant end to end and writes well-formed outputs.

No times are asserted (benchmarks/ and docs/RESULTS.md hold those): only that each measurement
exists, is positive and is consistent with the files and settings it reports.
"""

from __future__ import annotations

import json
import math

import pytest

from ternvlm.bench.run import VARIANTS, BenchConfig
from ternvlm.cli import main
from ternvlm.errors import TernvlmError

pytest.importorskip("litert_torch")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quick_writes_report(quick):
    result = json.loads((quick / "bench.json").read_text())
    assert result["preset"] == "tiny" and result["settings"]["trained"] is False
    rows = result["rows"]
    assert [(r["variant"], r["threads"]) for r in rows] == [
        (v, t) for t in (1, 2) for v in VARIANTS
    ]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["runtime"] == "litert"
        for key in ("encode_ms", "ttft_ms", "decode_tok_s"):
            s = r[key]
            assert 0 < s["min"] <= s["median"] <= s["max"] and math.isfinite(s["max"])
        assert r["ttft_ms"]["median"] >= r["encode_ms"]["median"]
        assert 0 < r["baseline_rss_mb"] < r["peak_rss_mb"] < 4096
        assert r["file_mb"] == pytest.approx(
            (quick / "files" / f"{r['variant']}.tflite").stat().st_size / 2**20
        )
        assert r["parts"]["embedding"] == "int8" and r["parts"]["head"].startswith("int8")
    by = {(r["variant"], r["threads"]): r for r in rows}
    assert by[("ternary", 1)]["file_mb"] < by[("fp32", 1)]["file_mb"]
    q = result["quantized_layers_mb"]
    assert 0 < q["ternary"] < q["fp32"] / 10  # 2 bits + one fp32 scale per row vs 32 bits
    md = (quick / "bench.md").read_text()
    assert "| ternary | litert | 1 |" in md and "Speed-up vs fp32" in md
    for png in ("bench_bars.png", "bench_pareto.png"):
        data = (quick / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 300_000


@pytest.mark.slow
def test_second_run_reuses_exports(quick):
    """Exports are cached by their settings: a rerun measures again without converting."""
    before = {p.name: p.stat().st_mtime_ns for p in (quick / "files").glob("*.tflite")}
    assert (
        main(
            [
                "bench",
                "--quick",
                "--variants",
                "ternary,fp32",
                "--threads",
                "1",
                "--out",
                str(quick),
            ]
        )
        == 0
    )
    after = {p.name: p.stat().st_mtime_ns for p in (quick / "files").glob("*.tflite")}
    assert before == after
    rows = json.loads((quick / "bench.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["ternary", "fp32"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"variants": ("fp16",)}, "unknown variants"),
        ({"threads": (0,)}, "--threads"),
        ({"repeats": 0}, "--repeats"),
        ({"head": "int2"}, "--head"),
        ({"peer": "vllm"}, "unknown peer"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(TernvlmError, match=match):
        BenchConfig(**kw).validate()


def test_bad_preset_and_model(tmp_path, capsys):
    assert main(["bench", "--preset", "gpt5", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_checks_on_a_known_result():
    from ternvlm.bench.run import PEER_CONFIGS, checks

    def row(v, t, tok, **kw):
        return {"variant": v, "threads": t, "decode_tok_s": {"median": tok}, **kw}

    peer = next(iter(PEER_CONFIGS))
    result = {
        "rows": [
            row("fp32", 1, 20.0),
            row("int8", 1, 50.0),
            row("ternary", 1, 100.0, decode_rss_ratio=1.2),
            row(peer, 1, 110.0),
            row("ternary", 2, 150.0, error="crashed"),
        ],
        "quantized_layers_mb": {"fp32": 400.0, "ternary": 26.0},
    }
    got = {c["check"]: (round(c["measured"], 4), c["holds"]) for c in checks(result)}
    assert got == {
        "ternary / fp32 decode tok/s, 1 thread(s)": (5.0, True),
        "ternary / int8 decode tok/s, 1 thread(s)": (2.0, True),
        f"ternary / {peer} decode tok/s, 1 thread(s)": (round(100 / 110, 4), False),
        "quantized layers: ternary / fp32 bytes": (0.065, True),
        "ternary RSS while decoding / (file + KV), 1 thread(s)": (1.2, True),
    }
