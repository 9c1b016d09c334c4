"""``ternvlm export``: a checkpoint -> one .tflite with encode_image, prefill and decode.

Route: litert-torch (Google's PyTorch -> LiteRT converter) with our ops lowered to tfl.custom
(export/ops.py). It lowers everything else (norms, rotary embeddings, attention, the vision
encoder) from the same PyTorch modules we train, so the file cannot drift from the model; the
alternative, our own flatbuffer writer, would re-implement every builtin's options and the
attention by hand. After conversion: constant buffers moved to 64-byte aligned offsets
(export/align.py), int8 by ai-edge-quantizer's dynamic-range recipe, and the model config and
tokenizer stored in the file's metadata so a .tflite is self-contained.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import TernvlmError
from .linear import ACTS, HEADS, VARIANTS, describe_parts, export_copy

META_CONFIG = "ternvlm_config"
META_TOKENIZER = "ternvlm_tokenizer"
SIGNATURES = ("encode_image", "prefill", "decode")


@dataclass
class ExportConfig:
    ops: str = "ternary"
    prefill_len: int = 0  # 0: the model's context length
    cache_len: int = 0  # 0: the model's context length
    act: str = "int8"  # activations of our packed matmuls: "int8" (per row) or "f32"
    head: str = "auto"  # token embedding / LM head: "fp32", "int8", "int4" ("auto": linear.py)
    prefill_logits: str = "all"  # "all" positions (perplexity) or the "last" one (generation)

    def validate(self, max_seq_len: int) -> ExportConfig:
        if self.ops not in VARIANTS:
            raise TernvlmError(f"unknown --ops {self.ops!r}; choose from {', '.join(VARIANTS)}")
        if self.act not in ACTS:
            raise TernvlmError(f"unknown --act {self.act!r}; choose from {', '.join(ACTS)}")
        if self.head not in HEADS:
            raise TernvlmError(f"unknown --head {self.head!r}; choose from {', '.join(HEADS)}")
        if self.prefill_logits not in ("all", "last"):
            raise TernvlmError(f"--prefill-logits must be all or last, got {self.prefill_logits!r}")
        for name in ("prefill_len", "cache_len"):
            v = getattr(self, name)
            if not 0 <= v <= max_seq_len:
                raise TernvlmError(f"{name} must be in [1, {max_seq_len}] (0: context length)")
        return self


def _require_converter():
    try:
        import litert_torch  # noqa: F401
    except ImportError:
        raise TernvlmError(
            "export needs litert-torch: pip install 'ternvlm[export]' (litert-torch==0.10.0)"
        ) from None


def convert(model, cfg: ExportConfig) -> bytes:
    """Convert the three signatures of ``model`` (a loaded VLM) to .tflite bytes (unaligned)."""
    import litert_torch
    import torch

    from . import graphs, ops

    ops.register_lowerings()
    d = model.cfg.decoder
    prefill_len = cfg.prefill_len or d.max_seq_len
    cache_len = cfg.cache_len or d.max_seq_len
    m = export_copy(model, cfg.ops, cfg.act, cfg.head)
    last = cfg.prefill_logits == "last"
    samples = graphs.sample_inputs(m, prefill_len, cache_len, last)
    kv_names = [f"{kind}_{i}" for i in range(d.layers) for kind in ("k", "v")]
    conv = litert_torch.signature(
        "encode_image",
        graphs.EncodeImage(m).eval(),
        sample_kwargs={"pixel_values": samples["encode_image"][0]},
    )
    conv = conv.signature(
        "prefill",
        graphs.Prefill(m, prefill_len, last).eval(),
        sample_kwargs=dict(
            zip(
                ("input_ids", "image_features", "last")[: 2 + last], samples["prefill"], strict=True
            )
        ),
    )
    decode_kw = dict(zip(("token", "pos", *kv_names), samples["decode"], strict=True))
    conv = conv.signature("decode", graphs.Decode(m, cache_len).eval(), sample_kwargs=decode_kw)
    with torch.no_grad():
        edge = conv.convert()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        edge.export(str(path))
        data = path.read_bytes()
    if cfg.ops == "int8":
        data = _dynamic_int8(data)
    return data


def _dynamic_int8(data: bytes) -> bytes:
    """Dynamic-range int8 weights (float activations) with ai-edge-quantizer's recipe."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(bytearray(data), recipe.dynamic_wi8_afp32())
    return bytes(q.quantize().quantized_model)


def add_metadata(data: bytes, entries: dict[str, bytes]) -> bytes:
    """Named metadata buffers (the schema's Model.metadata) added; buffers realigned."""
    from ai_edge_litert import schema_py_generated as schema

    from .align import load, serialize

    model = load(data)
    model.metadata = [x for x in (model.metadata or []) if x.name.decode() not in entries]
    for name, raw in entries.items():
        buf = schema.BufferT()
        buf.data = np.frombuffer(raw, np.uint8)
        model.buffers.append(buf)
        md = schema.MetadataT()
        md.name, md.buffer = name, len(model.buffers) - 1
        model.metadata.append(md)
    return serialize(model)


def read_metadata(data: bytes) -> dict[str, bytes]:
    """Every named metadata buffer of a .tflite (inline or stored at an offset)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(bytearray(data), 0)
    out = {}
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        b = m.Buffers(md.Buffer())
        if b.Offset() > 1:
            out[md.Name().decode()] = data[b.Offset() : b.Offset() + b.Size()]
        else:
            out[md.Name().decode()] = b.DataAsNumpy().tobytes() if b.DataLength() else b""
    return out


def export(model_path: str | Path, out: str | Path, cfg: ExportConfig) -> dict:
    """Load, convert, align, attach config and tokenizer, write atomically; returns a summary."""
    from ..models.checkpoint import load_checkpoint
    from .align import check_aligned

    _require_converter()
    out = Path(out)
    if out.suffix != ".tflite":
        raise TernvlmError(f"--out must end in .tflite, got {out}")
    model, processor = load_checkpoint(model_path)
    cfg.validate(model.cfg.decoder.max_seq_len)
    t0 = time.time()
    data = convert(model, cfg)
    d = model.cfg.decoder
    info = {
        "ops": cfg.ops,
        "prefill_len": cfg.prefill_len or d.max_seq_len,
        "cache_len": cfg.cache_len or d.max_seq_len,
        "prefill_logits": cfg.prefill_logits,
        "source": str(model_path),
        "parts": describe_parts(model, cfg.ops, cfg.act, cfg.head),
        "export": asdict(cfg),
    }
    config = {"model": model.cfg.to_dict(), "export": info}
    data = add_metadata(
        data,
        {
            META_CONFIG: json.dumps(config).encode(),
            META_TOKENIZER: processor.tokenizer.to_str().encode(),
        },
    )
    if check_aligned(data):
        raise TernvlmError("internal error: constant buffers not 64-byte aligned after realign")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return {"file": str(out), "bytes": len(data), "seconds": round(time.time() - t0, 1), **info}
