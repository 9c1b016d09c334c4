"""``ternvlm bench``: every variant of one model measured in one run, side by side.

For a model (a trained checkpoint, or a preset with random weights) it exports each variant
(fp32, dynamic-range int8, ternary, ternary-lut, ternary158, unpack, binary) once, then measures
them in fresh child processes (bench/child.py), interleaved: round r runs every (threads,
variant) once before round r + 1 starts, so machine noise hits all variants alike. Optionally the
same decoder on llama.cpp (``--peer llama.cpp``) in the same rounds. Trained models also get
perplexity and QA accuracy of each exported file on LiteRT. Output: bench.json, bench.md and
two PNG charts (bench/report.py).
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import TernvlmError
from .proc import run_child, spread

VARIANTS = ("fp32", "int8", "ternary", "ternary-lut", "ternary158", "unpack", "binary")
TERNARY_ROWS = ("ternary", "ternary-lut")  # the rows the targets are checked for
# variant -> which checkpoint it is exported from
_SOURCE = {
    "fp32": "float",
    "int8": "float",
    "ternary": "ternary",
    "ternary158": "ternary",
    "ternary-lut": "ternary",
    "unpack": "ternary",
    "binary": "binary",
}
# llama.cpp rows: label -> (file type of the blocks, type of the token embedding / output)
PEER_CONFIGS = {
    "llama.cpp TQ2_0 + Q4_0 head": ("TQ2_0", "Q4_0"),
    "llama.cpp TQ2_0 + Q8_0 head": ("TQ2_0", "Q8_0"),
}


@dataclass
class BenchConfig:
    model: str = "default"  # a trained checkpoint ('default' or a folder); ignored with preset
    preset: str | None = None  # smolvlm-256m, smolvlm-500m, tiny: random weights, PTQ only
    ternary: str | None = None  # trained ternary checkpoint of `model` (else k-means PTQ)
    binary: str | None = None  # trained binary checkpoint of `model` (else k-means PTQ)
    variants: tuple[str, ...] = VARIANTS
    threads: tuple[int, ...] = (1, 2)
    repeats: int = 3  # rounds; each child measures one warm round after a warm-up
    text_tokens: int = 16  # prompt = BOS + image tokens + this many text tokens
    gen_tokens: int = 32
    head: str = "int8"  # token embedding / LM head of every variant: fp32, int8, int4
    act: str = "int8"  # activations of our packed matmuls
    peer: str | None = None  # "llama.cpp"
    eval_scenes: int = 128  # shapes:test images for perplexity / QA (trained models only; 0: off)
    out: str = "bench_out"
    timeout_s: float = 1800.0
    settings: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> BenchConfig:
        from ..export.linear import ACTS, HEADS

        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise TernvlmError(
                f"unknown variants {bad or '(none)'}; choose from {', '.join(VARIANTS)}"
            )
        if not self.threads or any(not 1 <= t <= 64 for t in self.threads):
            raise TernvlmError("--threads must be a list of counts in [1, 64]")
        if self.repeats < 1 or self.gen_tokens < 1 or self.text_tokens < 0:
            raise TernvlmError("--repeats and --gen must be at least 1, --text-tokens at least 0")
        if self.head not in HEADS or self.act not in ACTS:
            raise TernvlmError(f"--head must be one of {HEADS}, --act one of {ACTS}")
        if self.peer not in (None, "llama.cpp"):
            raise TernvlmError(f"unknown peer {self.peer!r}; the supported peer is llama.cpp")
        return self


def _kv_mb(cfg, cache_len: int) -> float:
    d = cfg.decoder
    return 2 * d.layers * d.kv_heads * cache_len * d.head_dim * 4 / 2**20


def quantized_layer_bytes(model) -> dict[str, int]:
    """Weight bytes of the quantized layers as fp32 and as packed 2-bit (+ fp32 scales)."""
    from ..quant.api import quant_layers
    from ..quant.linear import scale_shape
    from ..quant.pack import packed_row_bytes

    fp32 = packed = 0
    for q in quant_layers(model).values():
        n, k = q.out_features, q.in_features
        fp32 += 4 * n * k
        packed += n * packed_row_bytes(k, "2bit") + 4 * n * scale_shape(q.cfg.gran, n, k)[1]
    return {"fp32": fp32, "ternary": packed}


def _checkpoints(c: BenchConfig, root: Path) -> tuple[dict[str, Path], bool]:
    """{"float", "ternary", "binary"} checkpoint folders and whether the model is trained."""
    from ..models.checkpoint import load_checkpoint, resolve
    from .presets import build_preset, save_ptq

    bits = tuple(b for b in ("ternary", "binary") if b in {_SOURCE[v] for v in c.variants})
    if c.preset:
        return build_preset(c.preset, root / "models" / c.preset, bits), False
    dirs = {"float": resolve(c.model)}
    model, proc = load_checkpoint(dirs["float"])
    if model.cfg.quantization_config is not None:
        raise TernvlmError(
            f"{c.model} is a ternary/binary checkpoint; pass the original float model and the "
            "quantized ones with --ternary / --binary"
        )
    for b in bits:
        given = getattr(c, b)
        if given:
            dirs[b] = resolve(given)
            continue
        dirs[b] = root / "models" / f"{Path(dirs['float']).name}-{b}-ptq"
        if not (dirs[b] / "config.json").exists():
            save_ptq(model, b, proc.tokenizer, dirs[b], f"k-means PTQ ({b}), no fine-tuning")
    return dirs, True


def _export_all(
    c: BenchConfig, dirs: dict[str, Path], root: Path, prefill: int, cache: int, trained: bool
):
    """Export each variant once; a file is reused when its recorded settings are the same."""
    from ..export.exporter import ExportConfig, export

    files, infos = {}, {}
    for v in tqdm(c.variants, desc="export"):
        ec = ExportConfig(v, prefill, cache, c.act, c.head, "all" if trained else "last")
        src = dirs[_SOURCE[v]]
        out = root / "files" / f"{v}.tflite"
        sidecar = out.with_suffix(".json")
        key = {"export": asdict(ec), "source": str(Path(src).resolve())}
        if out.exists() and sidecar.exists() and json.loads(sidecar.read_text()).get("key") == key:
            info = json.loads(sidecar.read_text())["info"]
        else:
            info = export(src, out, ec)
            sidecar.write_text(json.dumps({"key": key, "info": info}))
        files[v], infos[v] = out, info
    return files, infos


def _peer_files(dirs: dict[str, Path], root: Path, cache: int) -> dict[str, tuple[Path, dict]]:
    """The float decoder as GGUF, quantized per PEER_CONFIGS; {label: (path, parts)}."""
    from ..models.checkpoint import load_checkpoint
    from . import llamacpp

    model, _ = load_checkpoint(dirs["float"])
    src = root / "files" / "decoder-f32.gguf"
    if not src.exists():
        llamacpp.write_gguf(model.decoder, model.cfg.decoder, src, n_ctx=cache)
    out = {}
    for label, (ftype, head) in PEER_CONFIGS.items():
        dst = root / "files" / f"decoder-{ftype}-{head}.gguf"
        if not dst.exists():
            llamacpp.quantize_gguf(src, dst, ftype, head=head)
        out[label] = (dst, llamacpp.type_summary(llamacpp.tensor_types(dst)))
    return out


def _merge(rounds: list[dict], key: str) -> dict[str, float] | None:
    """Median and spread over rounds of each round's value."""
    vals = [r[key]["median"] for r in rounds if r.get(key)]
    if not vals:
        return None
    return spread(vals)


def run_bench(c: BenchConfig, command: str = "") -> dict:
    """Build, export, measure; returns the result dict that bench/report.py renders."""
    from ..models.checkpoint import load_checkpoint
    from .machine import machine_info

    c.validate()
    root = Path(c.out)
    root.mkdir(parents=True, exist_ok=True)
    dirs, trained = _checkpoints(c, root)
    float_model, proc = load_checkpoint(dirs["float"])
    cfg = float_model.cfg
    prompt = 1 + cfg.image_tokens + c.text_tokens
    # trained models: the whole context (perplexity needs it); presets: just the prompt
    prefill = cfg.decoder.max_seq_len if trained else prompt
    cache = cfg.decoder.max_seq_len if trained else prompt + c.gen_tokens
    if prompt + c.gen_tokens > cache or prompt > prefill:
        raise TernvlmError(
            f"prompt {prompt} + {c.gen_tokens} tokens exceed the context {cfg.decoder.max_seq_len}"
        )
    files, infos = _export_all(c, dirs, root, prefill, cache, trained)
    peers = _peer_files(dirs, root, cache) if c.peer else {}

    jobs = [(v, t) for t in c.threads for v in (*c.variants, *peers)]
    samples: dict[tuple[str, int], list[dict]] = {j: [] for j in jobs}
    errors: dict[tuple[str, int], str] = {}
    bar = tqdm(total=len(jobs) * c.repeats, desc="measure")
    for r in range(c.repeats):
        for i in range(len(jobs)):
            v, t = jobs[(i + r) % len(jobs)]  # rotate the order: no variant always runs first
            if (v, t) in errors:
                bar.update()
                continue
            bar.set_postfix_str(f"round {r + 1} {v} t{t}")
            try:
                if v in peers:
                    from . import llamacpp

                    res = llamacpp.measure_in_child(
                        peers[v][0], t, prompt, c.gen_tokens, 1, cache, c.timeout_s
                    )
                    res["baseline_rss_mb"] = res.get("rss_before_load_mb")
                else:
                    cmd = [sys.executable, "-m", "ternvlm.bench.child", str(files[v])]
                    cmd += [
                        "--threads",
                        str(t),
                        "--prompt",
                        str(prompt),
                        "--gen",
                        str(c.gen_tokens),
                    ]
                    cmd += ["--image-token-id", str(cfg.image_token_id)]
                    res = run_child(cmd, v, c.timeout_s)
                samples[(v, t)].append(res)
            except TernvlmError as e:
                errors[(v, t)] = str(e)
            bar.update()
    bar.close()

    quality = _quality(c, files, proc, cfg) if trained and c.eval_scenes > 0 else {}
    kv = _kv_mb(cfg, cache)
    rows = []
    for v, t in jobs:
        got = samples[(v, t)]
        peer = v in peers
        file_mb = (peers[v][0] if peer else files[v]).stat().st_size / 2**20
        row: dict[str, Any] = {
            "variant": v,
            "runtime": "llama.cpp" if peer else "litert",
            "threads": t,
            "parts": peers[v][1] if peer else infos[v].get("parts"),
            "file_mb": file_mb,
            "kv_cache_mb": kv,
            "error": errors.get((v, t)),
        }
        if got:
            row["peak_rss_mb"] = max(s["peak_rss_mb"] for s in got)
            row["baseline_rss_mb"] = min(s.get("baseline_rss_mb") or 0.0 for s in got)
            row["model_rss_ratio"] = (row["peak_rss_mb"] - row["baseline_rss_mb"]) / (file_mb + kv)
            dec = [s["decode_peak_rss_mb"] for s in got if s.get("decode_peak_rss_mb")]
            if dec:  # litert children: memory of decoding alone (before any image encoding)
                row["decode_peak_rss_mb"] = max(dec)
                row["decode_rss_ratio"] = (max(dec) - row["baseline_rss_mb"]) / (file_mb + kv)
            for key in ("encode_ms", "ttft_ms", "decode_tok_s"):
                row[key] = _merge(got, key)
        row.update(quality.get(v, {}))
        rows.append(row)
    result = {
        "model": c.preset or str(dirs["float"]),
        "preset": c.preset,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "settings": {
            "prompt_tokens": prompt,
            "image_tokens": cfg.image_tokens,
            "gen_tokens": c.gen_tokens,
            "repeats": c.repeats,
            "prefill_len": prefill,
            "cache_len": cache,
            "head": c.head,
            "act": c.act,
            "trained": trained,
        },
        "quantized_layers_mb": {
            k: v / 2**20
            for k, v in quantized_layer_bytes(load_checkpoint(dirs["ternary"])[0]).items()
        }
        if "ternary" in dirs
        else None,
        "rows": rows,
    }
    result["checks"] = checks(result)
    return result


def _median_of(row: dict, key: str) -> float | None:
    v = row.get(key)
    return v.get("median") if isinstance(v, dict) else None


def checks(result: dict) -> list[dict]:
    """The issue's targets evaluated on this run: ternary decode speed against fp32, int8 and
    llama.cpp (TQ2_0 + Q4_0 head) at each thread count, file size of the quantized layers, and
    resident memory while decoding against file + KV cache."""
    rows = [r for r in result["rows"] if not r.get("error")]
    out = []

    def add(name: str, value: float | None, target: str, ok: bool) -> None:
        out.append({"check": name, "measured": value, "target": target, "holds": ok})

    for name in TERNARY_ROWS:
        for t in sorted({r["threads"] for r in rows}):
            at = {r["variant"]: r for r in rows if r["threads"] == t}
            tern = _median_of(at.get(name, {}), "decode_tok_s")
            if tern is None:
                continue
            for other, target in (("fp32", 3.0), ("int8", 1.5), (next(iter(PEER_CONFIGS)), 1.0)):
                base = _median_of(at.get(other, {}), "decode_tok_s")
                if base:
                    ratio = tern / base
                    add(
                        f"{name} / {other} decode tok/s, {t} thread(s)",
                        ratio,
                        f">= {target:g}x",
                        ratio >= target,
                    )
    q = result.get("quantized_layers_mb")
    if q:
        ratio = q["ternary"] / q["fp32"]
        add("quantized layers: ternary / fp32 bytes", ratio, "<= 0.1", ratio <= 0.1)
    for r in rows:
        if r["variant"] in TERNARY_ROWS and r.get("decode_rss_ratio") is not None:
            v = r["decode_rss_ratio"]
            add(
                f"{r['variant']} RSS while decoding / (file + KV), {r['threads']} thread(s)",
                v,
                "<= 1.3",
                v <= 1.3,
            )
    return out


def _quality(c: BenchConfig, files: dict[str, Path], proc, cfg) -> dict[str, dict]:
    """Perplexity and QA accuracy of each exported file on shapes:test (LiteRT, 2 threads)."""
    from ..data.registry import shapes_eval_set
    from ..eval.evaluate import evaluate
    from ..runtime.vlm import TfliteVLM

    data = shapes_eval_set("test", c.eval_scenes, cfg.vision.image_size)
    out = {}
    for v in tqdm(c.variants, desc="perplexity"):
        try:
            with TfliteVLM(files[v], threads=2) as tv:
                m = evaluate(tv, tv.processor, data, mismatched=False)
            out[v] = {"perplexity": m["perplexity"], "qa_accuracy": m["qa_accuracy"]}
        except TernvlmError as e:
            out[v] = {"error": f"evaluation: {e}"}
    return out
