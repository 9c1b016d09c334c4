"""The LiteRT driver (ternvlm.runtime.litert): our custom ops in .tflite files run by libLiteRt.so.

The models are converted here with litert-torch from ternvlm.export.ops (our ops lowered to
tfl.custom) and realigned with ternvlm.export.align, once per module: tests that need them are
marked slow. Results are checked against numpy and against the compiled kernels called directly.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from ternvlm.errors import TernvlmError
from ternvlm.quant.pack import pack, unpack
from ternvlm.runtime import kernels, litert

from .test_kernels import QMAX, int8_act_reference

RTOL = 1e-5  # relative to sum_k |x| |w| (+ |bias|): float32 sums in any order stay inside
KMAX = 300
LEADS = {"prefill": (2, 3), "decode": (1, 1)}  # x is [*lead, KMAX]: M = 6 and M = 1


@dataclass(frozen=True)
class Case:
    fmt: str
    n: int
    k: int
    cols: int  # scale columns: 1 per row, > 1 per group of k // cols
    bias: bool = False
    clip: float = 0.0
    act: str = "f32"  # or int8 / int7 (2bit-lut takes int7 only)


MATMULS = [
    Case("2bit", 7, 10, 1, bias=True),  # K % 4 = 2
    Case("2bit", 1, 64, 4, clip=0.5),  # N = 1, per-group scale
    Case("2bit", 37, 300, 3, bias=True),  # the blocked AVX2 path at M = 6
    Case("1.6bit", 5, 13, 1, bias=True, clip=1.0),  # K % 5 = 3
    Case("1.6bit", 16, 40, 8),
    Case("1bit", 3, 9, 3, bias=True),  # K % 8 = 1
    Case("1bit", 9, 32, 2, clip=2.0),
    Case("2bit", 4, 12, 1, bias=True),  # twins: same shapes, different options,
    Case("2bit", 4, 12, 1, clip=0.3),  # so the kernels must tell the nodes apart
    Case("2bit-lut", 37, 300, 3, bias=True, act="int7"),  # N = 37: rows padded to 64
]
CHAIN = Case("1.6bit", 3, 7, 1)  # after relu(MATMULS[0]): K = 7, a builtin op in between
UNPACKS = [Case("2bit", 6, 10, 2), Case("1.6bit", 4, 7, 1), Case("1bit", 5, 17, 1)]


def _weights(rng, c: Case):
    if c.fmt == "1bit":
        codes = rng.choice([-1, 1], size=(c.n, c.k))
    else:
        codes = rng.choice([-1, 0, 1], size=(c.n, c.k), p=[0.35, 0.3, 0.35])
    packed = pack(codes, c.fmt)
    scale = rng.uniform(0.5, 1.5, size=(c.n, c.cols)).astype(np.float32)
    bias = rng.normal(size=c.n).astype(np.float32)
    return packed, scale, bias


def dequant(packed, c: Case, scale):
    return unpack(packed, c.k, c.fmt)[: c.n].astype(np.float64) * np.repeat(
        scale.astype(np.float64), c.k // c.cols, axis=1
    )


def reference(x, c: Case, packed, scale, bias):
    """numpy y [*lead, N] and the magnitude that bounds float32 rounding."""
    w = dequant(packed, c, scale)
    x64 = x.astype(np.float64)
    y, mag = x64 @ w.T, np.abs(x64) @ np.abs(w).T
    if c.act != "f32":  # the integer-activation formula of tvk.h (bias and clip included)
        x2 = x.reshape(-1, c.k)
        b, clip, qmax = bias if c.bias else None, c.clip or None, QMAX[c.act]
        y = int8_act_reference(x2, packed, c.k, scale, c.fmt, b, clip, qmax)
        return y.reshape(*x.shape[:-1], c.n), mag + (np.abs(bias) if c.bias else 0)
    if c.bias:
        y, mag = y + bias, mag + np.abs(bias)
    if c.clip > 0:
        y = np.clip(y, -c.clip, c.clip)
    return y, mag


def kernel_reference(x, c: Case, packed, scale, bias):
    """The same product through ternvlm.runtime.kernels (what the custom op calls)."""
    x2 = np.ascontiguousarray(x.reshape(-1, c.k))
    kw = {"bias": bias if c.bias else None, "clip": c.clip or None}
    if c.act != "f32":
        y = kernels.matmul(x2, packed, c.k, scale, fmt=c.fmt, act=c.act, **kw)
    elif c.fmt == "1bit":
        y = kernels.binary_matmul(x2, packed, c.k, scale, **kw)
    else:
        y = kernels.ternary_matmul(x2, packed, c.k, scale, fmt=c.fmt, **kw)
    return y.reshape(*x.shape[:-1], c.n)


def assert_close(got, want, mag):
    assert got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want)
    assert (err <= RTOL * np.maximum(mag, 1e-6)).all(), float((err / np.maximum(mag, 1e-6)).max())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every case in one model with signatures prefill (x [2, 3, 300]) and decode ([1, 1, 300])
    sharing the weights; returns (aligned path, raw converter output path, weights)."""
    pytest.importorskip("litert_torch")
    import litert_torch
    import torch

    from ternvlm.export import ops
    from ternvlm.export.align import realign

    ops.register_lowerings()
    rng = np.random.default_rng(0)
    weights = [_weights(rng, c) for c in [*MATMULS, CHAIN, *UNPACKS]]

    class Zoo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, (packed, scale, bias) in enumerate(weights):
                self.register_buffer(f"w{i}", torch.from_numpy(packed.view(np.int8).copy()))
                self.register_buffer(f"s{i}", torch.from_numpy(scale))
                self.register_buffer(f"b{i}", torch.from_numpy(bias))

        def mm(self, i, c, x):
            w, s, b = getattr(self, f"w{i}"), getattr(self, f"s{i}"), getattr(self, f"b{i}")
            fid, int8, int7 = ops.fmt_id(c.fmt), c.act == "int8", c.act == "int7"
            return ops.packed_matmul(x, w, s, b, fid, c.k, c.bias, c.clip, int8, int7)

        def forward(self, x):
            outs = [self.mm(i, c, x[..., : c.k]) for i, c in enumerate(MATMULS)]
            outs.append(self.mm(len(MATMULS), CHAIN, torch.relu(outs[0])))
            for j, c in enumerate(UNPACKS):
                i = len(MATMULS) + 1 + j
                w, s = getattr(self, f"w{i}"), getattr(self, f"s{i}")
                outs.append(ops.packed_unpack(w, s, ops.fmt_id(c.fmt), c.k))
            return tuple(outs)

    m = Zoo().eval()
    conv = None
    for name, lead in LEADS.items():
        kw = {"sample_kwargs": {"x": torch.zeros(*lead, KMAX)}}
        conv = (litert_torch if conv is None else conv).signature(name, m, **kw)
    with torch.no_grad():
        edge = conv.convert()
    root = tmp_path_factory.mktemp("litert")
    raw = root / "raw.tflite"
    edge.export(str(raw))
    path = root / "zoo.tflite"
    path.write_bytes(realign(raw.read_bytes()))
    return path, raw, weights


def expected(x, weights):
    """numpy references of every output of the zoo, with their magnitudes."""
    outs = []
    for c, (packed, scale, bias) in zip(MATMULS, weights, strict=False):
        outs.append(reference(x[..., : c.k], c, packed, scale, bias))
    h = np.maximum(outs[0][0], 0).astype(np.float32)
    y, mag = reference(h, CHAIN, *weights[len(MATMULS)])
    outs.append((y, mag + 1e-3))  # h itself carries float32 rounding from the first op
    for j, c in enumerate(UNPACKS):
        packed, scale, _ = weights[len(MATMULS) + 1 + j]
        w = dequant(packed, c, scale)
        outs.append((w, np.abs(w)))
    return outs


def run_all(model, sig, x):
    out = model(sig, x=x)
    return [out[f"output_{i}"] for i in range(len(out))]


# ---- runs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_signatures_and_custom_ops(zoo):
    path, _, _ = zoo
    with litert.LiteRtModel(path) as m:
        assert set(m.signatures) == set(LEADS)
        n_out = len(MATMULS) + 1 + len(UNPACKS)
        for name, lead in LEADS.items():
            s = m.signatures[name]
            assert s.inputs == {"x": litert.TensorSpec("x", (*lead, KMAX), np.dtype(np.float32))}
            assert list(s.outputs) == [f"output_{i}" for i in range(n_out)]
            assert s.outputs["output_0"].shape == (*lead, MATMULS[0].n)
            assert s.outputs[f"output_{n_out - 1}"].shape == (UNPACKS[-1].n, UNPACKS[-1].k)
        assert m.custom_op_count == 2 * n_out  # every node of both signatures is ours


@pytest.mark.slow
def test_weights_shared_between_signatures(zoo):
    from ai_edge_litert import schema_py_generated as schema

    path, _, _ = zoo
    model = schema.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    codes = [oc.customCode for oc in model.operatorCodes]
    per_graph = []
    for g in model.subgraphs:
        custom = [op for op in g.operators if codes[op.opcodeIndex]]
        per_graph.append(
            sorted(g.tensors[op.inputs[1 if len(op.inputs) == 4 else 0]].buffer for op in custom)
        )
    assert len(per_graph) == 2 and per_graph[0] == per_graph[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", list(LEADS))
def test_ops_match_numpy_and_kernels(zoo, sig):
    path, _, weights = zoo
    rng = np.random.default_rng(1)
    x = rng.normal(size=(*LEADS[sig], KMAX)).astype(np.float32)
    with litert.LiteRtModel(path) as m:
        got = run_all(m, sig, x)
    for g, (want, mag) in zip(got, expected(x, weights), strict=True):
        assert_close(g, want, mag)
    for i, c in enumerate(MATMULS):  # the driver hands the kernels the right operands
        np.testing.assert_allclose(
            got[i], kernel_reference(x[..., : c.k], c, *weights[i]), rtol=1e-6, atol=1e-6
        )
    # the twins differ only by options: bias vs clip
    assert not np.allclose(got[7], got[8])


@pytest.mark.slow
def test_threads_give_the_same_result(zoo):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core")
    path, _, _ = zoo
    x = np.random.default_rng(2).normal(size=(*LEADS["prefill"], KMAX)).astype(np.float32)
    with litert.LiteRtModel(path, threads=1) as m1, litert.LiteRtModel(path, threads=2) as m2:
        for a, b in zip(run_all(m1, "prefill", x), run_all(m2, "prefill", x), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_in_place_arrays_and_bind(zoo):
    path, _, weights = zoo
    x = np.random.default_rng(3).normal(size=(*LEADS["decode"], KMAX)).astype(np.float32)
    with litert.LiteRtModel(path) as m:
        want = m("decode", x=x)
        xin = m.input_array("decode", "x")
        y = m.output_array("decode", "output_2")
        assert xin.ctypes.data % 64 == 0 and y.ctypes.data % 64 == 0
        xin[...] = 0
        m.run("decode")
        assert m.output_array("decode", "output_2") is y
        np.testing.assert_array_equal(y[0, 0], weights[2][2])  # x = 0: y = bias
        xin[...] = x
        m.run("decode")
        np.testing.assert_array_equal(y, want["output_2"])
        # caller memory
        mine = litert.aligned_empty((*LEADS["decode"], KMAX), np.float32)
        mine[...] = x
        m.bind("decode", "x", mine)
        assert m.input_array("decode", "x") is mine
        out = litert.aligned_empty((*LEADS["decode"], MATMULS[2].n), np.float32)
        m.bind("decode", "output_2", out, output=True)
        m.run("decode")
        np.testing.assert_array_equal(out, want["output_2"])
        with pytest.raises(TernvlmError, match="64-byte aligned"):
            m.bind("decode", "x", np.zeros((1, 1, KMAX + 1), np.float32)[..., 1:])
        with pytest.raises(TernvlmError, match="must be float32"):
            m.bind("decode", "x", np.zeros((1, 1, KMAX), np.float64))
        with pytest.raises(TernvlmError, match="has no input 'y'"):
            m.input_array("decode", "y")
        with pytest.raises(TernvlmError, match="has no output"):
            m.output_array("decode", "x")
    with pytest.raises(TernvlmError, match="closed"):
        m.run("decode")


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.slow
def test_wrong_inputs(zoo):
    path, _, _ = zoo
    with litert.LiteRtModel(path) as m:
        good = np.zeros((1, 1, KMAX), np.float32)
        with pytest.raises(TernvlmError, match="has shape"):
            m("decode", x=np.zeros((1, 2, KMAX), np.float32))
        with pytest.raises(TernvlmError, match="must be float32"):
            m("decode", x=good.astype(np.float64))
        with pytest.raises(TernvlmError, match="numpy array"):
            m("decode", x=good.tolist())
        with pytest.raises(TernvlmError, match="missing input"):
            m("decode")
        with pytest.raises(TernvlmError, match="no input 'z'"):
            m("decode", x=good, z=good)
        with pytest.raises(TernvlmError, match="no signature 'encode'"):
            m("encode", x=good)
        m("decode", x=good)  # still fine afterwards


@pytest.mark.slow
def test_unaligned_constants_are_refused(zoo):
    from ternvlm.export.align import check_aligned

    _, raw, _ = zoo
    assert check_aligned(raw.read_bytes())  # the converter aligns to 4 bytes only
    with pytest.raises(TernvlmError, match=r"not 64-byte aligned.*Unaligned host memory"):
        litert.LiteRtModel(raw)


@pytest.mark.slow
def test_truncated_and_damaged_files(zoo, tmp_path):
    path, _, _ = zoo
    data = path.read_bytes()
    bad = tmp_path / "bad.tflite"
    for cut, why in [(len(data) // 3, "not a valid .tflite"), (len(data) - 10, "external buffer")]:
        bad.write_bytes(data[:cut])
        with pytest.raises(TernvlmError, match=why):
            litert.LiteRtModel(bad)
    damaged = bytearray(data)
    damaged[12:400] = b"\xff" * 388
    bad.write_bytes(bytes(damaged))
    with pytest.raises(TernvlmError, match="not a valid .tflite"):
        litert.LiteRtModel(bad)


def _edit_options(data: bytes, edit) -> bytes:
    """The model with ``edit(options bytes) -> bytes`` applied to MATMULS[0] in one signature."""
    from ternvlm.export.align import load, serialize

    model = load(data)
    codes = [oc.customCode for oc in model.operatorCodes]
    for op in model.subgraphs[0].operators:
        opts = bytes(bytearray(op.customOptions)) if op.customOptions is not None else b""
        if codes[op.opcodeIndex] == b"TernaryMatMul" and opts[16:24] == struct.pack("<q", 10):
            op.customOptions = list(edit(opts))
            return serialize(model)
    raise AssertionError("MATMULS[0] not found")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda b: b"XXXX" + b[4:], 'do not start with "TVK1"'),
        (lambda b: b[:4] + struct.pack("<i", 2) + b[8:], "version 2"),
        (lambda b: b[:8] + struct.pack("<i", 1) + b[12:], "does not match the op"),
        (lambda b: b[:16] + struct.pack("<q", 30) + b[24:], "rows of 3 bytes"),
        (lambda b: b[:31], "31 bytes"),
        (lambda b: b[:28] + struct.pack("<i", 5), "reserved"),
        (lambda b: b[:8] + struct.pack("<ii", 5, 1) + b[16:], "need int7 activations"),
        (lambda b: b[:8] + struct.pack("<ii", 0, 7) + b[16:], "both int8 and int7"),
        (lambda b: b[:8] + struct.pack("<ii", 5, 5) + b[16:], "whole tiles of 32"),  # N = 7
    ],
)
def test_bad_custom_options(zoo, tmp_path, edit, why):
    path, _, _ = zoo
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(_edit_options(path.read_bytes(), edit))
    with pytest.raises(TernvlmError, match=why):
        litert.LiteRtModel(bad)


def _first_custom(model):
    codes = [oc.customCode for oc in model.operatorCodes]
    return next(op for op in model.subgraphs[0].operators if codes[op.opcodeIndex])


def _alias_outputs(model):
    outs = model.signatureDefs[0].outputs
    outs[1].tensorIndex = outs[0].tensorIndex


def _unnamed_output(model):
    model.signatureDefs[1].outputs[2].name = None


def _write_constant(model):
    op = _first_custom(model)
    graph = model.subgraphs[0]
    graph.tensors[op.outputs[0]].buffer = graph.tensors[op.inputs[1]].buffer


def _no_inputs(model):
    model.subgraphs[0].operators[0].inputs = []


def _reversed_ops(model):
    model.subgraphs[0].operators.reverse()


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", [_alias_outputs, _unnamed_output, _write_constant, _no_inputs, _reversed_ops]
)
def test_damaged_graphs_are_refused(zoo, tmp_path, damage):
    """Files LiteRT's verifier accepts but that crash its interpreter (seen by fuzzing)."""
    from ternvlm.export.align import load, serialize

    path, _, _ = zoo
    model = load(path.read_bytes())
    damage(model)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(serialize(model))
    with pytest.raises(TernvlmError, match="damaged .tflite"):
        with litert.LiteRtModel(bad) as m:
            for sig in m.signatures:
                m.run(sig)


@pytest.mark.slow
def test_missing_op_fails_at_first_run(zoo, tmp_path):
    from ternvlm.export.align import load, serialize

    path, _, _ = zoo
    model = load(path.read_bytes())
    for oc in model.operatorCodes:
        if oc.customCode == b"TernaryUnpack":
            oc.customCode = b"NotTernvlm"
    bad = tmp_path / "foreign.tflite"
    bad.write_bytes(serialize(model))
    with litert.LiteRtModel(bad) as m:
        with pytest.raises(TernvlmError, match=r"unresolved custom op.*NotTernvlm"):
            m("decode", x=np.zeros((1, 1, KMAX), np.float32))


def test_not_a_flatbuffer(tmp_path):
    bad = tmp_path / "junk.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(TernvlmError, match="not a .tflite"):
        litert.LiteRtModel(bad)
    bad.write_bytes(b"\x10\x00\x00\x00TFL3" + b"\x00" * 64)  # the identifier, nothing valid
    with pytest.raises(TernvlmError, match="not a valid .tflite|cannot compile|no signatures"):
        litert.LiteRtModel(bad)
    bad.write_bytes(b"")
    with pytest.raises(TernvlmError, match="not a .tflite"):
        litert.LiteRtModel(bad)
    with pytest.raises(TernvlmError, match="no such file"):
        litert.LiteRtModel(tmp_path / "missing.tflite")


@pytest.mark.parametrize("threads", [0, -1, (os.cpu_count() or 1) + 1, 1.5, True])
def test_bad_thread_counts(tmp_path, threads):
    with pytest.raises(TernvlmError, match="threads must be an integer in"):
        litert.LiteRtModel(tmp_path / "any.tflite", threads=threads)


def test_missing_litert_package(monkeypatch, tmp_path):
    real = litert.importlib.util.find_spec
    monkeypatch.delenv("TERNVLM_LITERT_LIB", raising=False)
    monkeypatch.setattr(
        litert.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ai_edge_litert" else real(name, *a),
    )
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"\x10\x00\x00\x00TFL3")
    with pytest.raises(TernvlmError, match=r"pip install ai-edge-litert==2\.3\.0"):
        litert.LiteRtModel(bad)


def test_litert_library_without_the_api(monkeypatch, tmp_path):
    pytest.importorskip("ai_edge_litert")
    # a real shared library that is not LiteRT: the compiled kernels themselves
    monkeypatch.setenv("TERNVLM_LITERT_LIB", kernels.library_path())
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"\x10\x00\x00\x00TFL3")
    with pytest.raises(TernvlmError, match="has no function LiteRtCreateEnvironment"):
        litert.LiteRtModel(bad)
