"""Turn a ``ternvlm bench`` result dict into bench.json, a markdown table and two PNG charts.

The result dict (what ``ternvlm bench`` produces; every metric may be missing or ``None``)::

    {
      "model": "smolvlm-256m",                 # model name or path
      "preset": "smolvlm-256m" | None,
      "command": "ternvlm bench --preset smolvlm-256m",
      "date": "2026-11-25T06:00:00Z",
      "machine": {"cpu": "AMD EPYC", "cores": 2, "llc_mib": 32,
                  "read_gbs": {"1": 21.0, "2": 32.6}},      # any keys, all optional
      "settings": {"prompt_tokens": 32, "gen_tokens": 64, "repeats": 5},  # any keys
      "rows": [
        {
          "variant": "ternary",                # fp32 | int8 | ternary | ... | llama.cpp TQ2_0
          "runtime": "litert",                 # "litert" | "llama.cpp"
          "threads": 1,
          "parts": {"layers": "ternary 2-bit", "head": "int8",
                    "embedding": "int8", "vision": "ternary 2-bit"},  # part -> precision
          "file_mb": 54.1,
          "peak_rss_mb": 80.2,
          "baseline_rss_mb": 30.0,             # child RSS before loading the model
          "kv_cache_mb": 3.1,
          "encode_ms": {"median": 120.0, "min": 118.0, "max": 130.0} | None,
          "ttft_ms": {"median": ..., "min": ..., "max": ...} | None,
          "decode_tok_s": {"median": ..., "min": ..., "max": ...} | None,
          "perplexity": 1.18 | None,
          "qa_accuracy": 0.89 | None,          # a fraction in [0, 1]
          "error": None | "text",              # the variant failed: row kept, error shown
        },
      ],
    }

A metric may also be a bare number instead of a {median, min, max} dict. Rows with an error or
missing metrics are shown as such in the table ("–" for a missing value) and left out of the
plots; only a result without rows is an error (:class:`~ternvlm.errors.TernvlmError`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TernvlmError

Row = dict[str, Any]

MISSING = "–"  # en dash: a value that was not measured

#: Metrics drawn by :func:`plot_bars`: (row key, subplot title).
BAR_METRICS: list[tuple[str, str]] = [
    ("decode_tok_s", "Decode tok/s (higher is better)"),
    ("ttft_ms", "Time to first token ms"),
    ("peak_rss_mb", "Peak RSS MB"),
    ("file_mb", "File MB"),
]

#: Parts shown first, in this order, when rows name them; any other part follows.
PART_ORDER = ["vision", "connector", "embedding", "layers", "head"]

DPI = 100


# --------------------------------------------------------------------------- helpers


def _rows(result: Any) -> list[Row]:
    """The rows of ``result``, or a clear error: nothing to report is a user mistake."""
    if not isinstance(result, dict):
        raise TernvlmError(f"bench result must be a dict, got {type(result).__name__}")
    rows = result.get("rows")
    if not isinstance(rows, list) or not rows:
        raise TernvlmError("bench result has no rows: nothing was measured, nothing to report")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise TernvlmError(f"bench result rows {bad} are not dicts")
    return rows


def _finite(x: Any) -> float | None:
    """``x`` as a float when it is a real finite number (bools and strings are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _stat(value: Any) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of a metric given as a number or a {median, min, max} dict."""
    if isinstance(value, dict):
        return _finite(value.get("median")), _finite(value.get("min")), _finite(value.get("max"))
    return _finite(value), None, None


def _median(row: Row, key: str) -> float | None:
    """The median of a metric for a row that did not fail, else ``None`` (plots skip it)."""
    if row.get("error"):
        return None
    return _stat(row.get(key))[0]


def _fmt(x: float | None) -> str:
    """About three significant digits without scientific notation; "–" when missing."""
    if x is None:
        return MISSING
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_stat(value: Any) -> str:
    """``median (min–max)`` when a spread is known, the bare median otherwise."""
    med, lo, hi = _stat(value)
    if med is None:
        return MISSING
    if lo is None or hi is None:
        return _fmt(med)
    return f"{_fmt(med)} ({_fmt(lo)}–{_fmt(hi)})"


def _cell(text: Any, limit: int = 160) -> str:
    """One markdown table cell: single line, pipes escaped, long text cut."""
    if text is None or text == "":
        return MISSING
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return s.replace("|", "\\|")


def _threads_key(t: Any) -> tuple[int, str]:
    """Sort thread counts numerically, unknown ones last."""
    if isinstance(t, int) and not isinstance(t, bool):
        return (t, "")
    return (1 << 30, str(t))


def _threads_label(t: Any) -> str:
    return f"{t} thread" + ("" if t == 1 else "s")


def _is_fp32(row: Row) -> bool:
    return str(row.get("variant", "")).strip().lower() == "fp32"


def _parts(row: Row) -> dict[str, Any]:
    parts = row.get("parts")
    return parts if isinstance(parts, dict) else {}


def part_names(rows: list[Row]) -> list[str]:
    """The parts named by any row: :data:`PART_ORDER` first, then others in order of appearance."""
    seen: list[str] = []
    for r in rows:
        for k in _parts(r):
            if str(k) not in seen:
                seen.append(str(k))
    known = [p for p in PART_ORDER if p in seen]
    return known + [p for p in seen if p not in PART_ORDER]


def sorted_rows(rows: list[Row]) -> list[Row]:
    """Rows grouped by thread count (ascending), input order kept within a thread count."""
    return sorted(rows, key=lambda r: _threads_key(r.get("threads")))


def fp32_decode_by_threads(rows: list[Row]) -> dict[Any, float]:
    """Decode tok/s (median) of the fp32 reference at each thread count.

    The baseline of the speed-up column: speed-ups only mean something at equal threads.
    A litert fp32 row wins over one from another runtime; failed rows never count.
    """
    base: dict[Any, float] = {}
    ordered = sorted(rows, key=lambda r: str(r.get("runtime", "litert")) != "litert")
    for r in ordered:
        if not _is_fp32(r):
            continue
        med = _median(r, "decode_tok_s")
        if med is not None and med > 0 and r.get("threads") not in base:
            base[r.get("threads")] = med
    return base


def speedup(row: Row, base: dict[Any, float]) -> float | None:
    """``row``'s decode tok/s over the fp32 one at the same threads; None when either is unknown."""
    med = _median(row, "decode_tok_s")
    ref = base.get(row.get("threads"))
    if med is None or not ref:
        return None
    return med / ref


def _machine_line(machine: Any) -> str:
    """A compact one-line description of the machine; unknown keys shown as key=value."""
    if not isinstance(machine, dict) or not machine:
        return MISSING
    parts: list[str] = []
    rest = dict(machine)
    if "cpu" in rest:
        parts.append(str(rest.pop("cpu")))
    if "cores" in rest:
        parts.append(f"{rest.pop('cores')} cores")
    if "llc_mib" in rest:
        parts.append(f"LLC {rest.pop('llc_mib')} MiB")
    if isinstance(rest.get("read_gbs"), dict):
        bw = rest.pop("read_gbs")
        parts.append("read GB/s " + ", ".join(f"{_fmt(_finite(v))} @{k}t" for k, v in bw.items()))
    for k, v in rest.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv}" for kk, vv in v.items())
        parts.append(f"{k}={v}")
    return _cell("; ".join(parts), limit=400)


def _qa(x: Any) -> str:
    qa = _finite(x)
    if qa is None:
        return MISSING
    return f"{100 * qa:.1f}%" if 0 <= qa <= 1 else _fmt(qa)


# --------------------------------------------------------------------------- markdown


def markdown_table(result: dict) -> str:
    """The human summary: a header (model, command, machine, settings) and one GitHub table.

    One line per row of ``result`` (a (variant, runtime, threads) measurement), grouped by
    thread count. Columns: variant, runtime, threads, the precision of each part, file MB,
    peak RSS MB, encode ms, TTFT ms, decode tok/s, speed-up vs fp32, perplexity, QA accuracy,
    and an Error column when any row failed. Times read ``median (min–max)``, missing values "–".
    """
    rows = sorted_rows(_rows(result))
    parts = part_names(rows)
    has_error = any(r.get("error") for r in rows)
    columns = ["Variant", "Runtime", "Threads"]
    columns += [p.replace("_", " ").capitalize() for p in parts]
    columns += [
        "File MB",
        "Peak RSS MB",
        "Decode RSS MB",
        "Encode ms",
        "TTFT ms",
        "Decode tok/s",
        "Speed-up vs fp32",
        "Perplexity",
        "QA accuracy",
    ]
    if has_error:
        columns.append("Error")
    n_text = 3 + len(parts)  # left-aligned text columns, then numbers (error text: left)

    model = result.get("model") or result.get("preset") or "?"
    lines = [f"## ternvlm bench: {_cell(model)}", ""]
    if result.get("command"):
        lines.append(f"- Command: `{' '.join(str(result['command']).split())}`")
    if result.get("date"):
        lines.append(f"- Date: {_cell(result['date'])}")
    lines.append(f"- Machine: {_machine_line(result.get('machine'))}")
    settings = result.get("settings")
    if isinstance(settings, dict) and settings:
        lines.append(
            "- Settings: " + _cell(", ".join(f"{k}={v}" for k, v in settings.items()), 400)
        )
    lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    align = ["---" if i < n_text or c == "Error" else "---:" for i, c in enumerate(columns)]
    lines.append("|" + "|".join(align) + "|")

    base = fp32_decode_by_threads(rows)
    for r in rows:
        p = _parts(r)
        ratio = speedup(r, base)
        cells = [_cell(r.get("variant")), _cell(r.get("runtime")), _cell(r.get("threads"))]
        cells += [_cell(p.get(name)) for name in parts]
        cells += [
            _fmt(_finite(r.get("file_mb"))),
            _fmt(_finite(r.get("peak_rss_mb"))),
            _fmt(_finite(r.get("decode_peak_rss_mb"))),
            _fmt_stat(r.get("encode_ms")),
            _fmt_stat(r.get("ttft_ms")),
            _fmt_stat(r.get("decode_tok_s")),
            MISSING if ratio is None else f"{ratio:.2f}x",
            _fmt(_finite(r.get("perplexity"))),
            _qa(r.get("qa_accuracy")),
        ]
        if has_error:
            cells.append(_cell(r.get("error")) if r.get("error") else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Times are median (min–max) over repeats. Speed-up vs fp32: decode tok/s divided by the "
        "fp32 variant's at the same thread count (– when there is no fp32 row for those threads). "
        "Peak RSS: the whole run, image encoding included; Decode RSS: after a text-only prefill "
        "and decode, before the image encoder ran (both include the runtime's baseline)."
    )
    found = result.get("checks")
    if isinstance(found, list) and found:
        lines += [
            "",
            "| Check (targets set for SmolVLM-256M shapes) | Measured | Target | Holds |",
            "|---|---:|---|---|",
        ]
        for c in found:
            ok = "yes" if c.get("holds") else "**no**"
            m = _finite(c.get("measured"))
            lines.append(
                f"| {_cell(c.get('check'))} | {MISSING if m is None else f'{m:.3g}'} | "
                f"{_cell(c.get('target'))} | {ok} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _figure(figsize: tuple[float, float]) -> Any:
    """A Figure drawn by the Agg canvas: headless (CI, ssh, child processes), no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _colors(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def _series(rows: list[Row]) -> list[tuple[tuple[str, str], str]]:
    """Unique (variant, runtime) pairs in row order with their legend labels.

    The runtime is added to the label only when a variant name is used by several runtimes.
    """
    keys: list[tuple[str, str]] = []
    for r in rows:
        k = (str(r.get("variant", "?")), str(r.get("runtime", "")))
        if k not in keys:
            keys.append(k)
    names = [v for v, _ in keys]
    return [(k, k[0] if names.count(k[0]) == 1 else f"{k[0]} ({k[1]})") for k in keys]


def _key(r: Row) -> tuple[str, str]:
    return (str(r.get("variant", "?")), str(r.get("runtime", "")))


def plot_bars(result: dict, path: Path) -> Path:
    """Grouped bars, one subplot per metric (decode tok/s, TTFT, peak RSS, file MB).

    x groups are thread counts; inside a group one bar per (variant, runtime), the same colour in
    every subplot; whiskers span min..max over repeats. Failed rows and missing values are left out.
    """
    rows = _rows(result)
    series = _series([r for r in rows if not r.get("error")])  # failed variants take no slot
    threads = sorted({r.get("threads") for r in rows}, key=_threads_key)
    n_series = max(1, len(series))
    width = min(16.0, max(9.0, 0.22 * n_series * len(threads) * 2 + 4))
    fig = _figure((width, 7.2))
    axes = fig.subplots(2, 2).flat
    cmap = _colors("tab10" if n_series <= 10 else "tab20")
    bar_w = 0.8 / n_series
    for ax, (key, title) in zip(axes, BAR_METRICS, strict=True):
        drawn = False
        for si, (sk, label) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for ti, t in enumerate(threads):
                match = [
                    r
                    for r in rows
                    if _key(r) == sk and r.get("threads") == t and _median(r, key) is not None
                ]
                if not match:
                    continue
                med, mn, mx = _stat(match[0].get(key))
                xs.append(ti - 0.4 + bar_w * (si + 0.5))
                ys.append(med)
                lo.append(med - mn if mn is not None and mn <= med else 0.0)
                hi.append(mx - med if mx is not None and mx >= med else 0.0)
            if not xs:
                continue
            drawn = True
            yerr = [lo, hi] if any(lo) or any(hi) else None
            ax.bar(
                xs,
                ys,
                bar_w * 0.9,
                yerr=yerr,
                capsize=2,
                color=cmap(si % cmap.N),
                label=label,
                error_kw={"elinewidth": 0.8},
            )
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(threads)))
        ax.set_xticklabels([_threads_label(t) for t in threads], fontsize=9)
        ax.set_xlim(-0.5, len(threads) - 0.5)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = [labels.index(lab) for _, lab in series if lab in labels]
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    ncol = min(len(labels), 7) or 1
    legend_rows = math.ceil(len(labels) / ncol) if labels else 0
    if handles:
        fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=ncol, frameon=False)
    fig.suptitle(f"ternvlm bench: {result.get('model') or '?'}", fontsize=11)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.01, 1, 0.97))
    return _save(fig, path)


def _memory_key(rows: list[Row]) -> tuple[str, str]:
    """Peak RSS when it places at least as many points as file size does, else file size.

    One quantity for the whole axis: mixing RSS and file MB per point would mislead.
    """

    def count(key: str) -> int:
        return sum(
            _median(r, key) is not None and _median(r, "decode_tok_s") is not None for r in rows
        )

    if count("peak_rss_mb") >= count("file_mb"):
        return "peak_rss_mb", "Peak RSS MB"
    return "file_mb", "File MB (no peak RSS measured)"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (less or equal memory x, more or equal speed y,
    one of them strictly), ordered by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(result: dict, path: Path) -> Path:
    """Decode speed against memory, one marker per (variant, threads): the trade-off at a glance.

    x: peak RSS MB (file MB when RSS was not measured), y: median decode tok/s with min..max
    whiskers, marker shape: thread count, colour: perplexity (colour bar) when any row has one,
    else the runtime. Dashed lines join each thread count's Pareto front (up and left is better).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows = _rows(result)
    xkey, xlabel = _memory_key(rows)
    pts = [
        r for r in rows if _median(r, xkey) is not None and _median(r, "decode_tok_s") is not None
    ]
    threads = sorted({r.get("threads") for r in rows}, key=_threads_key)
    runtimes = list(dict.fromkeys(str(r.get("runtime", "?")) for r in rows))
    ppls = [p for p in (_finite(r.get("perplexity")) for r in pts) if p is not None]
    markers = "os^DvP*X"
    tab = _colors("tab10")
    fig = _figure((8.0, 5.4))
    ax = fig.subplots()
    norm = cmap = None
    if ppls:
        cmap = _colors("viridis_r")  # dark = high perplexity (worse), bright = low
        lo, hi = min(ppls), max(ppls)
        norm = Normalize(lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else Normalize(lo, hi)
    for t in threads:
        mine = [r for r in pts if r.get("threads") == t]
        if not mine:
            continue
        marker = markers[threads.index(t) % len(markers)]
        xy = [(_median(r, xkey), _median(r, "decode_tok_s")) for r in mine]
        front = pareto_front(xy)  # type: ignore[arg-type]
        if len(front) > 1:
            ax.plot(
                [xy[i][0] for i in front],
                [xy[i][1] for i in front],
                ls="--",
                lw=0.8,
                color="0.5",
                zorder=1,
            )
        for r, (x, y) in zip(mine, xy, strict=True):
            _, lo_s, hi_s = _stat(r.get("decode_tok_s"))
            if lo_s is not None and hi_s is not None and lo_s <= y <= hi_s:
                ax.errorbar(
                    [x],
                    [y],
                    yerr=[[y - lo_s], [hi_s - y]],
                    fmt="none",
                    ecolor="0.4",
                    elinewidth=0.8,
                    capsize=2,
                    zorder=2,
                )
            ppl = _finite(r.get("perplexity"))
            rt = str(r.get("runtime", "?"))
            if cmap is not None and ppl is not None:
                color, edge = cmap(norm(ppl)), "black"
            elif cmap is not None:
                color, edge = "white", "0.3"  # no perplexity for this row: hollow
            else:
                color, edge = tab(runtimes.index(rt) % tab.N), "black"
            ax.scatter(
                [x], [y], s=55, marker=marker, c=[color], edgecolors=edge, linewidths=0.6, zorder=3
            )
            ax.annotate(
                f"{r.get('variant', '?')}",
                (x, y),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=7,
            )
    # Legend: shapes for thread counts; colours for runtimes unless they show perplexity.
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [], [], ls="", marker=markers[i % len(markers)], color="0.3", label=_threads_label(t)
        )
        for i, t in enumerate(threads)
    ]
    if cmap is None:
        handles += [
            Line2D([], [], ls="", marker="s", color=tab(i % tab.N), label=rt)
            for i, rt in enumerate(runtimes)
        ]
    else:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
        cb.set_label("Perplexity (hollow: not measured)", fontsize=8)
        cb.ax.tick_params(labelsize=8)
    if pts:
        ax.legend(handles=handles, fontsize=8, loc="best")
        ax.margins(x=0.15, y=0.12)
    else:
        msg = "no row has both memory and decode speed"
        ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Decode tok/s (median)")
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{result.get('model') or '?'}: decode speed vs memory (up and left is better)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- files


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write via a temporary sibling then ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    """Strict JSON: NaN/inf become null (json.dumps would write invalid ``NaN``), tuples lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return _jsonable(x.tolist())
    return str(x)  # Path, ...


def write_json(result: dict, path: Path) -> Path:
    """``result`` as indented strict JSON, written atomically."""
    text = json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n"
    path = Path(path)
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """Everything a bench run leaves behind in ``out_dir``.

    bench.json (the raw result), bench.md (:func:`markdown_table`), bench_bars.png
    (:func:`plot_bars`) and bench_pareto.png (:func:`plot_pareto`); returns their paths under
    the keys "json", "md", "bars", "pareto". Every file is written atomically.
    """
    _rows(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "bench.json",
        "md": out_dir / "bench.md",
        "bars": out_dir / "bench_bars.png",
        "pareto": out_dir / "bench_pareto.png",
    }
    write_json(result, paths["json"])
    md = markdown_table(result)
    _atomic(paths["md"], lambda tmp: tmp.write_text(md, encoding="utf-8"))
    plot_bars(result, paths["bars"])
    plot_pareto(result, paths["pareto"])
    return paths
