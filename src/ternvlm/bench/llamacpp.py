"""llama.cpp peer: our decoder written as a llama GGUF, quantized and timed by llama.cpp.

``write_gguf`` maps a :class:`~ternvlm.models.decoder.Decoder` (nn.Linear or QuantLinear
projections, with or without biases; QuantLinear weights are written dequantized, so ternary
rows stay exactly ternary) onto llama.cpp's "llama" architecture, ``quantize_gguf`` runs ``llama_model_quantize``,
``tensor_types``/``type_summary`` report what was really stored (TQ1_0/TQ2_0 need rows that
are a multiple of 256 long; other rows silently fall back to Q4_0), and ``measure`` times prompt
evaluation and single-token decoding like llama-bench's pp/tg tests.

Run ``measure`` in a child process so that its peak RSS is the peer's alone::

    python -m ternvlm.bench.llamacpp measure --model F.gguf --threads 1 --prompt 32 --gen 64

prints one JSON line; :func:`measure_in_child` does that and adds the peak RSS from ``os.wait4``
(and, if llama.cpp's weight-repacking/AMX path crashes the child, measures again without it).
Needs the optional packages ``llama-cpp-python==0.3.36`` and ``gguf==0.19.0``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TernvlmError
from .proc import ChildCrash, run_child, spread, status_mb

if TYPE_CHECKING:  # torch is imported lazily: the timing child must not carry it in its RSS
    from torch import nn

    from ..config import DecoderConfig

INSTALL_HINT = "pip install ternvlm[bench]  (llama-cpp-python==0.3.36 gguf==0.19.0)"

# llama_ftype values (include/llama.h) and ggml_type values (ggml/include/ggml.h).
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "TQ1_0": 36, "TQ2_0": 37}
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "TQ1_0": 34, "TQ2_0": 35}

# Our state-dict names -> llama.cpp tensor names, per block.
_BLOCK_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

_LOG: list[str] = []  # llama.cpp log lines, kept for error messages
_LOG_CALLBACK: Any = None  # the ctypes callback must outlive every llama.cpp call
_BACKEND_READY = False


def _import(name: str) -> ModuleType:
    try:
        return __import__(name)
    except ImportError as e:
        raise TernvlmError(f"the llama.cpp benchmark needs '{name}': {INSTALL_HINT}") from e


def _llama() -> ModuleType:
    """The llama_cpp module with its log captured (not printed) and the backend initialised."""
    global _LOG_CALLBACK, _BACKEND_READY
    llama = _import("llama_cpp")
    if _LOG_CALLBACK is None:

        def collect(level: int, text: bytes, user_data: Any) -> None:
            _LOG.append(text.decode("utf-8", "replace"))
            del _LOG[:-200]

        _LOG_CALLBACK = llama.llama_log_callback(collect)
        llama.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    if not _BACKEND_READY:
        llama.llama_backend_init()
        _BACKEND_READY = True
    return llama


def _log_tail(n: int = 8) -> str:
    lines = "".join(_LOG).strip().splitlines()
    return " | ".join(line.strip() for line in lines[-n:])


# --------------------------------------------------------------------------------------------
# GGUF writing
# --------------------------------------------------------------------------------------------


def _check_llama_shape(cfg: DecoderConfig) -> None:
    problems = {
        "norm must be rmsnorm": cfg.norm != "rmsnorm",
        "mlp_type must be swiglu": cfg.mlp_type != "swiglu",
        "parallel_block is not llama": cfg.parallel_block,
        "llama.cpp's llama has no LM head bias": cfg.lm_head_bias,
        "partial_rotary must be 1.0": cfg.partial_rotary != 1.0,
        "head_dim must be even": cfg.head_dim % 2 != 0,
    }
    bad = [msg for msg, hit in problems.items() if hit]
    if bad:
        raise TernvlmError(f"decoder is not llama-shaped for GGUF export: {'; '.join(bad)}")


def _weight(module: nn.Module, name: str, bias_ok: bool = False) -> np.ndarray:
    """Float32 [out, in] weight; a QuantLinear gives its dequantized (ternary) weight."""
    import torch  # lazily: the timing child never writes GGUFs

    if not bias_ok and getattr(module, "bias", None) is not None:
        raise TernvlmError(f"{name} has a bias; llama.cpp's llama architecture has none there")
    if hasattr(module, "weight_q"):
        w = module.weight_q()
    elif isinstance(getattr(module, "weight", None), torch.Tensor):
        w = module.weight
    else:
        raise TernvlmError(
            f"{name} ({type(module).__name__}) has no float weight: pass the PyTorch decoder "
            "(nn.Linear/QuantLinear), not an export-packed one"
        )
    return w.detach().float().cpu().numpy()


def _bias(module: nn.Module) -> np.ndarray | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float().cpu().numpy()


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf ``permute``)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_vocab(writer: Any, gguf: ModuleType, vocab_size: int) -> None:
    """Synthetic SPM vocabulary: <unk> <s> </s>, the 256 byte tokens, then filler tokens."""
    writer.add_vocab_size(vocab_size)
    if vocab_size < 3 + 256:  # too small for byte tokens: a tokenizer-less model
        writer.add_tokenizer_model("none")
        return
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    n_fill = vocab_size - len(tokens)
    tokens += [f"<t{i}>" for i in range(n_fill)]
    types += [tt.NORMAL] * n_fill
    scores = [0.0] * 259 + [-float(i) for i in range(n_fill)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def write_gguf(
    decoder: nn.Module,
    cfg: DecoderConfig,
    path: Path,
    n_ctx: int | None = None,
    dtype: str = "f32",
    write_output: bool = True,
) -> Path:
    """Write ``decoder`` as an arch-"llama" GGUF (F32, or F16 2-D weights with ``dtype="f16"``).

    Both are inputs ``llama_model_quantize`` accepts; F32 keeps dequantized ternary rows exact.
    Block projection biases (QuantLinear ``learn_bias``, ``attn_bias``, ``mlp_bias``) are written
    as F32 ``blk.N.*.bias``; a QuantLinear ``output_clip`` is not (llama.cpp has no such clamp, so
    logits differ wherever a clamp was active).
    ``output.weight`` is written even for tied embeddings (``write_output=False`` leaves it out,
    so llama.cpp ties the head to ``token_embd.weight`` and quantizes that with the head type).
    ``n_ctx`` raises the context length above ``cfg.max_seq_len``.
    """
    gguf = _import("gguf")
    _check_llama_shape(cfg)
    if dtype not in ("f32", "f16"):
        raise TernvlmError(f"write_gguf dtype must be 'f32' or 'f16', not {dtype!r}")
    mods = dict(decoder.named_modules())
    w2 = np.float32 if dtype == "f32" else np.float16

    tensors: list[tuple[str, np.ndarray]] = []
    embed = _weight(mods["embed_tokens"], "embed_tokens")
    tensors.append(("token_embd.weight", embed.astype(w2)))
    for i in range(cfg.layers):
        p = f"layers.{i}"
        norm = mods[f"{p}.input_layernorm"].weight.detach().float().cpu().numpy()
        tensors.append((f"blk.{i}.attn_norm.weight", norm))
        for ours, theirs in _BLOCK_LINEARS.items():
            mod = mods[f"{p}.{ours}"]
            w, b = _weight(mod, f"{p}.{ours}", bias_ok=True), _bias(mod)
            if theirs in ("attn_q", "attn_k"):  # q/k rows (and biases) follow the rope layout
                n_head = cfg.heads if theirs == "attn_q" else cfg.kv_heads
                w = permute_rope(w, n_head)
                b = None if b is None else permute_rope(b, n_head)
            tensors.append((f"blk.{i}.{theirs}.weight", np.ascontiguousarray(w, dtype=w2)))
            if b is not None:
                tensors.append((f"blk.{i}.{theirs}.bias", np.ascontiguousarray(b)))
        norm = mods[f"{p}.post_attention_layernorm"].weight.detach().float().cpu().numpy()
        tensors.append((f"blk.{i}.ffn_norm.weight", norm))
    tensors.append(("output_norm.weight", mods["norm"].weight.detach().float().cpu().numpy()))
    if write_output:
        tensors.append(("output.weight", _weight(mods["lm_head"], "lm_head").astype(w2)))
    elif not cfg.tie_embeddings:
        raise TernvlmError("write_output=False needs a decoder with tied embeddings")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # no half-written file at ``path``
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("ternvlm-decoder")
    writer.add_file_type(FTYPES["F32"] if dtype == "f32" else FTYPES["F16"])
    writer.add_context_length(max(cfg.max_seq_len, n_ctx or 0))
    writer.add_embedding_length(cfg.hidden)
    writer.add_block_count(cfg.layers)
    writer.add_feed_forward_length(cfg.mlp)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    _add_vocab(writer, gguf, cfg.vocab_size)
    for name, arr in tensors:
        writer.add_tensor(name, np.ascontiguousarray(arr))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()  # idempotent; releases the file after an error
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Quantization and what it stored
# --------------------------------------------------------------------------------------------


def quantize_gguf(
    src: Path, dst: Path, ftype: str, head: str | None = None, threads: int = 1
) -> Path:
    """``llama_model_quantize`` src -> dst to ``ftype``; ``head`` sets output/embedding types.

    ``ftype``: "TQ2_0", "TQ1_0", "Q4_0", "Q8_0", "F16" or "F32". ``head``: ggml type name for
    ``output.weight`` and ``token_embd.weight`` ("Q4_0", "Q8_0", "F16", ...), None = llama.cpp's
    default choice. Rows llama.cpp cannot store in ``ftype`` fall back silently (see
    :func:`type_summary`).
    """
    if ftype not in FTYPES:
        raise TernvlmError(f"unknown llama.cpp ftype {ftype!r}; choose from {sorted(FTYPES)}")
    if head is not None and head not in GGML_TYPES:
        raise TernvlmError(f"unknown head type {head!r}; choose from {sorted(GGML_TYPES)}")
    llama = _llama()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise TernvlmError(f"no GGUF file at {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = FTYPES[ftype]
    if head is not None:
        params.output_tensor_type = GGML_TYPES[head]
        params.token_embedding_type = GGML_TYPES[head]
    _LOG.clear()
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        rc = llama.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise TernvlmError(
                f"llama.cpp could not quantize {src} to {ftype} (head {head}): rc={rc}; "
                f"{_log_tail()}"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name ("TQ2_0", "Q4_0", "F32", ...) as stored in the GGUF."""
    gguf = _import("gguf")
    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors}


def _counts(types: list[str]) -> str:
    return ", ".join(f"{t} x {n}" for t, n in Counter(types).most_common())


def type_summary(types: dict[str, str]) -> dict[str, str]:
    """Group :func:`tensor_types` by part.

    "layers": counts per type over the blocks' 2-D weights, most frequent first ("Q4_0 x 180,
    TQ2_0 x 30": a fallback shows up as a second type), "head": ``output.weight`` (or
    "tied (<type>)" when absent), "embedding": ``token_embd.weight``, "norms": the 1-D norm
    weights, and "biases" (only when the file has block biases).
    """
    layers = [
        t
        for n, t in types.items()
        if n.startswith("blk.") and n.endswith(".weight") and "_norm." not in n
    ]
    norms = [t for n, t in types.items() if "_norm." in n]
    biases = [t for n, t in types.items() if n.endswith(".bias")]
    embd = types.get("token_embd.weight", "missing")
    out = {
        "layers": _counts(layers),
        "head": types.get("output.weight", f"tied ({embd})"),
        "embedding": embd,
        "norms": _counts(norms),
    }
    if biases:
        out["biases"] = _counts(biases)
    return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _model_params(llama: ModuleType, extra_bufts: bool) -> Any:
    params = llama.llama_model_default_params()
    params.use_extra_bufts = bool(extra_bufts)
    return params


def measure(
    path: Path,
    threads: int,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    n_ctx: int | None = None,
    extra_bufts: bool = True,
) -> dict[str, Any]:
    """Time prompt evaluation and greedy single-token decoding of a GGUF with llama.cpp.

    Per repeat the KV cache is cleared, the prompt (token ids 10, 11, ...) is evaluated in one
    batch and the argmax of its last logits taken: that is "ttft_ms" (time to the first
    generated token). Then ``gen_tokens`` single-token decodes, each fed the previous argmax:
    "decode_tok_s" = gen_tokens / their time (llama-bench's tg). The first repeat is a warm-up
    and dropped when ``repeats`` > 1. Threads are used for both prompt and decode.
    ``extra_bufts=False`` turns off llama.cpp's weight repacking (CPU_REPACK, AMX): see
    :func:`measure_in_child`.
    """
    if min(threads, prompt_tokens, gen_tokens, repeats) < 1:
        raise TernvlmError("threads, prompt, gen and repeats must all be >= 1")
    llama = _llama()
    path = Path(path)
    if not path.is_file():
        raise TernvlmError(f"no GGUF file at {path}")
    n_ctx = n_ctx or prompt_tokens + gen_tokens
    if n_ctx < prompt_tokens + gen_tokens:
        raise TernvlmError(f"n_ctx {n_ctx} < prompt + gen = {prompt_tokens + gen_tokens}")

    _LOG.clear()
    t_load = time.perf_counter()
    model = llama.llama_model_load_from_file(str(path).encode(), _model_params(llama, extra_bufts))
    if not model:
        raise TernvlmError(f"llama.cpp could not load {path}: {_log_tail()}")
    cparams = llama.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = max(cparams.n_batch, prompt_tokens)
    cparams.n_ubatch = max(cparams.n_ubatch, prompt_tokens)
    cparams.n_seq_max = 1
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = llama.llama_init_from_model(model, cparams)
    if not ctx:
        llama.llama_model_free(model)
        raise TernvlmError(f"llama.cpp could not create a context for {path}: {_log_tail()}")
    load_s = time.perf_counter() - t_load
    n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    token = llama.llama_token

    def decode(ids: list[int]) -> int:
        arr = (token * len(ids))(*ids)
        rc = llama.llama_decode(ctx, llama.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise TernvlmError(f"llama_decode failed (rc={rc}): {_log_tail()}")
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    prompt = [(10 + i) % n_vocab for i in range(prompt_tokens)]
    ttft, tok_s = [], []
    try:
        mem = llama.llama_get_memory(ctx)
        for _ in range(repeats):
            llama.llama_memory_clear(mem, True)
            t0 = time.perf_counter()
            nxt = decode(prompt)
            t1 = time.perf_counter()
            for _ in range(gen_tokens):
                nxt = decode([nxt])
            t2 = time.perf_counter()
            ttft.append((t1 - t0) * 1e3)
            tok_s.append(gen_tokens / (t2 - t1))
    finally:
        llama.llama_free(ctx)
        llama.llama_model_free(model)
    if repeats > 1:
        ttft, tok_s = ttft[1:], tok_s[1:]
    return {
        "ttft_ms": spread(ttft),
        "decode_tok_s": spread(tok_s),
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": len(ttft),
        "n_ctx": n_ctx,
        "load_s": load_s,
        "model_mb": path.stat().st_size / 2**20,
        "extra_bufts": extra_bufts,
        "llama_cpp": getattr(llama, "__version__", "?"),
    }


def last_logits(
    path: Path, token_ids: list[int], threads: int = 1, extra_bufts: bool = True
) -> np.ndarray:
    """llama.cpp's logits after one batch of ``token_ids`` (for checking the tensor mapping)."""
    llama = _llama()
    model = llama.llama_model_load_from_file(str(path).encode(), _model_params(llama, extra_bufts))
    if not model:
        raise TernvlmError(f"llama.cpp could not load {path}: {_log_tail()}")
    cparams = llama.llama_context_default_params()
    cparams.n_ctx = max(len(token_ids), 16)
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama.llama_init_from_model(model, cparams)
    try:
        if not ctx:
            raise TernvlmError(f"llama.cpp could not create a context: {_log_tail()}")
        n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        arr = (llama.llama_token * len(token_ids))(*token_ids)
        rc = llama.llama_decode(ctx, llama.llama_batch_get_one(arr, len(token_ids)))
        if rc != 0:
            raise TernvlmError(f"llama_decode failed (rc={rc}): {_log_tail()}")
        ptr = llama.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
    finally:
        if ctx:
            llama.llama_free(ctx)
        llama.llama_model_free(model)


# --------------------------------------------------------------------------------------------
# Child-process entry
# --------------------------------------------------------------------------------------------


def measure_in_child(
    path: Path,
    threads: int,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    n_ctx: int | None = None,
    timeout_s: float | None = None,
    extra_bufts: bool | None = None,
) -> dict[str, Any]:
    """Run :func:`measure` in a fresh Python process (``python -m ternvlm.bench.llamacpp``).

    Returns measure()'s dict plus "peak_rss_mb" (the child's VmHWM, see bench/proc.py),
    "rss_start_mb" (the bare interpreter) and "rss_before_load_mb" (llama.cpp imported and
    initialised, no model: the baseline). ``timeout_s`` kills a child that takes longer.

    ``extra_bufts`` True/False runs llama.cpp with/without its weight-repacking buffers;
    None (default) tries with them and, if the child dies of a signal, runs again without and
    says so in the result ("extra_bufts": False, "extra_bufts_crash": "signal 11"). llama.cpp
    0.3.36 built for an AMX-capable Xeon segfaults in its AMX matmul on Q4_0/Q8_0 weights as
    soon as a batch has more than one token.
    """
    if extra_bufts is not None:
        return _child(
            path, threads, prompt_tokens, gen_tokens, repeats, n_ctx, timeout_s, extra_bufts
        )
    try:
        return _child(path, threads, prompt_tokens, gen_tokens, repeats, n_ctx, timeout_s, True)
    except ChildCrash as crash:
        result = _child(path, threads, prompt_tokens, gen_tokens, repeats, n_ctx, timeout_s, False)
        result["extra_bufts_crash"] = crash.why
        return result


def _child(
    path: Path,
    threads: int,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    n_ctx: int | None,
    timeout_s: float | None,
    extra_bufts: bool,
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ternvlm.bench.llamacpp", "measure", "--model", str(path)]
    cmd += ["--threads", str(threads), "--prompt", str(prompt_tokens), "--gen", str(gen_tokens)]
    cmd += ["--repeats", str(repeats)] + (["--n-ctx", str(n_ctx)] if n_ctx else [])
    cmd += [] if extra_bufts else ["--no-extra-bufts"]
    try:
        return run_child(cmd, "llama.cpp", timeout_s)
    except ChildCrash as crash:
        raise ChildCrash(f"{crash} (extra_bufts={extra_bufts})", crash.why) from None


def main(argv: list[str] | None = None) -> int:
    """``measure`` subcommand: print one JSON line (measure() + RSS before load and peak)."""
    ap = argparse.ArgumentParser(prog="python -m ternvlm.bench.llamacpp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time a GGUF with llama.cpp, print one JSON line")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--prompt", type=int, default=32)
    m.add_argument("--gen", type=int, default=64)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--n-ctx", type=int, default=None)
    m.add_argument(
        "--no-extra-bufts",
        action="store_true",
        help="no weight repacking (CPU_REPACK/AMX buffers)",
    )
    args = ap.parse_args(argv)
    rss_start = status_mb("VmRSS")
    try:
        _llama()  # the runtime belongs to the baseline; only the model is measured on top
        rss_before = status_mb("VmRSS")
        result = measure(
            args.model,
            args.threads,
            args.prompt,
            args.gen,
            args.repeats,
            args.n_ctx,
            extra_bufts=not args.no_extra_bufts,
        )
    except TernvlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["rss_start_mb"] = rss_start
    result["rss_before_load_mb"] = rss_before
    result["vm_hwm_mb"] = status_mb("VmHWM")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
