"""Export to .tflite: graph math in eager PyTorch, conversion, alignment, metadata, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ternvlm.errors import TernvlmError
from ternvlm.export import graphs
from ternvlm.export.linear import VARIANTS, export_copy
from ternvlm.models.checkpoint import save_checkpoint
from ternvlm.models.generate import GenerationConfig, generate_ids
from ternvlm.quant.api import quantize_
from ternvlm.quant.config import preset

from .conftest import tiny_config


def quantized(model, name: str = "ternvlm", **kw):
    cfg = preset(name, **kw)
    quantize_(model, cfg)
    model.cfg.quantization_config = cfg.to_dict()
    return model.eval()


@pytest.fixture()
def tiny_ternary(tiny):
    model, proc = tiny
    return quantized(model, "seed", parts=("vision", "connector", "decoder")), proc


def _prompt(proc, text="question: what colour is the circle? answer:"):
    return proc.encode(text).ids


def run_graphs(m, ids, pixels, next_tokens, prefill_len, cache_len):
    """Logits of the prompt and of each next token through the three eager export graphs."""
    d = m.cfg.decoder
    feats = graphs.EncodeImage(m)(pixels)
    x = torch.full((1, prefill_len), m.cfg.pad_token_id, dtype=torch.int32)
    x[0, : len(ids)] = torch.tensor(ids)
    out = graphs.Prefill(m, prefill_len)(x, feats)
    n = len(ids)
    names = [f"{c}_{i}" for i in range(d.layers) for c in "kv"]
    cache = {k: torch.zeros(1, cache_len, d.kv_heads, d.head_dim) for k in names}
    for j, k in enumerate(names):
        cache[k][:, :n] = out[1 + j][:, :n]
    steps = []
    for pos, t in enumerate(next_tokens, start=n):
        o = graphs.Decode(m, cache_len)(
            torch.tensor([[t]], dtype=torch.int32), torch.tensor([pos], dtype=torch.int32), **cache
        )
        for j, k in enumerate(names):
            cache[k][:, pos : pos + 1] = o[1 + j]
        steps.append(o[0][0, -1])
    return feats, out[0][0, :n], torch.stack(steps)


def reference(model, ids, pixels, next_tokens):
    feats = model.encode_image(pixels)
    cache = model.decoder.new_cache(1)
    logits = model(torch.tensor([ids]), image_features=feats, cache=cache)[0]
    steps = [model(torch.tensor([[t]]), cache=cache)[0, -1] for t in next_tokens]
    return feats, logits, torch.stack(steps)


@pytest.mark.parametrize("variant", ["ternary", "ternary158", "unpack", "ternary-builtin", "fp32"])
@pytest.mark.parametrize(
    "decoder",
    [
        {},
        {
            "norm": "layernorm",
            "mlp_type": "gelu",
            "parallel_block": True,
            "partial_rotary": 0.5,
            "attn_bias": True,
            "mlp_bias": True,
        },
    ],
)
@torch.no_grad()
def test_graphs_equal_model(tokenizer, variant, decoder):
    """prefill + decode with a host cache == the model with its KV cache (llama and Phi blocks)."""
    from ternvlm.models.processor import Processor
    from ternvlm.models.vlm import VLM

    torch.manual_seed(0)
    cfg = tiny_config(tokenizer.get_vocab_size(), **decoder)
    model = quantized(VLM(cfg), "seed", parts=("vision", "connector", "decoder"))
    proc = Processor(cfg, tokenizer)
    ids = _prompt(proc)
    pixels = torch.randn(1, 3, 32, 32)
    nxt = [17, 23, 11, 25]
    want = reference(model, ids, pixels, nxt)
    got = run_graphs(export_copy(model, variant, "f32", "fp32"), ids, pixels, nxt, 40, 64)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("variant", "head"),
    [
        ("ternary", "int8"),
        ("ternary", "int4"),
        ("binary", "int8"),
        ("fp32", "int4"),
        ("ternary-lut", "int8"),
    ],
)
@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_int8_activations_and_packed_heads(tokenizer, variant, head, tie):
    """Graphs == the export copy's own forward; the copy stays close to the model."""
    from ternvlm.models.processor import Processor
    from ternvlm.models.vlm import VLM

    torch.manual_seed(2)
    cfg = tiny_config(tokenizer.get_vocab_size(), tie_embeddings=tie)
    model = quantized(VLM(cfg), "binary" if variant == "binary" else "seed")
    proc = Processor(cfg, tokenizer)
    ids, pixels, nxt = _prompt(proc), torch.randn(1, 3, 32, 32), [17, 23, 11]
    m = export_copy(model, variant, "int8", head)
    emb, lm = m.decoder.embed_tokens, m.decoder.lm_head
    assert (emb.w is lm.w) == tie and emb.fmt == head
    if variant != "fp32":  # custom ops: q/k/v and gate/up fused into one matmul each
        layer = m.decoder.layers[0]
        att = layer.self_attn
        assert att.qkv_proj.n == att.q_proj.n + att.k_proj.n + att.v_proj.n
        assert layer.mlp.gate_up.n == 2 * layer.mlp.hidden
    exact = reference(m, ids, pixels, nxt)
    got = run_graphs(m, ids, pixels, nxt, 40, 64)
    for g, w in zip(got, exact, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    want = reference(model, ids, pixels, nxt)
    for g, w in zip(got[1:], want[1:], strict=True):  # logits: quantization error only
        rel = (g - w).norm() / w.norm()
        assert rel < (0.2 if head == "int4" else 0.05), rel


@torch.no_grad()
def test_binary_variant_and_bad_variants(tiny, tokenizer):
    model, proc = tiny
    with pytest.raises(TernvlmError, match="ternarize it first"):
        export_copy(model, "ternary")
    with pytest.raises(TernvlmError, match="unknown --ops"):
        export_copy(model, "int3")
    tern = quantized(model)
    with pytest.raises(TernvlmError, match="needs a binary model"):
        export_copy(tern, "binary")

    from ternvlm.models.vlm import VLM

    torch.manual_seed(1)
    b = quantized(VLM(tiny_config(tokenizer.get_vocab_size())), "binary")
    ids, pixels = _prompt(proc), torch.randn(1, 3, 32, 32)
    want = reference(b, ids, pixels, [4, 9])
    for variant in ("binary", "ternary", "unpack"):  # {-1, +1} fits every format
        got = run_graphs(export_copy(b, variant, "f32", "fp32"), ids, pixels, [4, 9], 40, 64)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_realign_moves_every_buffer_to_64_bytes():
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert import schema_py_generated as schema

    from ternvlm.export.align import check_aligned, load, realign, serialize
    from ternvlm.export.exporter import add_metadata, read_metadata

    m = schema.ModelT()
    m.version = 3
    m.buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel
    for n in (1, 3, 100, 4097):
        b = schema.BufferT()
        b.data = np.arange(n, dtype=np.uint8)
        m.buffers.append(b)
    import flatbuffers

    fb = flatbuffers.Builder(0)
    fb.Finish(m.Pack(fb), file_identifier=b"TFL3")
    raw = bytes(fb.Output())
    out = realign(raw)
    assert check_aligned(out) == []
    back = load(out)
    for i, n in enumerate((1, 3, 100, 4097), start=1):
        np.testing.assert_array_equal(back.buffers[i].data, np.arange(n, dtype=np.uint8))
    with_meta = add_metadata(out, {"a": b"hello", "b": b""})
    assert check_aligned(with_meta) == []
    meta = read_metadata(with_meta)
    assert meta["a"] == b"hello" and meta["b"] == b""
    assert read_metadata(serialize(load(with_meta)))["a"] == b"hello"


# ---- conversion (litert-torch) ----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A tiny ternary checkpoint exported as fp32 and ternary-builtin (stock-runtime files)."""
    pytest.importorskip("litert_torch")
    from ternvlm.export.exporter import ExportConfig, export
    from ternvlm.models.vlm import VLM

    torch.manual_seed(0)
    model = quantized(VLM(tiny_config(tokenizer.get_vocab_size())), "seed")
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(root / "ckpt", model, tokenizer)
    torch.manual_seed(1)
    binary = quantized(VLM(tiny_config(tokenizer.get_vocab_size())), "binary")
    save_checkpoint(root / "ckpt_binary", binary, tokenizer)
    files = {}
    for name, (variant, act, head) in EXPORTS.items():
        files[name] = root / f"{name}.tflite"
        src = root / ("ckpt_binary" if variant == "binary" else "ckpt")
        logits = "last" if name.endswith("-last") else "all"
        export(src, files[name], ExportConfig(variant, 40, 0, act, head, logits))
    return root / "ckpt", files


# file name -> (--ops, --act, --head)
EXPORTS = {
    "fp32": ("fp32", "int8", "auto"),
    "ternary-builtin": ("ternary-builtin", "int8", "auto"),
    "ternary": ("ternary", "int8", "auto"),
    "ternary-f32": ("ternary", "f32", "fp32"),
    "ternary158": ("ternary158", "int8", "int4"),
    "unpack": ("unpack", "int8", "auto"),
    "binary": ("binary", "f32", "int8"),
    "fp32-int4": ("fp32", "int8", "int4"),
    "ternary-last": ("ternary", "int8", "auto"),  # --prefill-logits last
    "ternary-lut": ("ternary-lut", "int8", "auto"),  # int7 activations, tile-interleaved weights
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("fp32", "interpreter"),
        ("ternary-builtin", "interpreter"),
        ("fp32", "litert"),
        ("ternary", "litert"),
        ("ternary-f32", "litert"),
        ("ternary158", "litert"),
        ("unpack", "litert"),
        ("binary", "litert"),
        ("fp32-int4", "litert"),
        ("ternary-last", "litert"),
        ("ternary-lut", "litert"),
    ],
)
def test_tflite_matches_pytorch(exported, name, backend):
    """LiteRT == the PyTorch export copy (same act / head settings), generations equal."""
    from ternvlm.data import shapes
    from ternvlm.export.align import check_aligned
    from ternvlm.models.checkpoint import load_checkpoint
    from ternvlm.runtime.vlm import TfliteVLM

    ckpt, files = exported
    variant, act, head = EXPORTS[name]
    if variant == "binary":
        ckpt = ckpt.with_name("ckpt_binary")
    model, proc = load_checkpoint(ckpt)
    model = export_copy(model, variant, act, head)
    data = files[name].read_bytes()
    assert check_aligned(data) == []
    two = variant in ("ternary", "ternary-lut")
    tv = TfliteVLM(files[name], backend=backend, threads=2 if two else 1)
    assert tv.cfg.to_dict() == model.cfg.to_dict() and tv.prefill_len == 40
    assert tv.export_info["ops"] == variant
    fused = variant in ("ternary", "ternary158", "binary", "ternary-lut")  # q/k/v fused
    assert ("DecodeAttention" in tv.export_info["custom_ops"]) == fused
    parts = tv.export_info["parts"]
    assert set(parts) == {"vision", "connector", "layers", "embedding", "head"}
    want_head = {"auto": "fp32" if variant in ("fp32", "ternary-builtin") else "int8"}.get(
        head, head
    )
    assert parts["embedding"] == want_head and parts["head"].startswith(want_head)
    images = [shapes.render(shapes.scene_for("test", i), 32) for i in range(3)]
    with torch.no_grad():
        for img, q in zip(
            images, ["caption:", "question: what shape? answer:", "caption:"], strict=True
        ):
            enc = proc.encode(q)
            px = proc.pixels([img])
            g = GenerationConfig(max_new_tokens=12)
            if name.endswith("-last"):  # generation only: scoring texts needs every position
                assert tv.generate_ids(enc.ids, px, g) == generate_ids(model, enc.ids, px, g)
                with pytest.raises(TernvlmError, match="prefill-logits all"):
                    tv(torch.tensor([enc.ids]), pixel_values=px)
                continue
            want = model(torch.tensor([enc.ids]), pixel_values=px)[0]
            got = tv(torch.tensor([enc.ids]), pixel_values=px)[0]
            span = float(want.max() - want.min())
            assert float((got - want).abs().max()) <= 1e-3 * span
            assert tv.generate_ids(enc.ids, px, g) == generate_ids(model, enc.ids, px, g)


@pytest.mark.slow
def test_export_bad_input(exported, tmp_path):
    from ternvlm.export.exporter import ExportConfig, export
    from ternvlm.runtime.vlm import TfliteVLM

    ckpt, files = exported
    with pytest.raises(TernvlmError, match="must end in .tflite"):
        export(ckpt, tmp_path / "x.bin", ExportConfig())
    with pytest.raises(TernvlmError, match="prefill_len must be"):
        export(ckpt, tmp_path / "x.tflite", ExportConfig(prefill_len=10_000))
    assert not (tmp_path / "x.tflite").exists()
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(TernvlmError, match="not a .tflite"):
        TfliteVLM(bad, backend="interpreter")
    full = files["fp32"].read_bytes()
    bad.write_bytes(full[: len(full) // 3])
    with pytest.raises(TernvlmError, match="truncated"):
        TfliteVLM(bad, backend="interpreter")
    with pytest.raises(TernvlmError, match="need --backend litert"):
        TfliteVLM(files["ternary"], backend="interpreter")  # our custom ops: not in the stock one
    tv = TfliteVLM(files["fp32"], backend="interpreter")
    with pytest.raises(TernvlmError, match="exceeds the exported prefill length"):
        tv.prefill([1] * 41, np.zeros((1, tv.cfg.image_tokens, tv.cfg.decoder.hidden), np.float32))
    with pytest.raises(TernvlmError, match="outside the exported cache"):
        tv.decode(1, 64)


def test_variants_listed_in_cli():
    from ternvlm.cli import build_parser

    args = build_parser().parse_args(["export", "default", "--out", "x.tflite", "--ops", "int8"])
    assert args.ops == "int8" and set(VARIANTS) >= {"ternary", "binary", "unpack", "int8"}


@pytest.mark.slow
def test_large_model_custom_options_are_inlined(exported):
    """Files near 2 GB keep custom options outside the flatbuffer; load() brings them back."""
    from ternvlm.export.align import load, serialize

    _, files = exported
    data = files["ternary"].read_bytes()
    model = load(data)
    ops = [op for sg in model.subgraphs for op in sg.operators if op.customOptions is not None]
    want = [bytes(np.asarray(op.customOptions, np.uint8)) for op in ops]
    for op in ops:  # the layout the converter writes for large models, offsets set below
        op.customOptions = None
        op.largeCustomOptionsOffset, op.largeCustomOptionsSize = 1, 32
    n = len(serialize(copy.deepcopy(model)))  # offsets are fixed-width: the size stays
    for i, op in enumerate(ops):
        op.largeCustomOptionsOffset = n + 32 * i
    moved = serialize(model)
    assert len(moved) == n
    back = load(moved + b"".join(want))
    got = [op for sg in back.subgraphs for op in sg.operators if op.customOptions is not None]
    assert [bytes(np.asarray(op.customOptions, np.uint8)) for op in got] == want
    assert all(op.largeCustomOptionsSize == 0 for sg in back.subgraphs for op in sg.operators)


def test_lut_variant_takes_int7_activations():
    """ternary-lut runs int7 activations whatever integer mode is asked; float ones are refused;
    the options record carries the mode (flag bit 2) both ways."""
    from ternvlm.export.linear import resolve_act
    from ternvlm.export.ops import OpOptions

    assert resolve_act("ternary-lut", "int8") == "int7"
    assert resolve_act("ternary-lut", "int7") == "int7"
    assert resolve_act("ternary", "int7") == "int7"  # any packed format can take int7
    with pytest.raises(TernvlmError, match="int7"):
        resolve_act("ternary-lut", "f32")
    opts = OpOptions("2bit-lut", 576, True, 0.0, False, True)
    raw = opts.to_bytes()
    assert int.from_bytes(raw[8:12], "little") == 5 and int.from_bytes(raw[12:16], "little") == 5
    assert OpOptions.from_bytes(raw) == opts
