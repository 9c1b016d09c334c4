"""The llama.cpp peer: GGUF mapping, quantized types as stored, timing dict, F32 logits parity."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from ternvlm.bench import llamacpp  # noqa: E402
from ternvlm.config import DecoderConfig  # noqa: E402
from ternvlm.errors import TernvlmError  # noqa: E402
from ternvlm.models.decoder import Decoder  # noqa: E402


def ternarize_(dec: Decoder) -> Decoder:
    """Make every block projection exactly ternary per row (TWN: 0.7 mean|w| threshold)."""
    with torch.no_grad():
        for name, mod in dec.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("layers."):
                w = mod.weight
                keep = w.abs() > 0.7 * w.abs().mean(1, keepdim=True)
                scale = (w.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
                w.copy_(torch.sign(w) * keep * scale)
    return dec


def make_decoder(hidden: int, heads: int, tie: bool = False) -> tuple[Decoder, DecoderConfig]:
    """Untied by default: a tied head makes the last input token the trivial argmax."""
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=512,
        hidden=hidden,
        layers=2,
        heads=heads,
        kv_heads=2,
        mlp=512,
        max_seq_len=64,
        rope_theta=10000.0,
        tie_embeddings=tie,
    )
    return ternarize_(Decoder(cfg).eval()), cfg


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """F32 and TQ2_0 (Q4_0 head) files for hidden 256 (TQ2_0 fits) and 192 (it does not)."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for hidden, heads in ((256, 4), (192, 4)):
        dec, cfg = make_decoder(hidden, heads)
        f32 = llamacpp.write_gguf(dec, cfg, d / f"h{hidden}-f32.gguf")
        tq2 = llamacpp.quantize_gguf(f32, d / f"h{hidden}-tq2.gguf", "TQ2_0", "Q4_0", 1)
        out[hidden] = (dec, cfg, f32, tq2)
    return out


def test_tq2_stored_on_256_wide_rows(ggufs):
    _, cfg, f32, tq2 = ggufs[256]
    assert set(llamacpp.tensor_types(f32).values()) == {"F32"}
    types = llamacpp.tensor_types(tq2)
    assert len(types) == 3 + 9 * cfg.layers
    for i in range(cfg.layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert types[f"blk.{i}.{part}.weight"] == "TQ2_0"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    summary = llamacpp.type_summary(types)
    assert summary == {
        "layers": "TQ2_0 x 14",
        "head": "Q4_0",
        "embedding": "Q4_0",
        "norms": "F32 x 5",
    }


def test_fallback_is_reported_for_hidden_192(ggufs):
    types = llamacpp.tensor_types(ggufs[192][3])
    # Rows of 192 (q, k, v, o, gate, up) cannot be TQ2_0; down_proj's rows of 512 can.
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["blk.0.attn_output.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "TQ2_0"
    assert llamacpp.type_summary(types)["layers"] == "Q4_0 x 12, TQ2_0 x 2"


IDS = [5, 99, 300, 17, 42, 260, 7, 511]


def reference_logits(dec: Decoder, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return dec(dec.embed_tokens(torch.tensor([ids])))[0, -1].numpy()


def test_f32_gguf_matches_pytorch_decoder(ggufs):
    """Same next-token logits from llama.cpp (F32 weights) and our decoder: the mapping is right.

    llama.cpp keeps K/V in F16, so the logits differ by ~2e-4 std; leaving out the q/k rope
    permutation gives errors of ~0.05-0.1 std, far outside the tolerance.
    """
    for dec, cfg, f32, _ in ggufs.values():
        ref = reference_logits(dec, IDS)
        got = llamacpp.last_logits(f32, IDS)
        assert got.shape == (cfg.vocab_size,)
        np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3 * ref.std())
        assert int(got.argmax()) == int(ref.argmax())


def test_tied_head_without_output_tensor(tmp_path):
    dec, cfg = make_decoder(256, 4, tie=True)
    f32 = llamacpp.write_gguf(dec, cfg, tmp_path / "tied.gguf", write_output=False)
    ref = reference_logits(dec, IDS)
    np.testing.assert_allclose(llamacpp.last_logits(f32, IDS), ref, rtol=0, atol=5e-3 * ref.std())
    q = llamacpp.quantize_gguf(f32, tmp_path / "tied-tq2.gguf", "TQ2_0", "Q8_0")
    summary = llamacpp.type_summary(llamacpp.tensor_types(q))
    assert summary["head"] == "tied (Q8_0)" and summary["layers"] == "TQ2_0 x 14"


def test_quantlinear_with_biases(tmp_path):
    """The seed recipe: QuantLinear blocks with learned biases (q/k biases follow the rope layout)."""
    from torch import nn

    from ternvlm.quant.api import quantize_
    from ternvlm.quant.config import preset

    dec, cfg = make_decoder(256, 4)
    holder = nn.Module()
    holder.decoder = dec
    quantize_(holder, preset("seed"))
    with torch.no_grad():
        for name, mod in dec.named_modules():
            if hasattr(mod, "weight_q"):
                assert mod.bias is not None, name
                mod.bias.normal_(0, 0.05)
    f32 = llamacpp.write_gguf(dec, cfg, tmp_path / "seed.gguf")
    types = llamacpp.tensor_types(f32)
    assert types["blk.1.attn_q.bias"] == "F32" and types["blk.0.ffn_down.bias"] == "F32"
    ref = reference_logits(dec, IDS)
    np.testing.assert_allclose(llamacpp.last_logits(f32, IDS), ref, rtol=0, atol=5e-3 * ref.std())
    q = llamacpp.quantize_gguf(f32, tmp_path / "seed-tq2.gguf", "TQ2_0", "Q8_0")
    summary = llamacpp.type_summary(llamacpp.tensor_types(q))
    assert summary["layers"] == "TQ2_0 x 14" and summary["biases"] == "F32 x 14"


def test_tq2_gguf_close_to_pytorch_decoder(ggufs):
    """Ternary rows survive TQ2_0 exactly; only activation/head quantization differ."""
    dec, _, _, tq2 = ggufs[256]
    ref = reference_logits(dec, IDS)
    got = llamacpp.last_logits(tq2, IDS)
    assert np.corrcoef(got, ref)[0, 1] > 0.99


def _check_result(r: dict, repeats: int) -> None:
    for key in ("ttft_ms", "decode_tok_s"):
        s = r[key]
        assert set(s) == {"median", "min", "max"}
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert r["repeats"] == repeats


def test_measure(ggufs):
    r = llamacpp.measure(ggufs[256][3], threads=1, prompt_tokens=4, gen_tokens=4, repeats=2)
    _check_result(r, repeats=1)
    assert r["n_ctx"] == 8 and r["model_mb"] > 0


def test_measure_in_child_reports_rss(ggufs):
    r = llamacpp.measure_in_child(ggufs[256][3], 1, 4, 4, 3)
    _check_result(r, repeats=2)
    # The child imports neither torch nor the rest of ternvlm: its baseline is small.
    assert 0 < r["rss_start_mb"] <= r["rss_before_load_mb"] < min(150, r["peak_rss_mb"])


def test_fallback_file_runs(ggufs):
    """Q4_0 fallback rows compute too; on CPUs where llama.cpp's repacked (AMX) matmul crashes,
    measure_in_child retries without weight repacking and says so."""
    dec, _, _, tq2 = ggufs[192]
    ref = reference_logits(dec, IDS)
    got = llamacpp.last_logits(tq2, IDS, extra_bufts=False)  # in-process: no crash risk
    assert np.corrcoef(got, ref)[0, 1] > 0.98
    r = llamacpp.measure_in_child(tq2, 1, 4, 4, 2)
    _check_result(r, repeats=1)
    assert r["extra_bufts"] is ("extra_bufts_crash" not in r)
    r = llamacpp.measure_in_child(tq2, 1, 4, 4, 2, extra_bufts=False)
    assert r["extra_bufts"] is False and "extra_bufts_crash" not in r


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(TernvlmError, match="ftype"):
        llamacpp.quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q3_X")
    with pytest.raises(TernvlmError, match="no GGUF"):
        llamacpp.quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q8_0")
    bad = DecoderConfig(norm="layernorm", vocab_size=300)
    with pytest.raises(TernvlmError, match="rmsnorm"):
        llamacpp.write_gguf(Decoder(bad), bad, tmp_path / "x.gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(TernvlmError, match=r"ternvlm\[bench\]"):
        llamacpp.measure(tmp_path / "a.gguf", 1, 4, 4, 1)
