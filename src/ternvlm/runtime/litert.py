"""Run a ternvlm ``.tflite`` on LiteRT, with our custom operators, from numpy.

The wheel ``ai-edge-litert`` ships the runtime as ``libLiteRt.so`` with a C API; its Python
``Interpreter``/``CompiledModel`` cannot take C++ custom ops. Our compiled library
(``ternvlm._kernels``, C ABI in kernels/litert_api.h) loads that runtime at run time, registers
TernaryMatMul, TernaryMatMul158, BinaryMatMul and TernaryUnpack and drives the model; this module
reaches it through ctypes.

    with LiteRtModel("model.tflite", threads=2) as m:
        m.signatures["decode"].inputs          # {name: TensorSpec(name, shape, dtype)}
        out = m("decode", token=tok, pos=pos, **cache)   # copies in, returns copies

    # no copies: fill the persistent, 64-byte aligned arrays in place and run
    m.input_array("decode", "token")[...] = 7
    m.run("decode")
    logits = m.output_array("decode", "output_0")

Every signature tensor has one array, allocated at load and kept until ``close()`` (the KV cache
can live in them; ``bind`` swaps in caller arrays, e.g. to ping-pong two cache sets). A model is not
thread-safe. Every problem raises TernvlmError with one line.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TernvlmError
from .kernels import library_path, open_library

LITERT_REQUIREMENT = "ai-edge-litert==2.3.0"
ALIGN = 64
# LiteRtElementType -> numpy dtype (the kTfLite* type codes)
_DTYPES = {
    1: np.float32,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    6: np.bool_,
    7: np.int16,
    8: np.complex64,
    9: np.int8,
    10: np.float16,
    11: np.float64,
    12: np.complex128,
    13: np.uint64,
    16: np.uint32,
    17: np.uint16,
}
_ERR_SIZE = 4096
_MAP_BYTES = 64 * 1024  # host arrays at least this big get their own mapping
_lib: ctypes.CDLL | None = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class SignatureSpec:
    """A signature's inputs and outputs, in the model's graph order."""

    name: str
    index: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


def litert_library() -> str:
    """Path of the wheel's ``libLiteRt.so`` (TERNVLM_LITERT_LIB overrides it)."""
    override = os.environ.get("TERNVLM_LITERT_LIB")
    if override:
        return override
    try:
        spec = importlib.util.find_spec("ai_edge_litert")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TernvlmError(
            "running a .tflite needs LiteRT: pip install "
            f"{LITERT_REQUIREMENT} (or pip install 'ternvlm[runtime]')"
        )
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "libLiteRt.so"
        if lib.is_file():
            return str(lib)
    raise TernvlmError(
        f"ai_edge_litert has no libLiteRt.so; reinstall it: pip install {LITERT_REQUIREMENT}"
    )


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    lib = open_library()
    if not hasattr(lib, "tvr_open"):
        raise TernvlmError(f"{library_path()} has no LiteRT driver; rebuild it: pip install -e .")
    p, i32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sig = {
        "tvr_open": ([ctypes.c_char_p, ctypes.c_char_p, i32, ctypes.c_char_p, sz], p),
        "tvr_close": ([p], None),
        "tvr_last_error": ([p], ctypes.c_char_p),
        "tvr_num_signatures": ([p], i32),
        "tvr_signature_name": ([p, i32], ctypes.c_char_p),
        "tvr_num_tensors": ([p, i32, i32], i32),
        "tvr_tensor_info": (
            [
                p,
                i32,
                i32,
                i32,
                ctypes.POINTER(ctypes.c_char_p),
                ctypes.POINTER(i32),
                ctypes.POINTER(i32),
                ctypes.POINTER(ctypes.c_int64),
                ctypes.POINTER(sz),
                ctypes.POINTER(sz),
            ],
            i32,
        ),
        "tvr_bind": ([p, i32, i32, i32, p, sz], i32),
        "tvr_run": ([p, i32], i32),
        "tvr_num_custom_ops": ([p], i32),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    _lib = lib
    return lib


def aligned_empty(shape: tuple[int, ...], dtype, nbytes: int = 0) -> np.ndarray:
    """A C-contiguous array whose data starts on a 64-byte boundary, in a memory block that
    holds at least ``nbytes`` bytes from there (what LiteRT may touch; see ``bind``)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    room = max(size, nbytes, 1)
    if room >= _MAP_BYTES:
        # its own anonymous mapping: zero pages that nobody writes never become resident (a
        # calloc'd block may be memset by malloc, e.g. once glibc's mmap threshold has grown)
        raw = np.frombuffer(mmap.mmap(-1, room), dtype=np.uint8)
        return raw[:size].view(dtype).reshape(shape)  # page-aligned
    raw = np.zeros(room + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + size].view(dtype).reshape(shape)


class LiteRtModel:
    """A .tflite compiled for the CPU with our custom ops; see the module docstring."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self._handle = None
        self.path = Path(path)
        cores = os.cpu_count() or 1
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
            raise TernvlmError(f"threads must be an integer in [1, {cores}], got {threads!r}")
        if not self.path.is_file():
            raise TernvlmError(f"no such file: {self.path}")
        self.threads = threads
        lib = _library()
        litert_lib = litert_library()
        problem = _structure_problem(self.path)
        if problem:
            raise TernvlmError(f"{self.path} is a damaged .tflite file: {problem}")
        err = ctypes.create_string_buffer(_ERR_SIZE)
        handle = lib.tvr_open(litert_lib.encode(), str(self.path).encode(), threads, err, _ERR_SIZE)
        if not handle:
            raise TernvlmError(err.value.decode(errors="replace") or f"cannot open {self.path}")
        self._handle = handle
        self._lib = lib
        try:
            self._bytes: dict[tuple[str, int, str], int] = {}  # LiteRT's buffer sizes
            self.signatures = self._read_signatures()
            self.custom_op_count = lib.tvr_num_custom_ops(handle)
            self._arrays: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
            for s in self.signatures.values():
                self._arrays[s.name] = ({}, {})
                for out, specs in ((0, s.inputs), (1, s.outputs)):
                    for j, t in enumerate(specs.values()):
                        need = self._bytes[(s.name, out, t.name)]
                        try:
                            a = aligned_empty(t.shape, t.dtype, need)
                        except MemoryError:
                            raise TernvlmError(
                                f"{self.path}: no memory for {t.name!r} of {s.name!r} "
                                f"({need} bytes)"
                            ) from None
                        self._bind(s, out, j, t.name, a)
        except BaseException:
            self.close()
            raise

    # -- signatures ---------------------------------------------------------------------
    def _read_signatures(self) -> dict[str, SignatureSpec]:
        lib, h = self._lib, self._handle
        sigs = {}
        for i in range(lib.tvr_num_signatures(h)):
            name = lib.tvr_signature_name(h, i).decode(errors="replace")
            groups: list[dict[str, TensorSpec]] = []
            for out in (0, 1):
                specs = {}
                for j in range(lib.tvr_num_tensors(h, i, out)):
                    tname, dtype, rank = ctypes.c_char_p(), ctypes.c_int(), ctypes.c_int()
                    dims = (ctypes.c_int64 * 8)()
                    nbytes, need = ctypes.c_size_t(), ctypes.c_size_t()
                    if lib.tvr_tensor_info(h, i, out, j, tname, dtype, rank, dims, nbytes, need):
                        raise TernvlmError(f"{self.path}: cannot read signature {name!r}")
                    tn = tname.value.decode(errors="replace")
                    if dtype.value not in _DTYPES:
                        raise TernvlmError(
                            f"{self.path}: {tn!r} of {name!r} has unsupported type {dtype.value}"
                        )
                    specs[tn] = TensorSpec(
                        tn,
                        tuple(dims[r] for r in range(rank.value)),
                        np.dtype(_DTYPES[dtype.value]),
                    )
                    self._bytes[(name, out, tn)] = need.value
                groups.append(specs)
            sigs[name] = SignatureSpec(name, i, groups[0], groups[1])
        return sigs

    def _signature(self, sig: str) -> SignatureSpec:
        if self._handle is None:
            raise TernvlmError(f"{self.path.name}: the model is closed")
        s = self.signatures.get(sig) if isinstance(sig, str) else None
        if s is None:
            raise TernvlmError(
                f"{self.path.name} has no signature {sig!r}; it has {', '.join(self.signatures)}"
            )
        return s

    def _spec(self, sig: str, name: str, out: int) -> tuple[SignatureSpec, int, TensorSpec]:
        s = self._signature(sig)
        specs = s.outputs if out else s.inputs
        if name not in specs:
            kind = "output" if out else "input"
            raise TernvlmError(
                f"signature {sig!r} has no {kind} {name!r}; its {kind}s: {', '.join(specs)}"
            )
        return s, list(specs).index(name), specs[name]

    # -- buffers ------------------------------------------------------------------------
    def _bind(self, s: SignatureSpec, out: int, j: int, name: str, a: np.ndarray) -> None:
        if self._lib.tvr_bind(self._handle, s.index, out, j, a.ctypes.data, _room(a)):
            raise TernvlmError(self._lib.tvr_last_error(self._handle).decode(errors="replace"))
        self._arrays[s.name][out][name] = a

    def input_array(self, sig: str, name: str) -> np.ndarray:
        """The array LiteRT reads ``name`` from: fill it in place before ``run``."""
        self._spec(sig, name, 0)
        return self._arrays[sig][0][name]

    def output_array(self, sig: str, name: str) -> np.ndarray:
        """The array ``run`` writes ``name`` to (overwritten by the next run of ``sig``)."""
        self._spec(sig, name, 1)
        return self._arrays[sig][1][name]

    def bind(self, sig: str, name: str, array: np.ndarray, output: bool = False) -> None:
        """Use ``array`` (64-byte aligned, C-contiguous, exact shape and dtype; see
        ``aligned_empty``) for a tensor from now on; the model keeps a reference."""
        s, j, t = self._spec(sig, name, int(output))
        _check_array(f"{sig}.{name}", array, t)
        if not array.flags.c_contiguous:
            raise TernvlmError(f"{sig}.{name}: the array must be C-contiguous")
        if array.ctypes.data % ALIGN:
            raise TernvlmError(f"{sig}.{name}: the array must be 64-byte aligned (aligned_empty)")
        if not array.flags.writeable:
            raise TernvlmError(f"{sig}.{name}: the array must be writeable")
        need = self._bytes[(sig, int(output), name)]
        if _room(array) < need:
            raise TernvlmError(
                f"{sig}.{name}: LiteRT needs {need} bytes; use aligned_empty(shape, dtype, {need})"
            )
        self._bind(s, int(output), j, name, array)

    # -- running ------------------------------------------------------------------------
    def run(self, sig: str) -> None:
        """Run ``sig`` on its arrays (inputs read, outputs written in place)."""
        s = self._signature(sig)
        if self._lib.tvr_run(self._handle, s.index):
            msg = self._lib.tvr_last_error(self._handle).decode(errors="replace")
            raise TernvlmError(f"{self.path.name}: {msg}")

    def __call__(self, sig: str, **inputs) -> dict[str, np.ndarray]:
        """Copy ``inputs`` (every input, exact shape and dtype) in, run, return output copies."""
        s = self._signature(sig)
        missing = [n for n in s.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in s.inputs]
        if unknown:
            raise TernvlmError(
                f"signature {sig!r} has no input {unknown[0]!r}; its inputs: {', '.join(s.inputs)}"
            )
        if missing:
            raise TernvlmError(f"signature {sig!r} is missing input(s): {', '.join(missing)}")
        for name, value in inputs.items():
            _check_array(f"{sig}.{name}", value, s.inputs[name])
        for name, value in inputs.items():
            self._arrays[sig][0][name][...] = value
        self.run(sig)
        return {name: a.copy() for name, a in self._arrays[sig][1].items()}

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Release the runtime (idempotent). Arrays handed out stay valid numpy memory."""
        if self._handle is not None:
            self._lib.tvr_close(self._handle)
            self._handle = None

    def __enter__(self) -> LiteRtModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _room(a: np.ndarray) -> int:
    """Bytes from ``a``'s first element to the end of the memory block it lives in."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base.ctypes.data + base.nbytes - a.ctypes.data


def _check_array(what: str, value, spec: TensorSpec) -> None:
    if not isinstance(value, np.ndarray):
        raise TernvlmError(f"{what} must be a numpy array, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        raise TernvlmError(f"{what} must be {spec.dtype.name}, got {value.dtype.name}")
    if value.shape != spec.shape:
        raise TernvlmError(f"{what} has shape {value.shape}, expected {spec.shape}")


def _structure_problem(path: Path) -> str:
    """Index and name checks LiteRT leaves undone: its flatbuffer verifier checks offsets only,
    and a damaged file whose offsets still verify can crash the interpreter. "" if none found.
    Files the schema reader cannot even walk are left to LiteRT's verifier (a clear error)."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if len(mm) < 8 or mm[4:8] != b"TFL3":
                return ""
            return _walk(schema.Model.GetRootAs(mm, 0))
    except Exception:
        return ""


_MAX_ELEMENTS = 2**31  # per tensor: 8 GB of float32, far beyond any ternvlm model
_NO_INPUT_OPS = {32, 129, 142}  # CUSTOM, CALL_ONCE, VAR_HANDLE: every other builtin has inputs


def _ints(vector) -> list[int]:
    """A flatbuffer int vector (``...AsNumpy()``, 0 when absent) as a list."""
    return vector.tolist() if isinstance(vector, np.ndarray) else []


def _walk(model) -> str:
    n_sub, n_codes, n_buf = (
        model.SubgraphsLength(),
        model.OperatorCodesLength(),
        model.BuffersLength(),
    )
    constant: dict[int, bool] = {}  # buffer -> holds data
    codes = []
    for i in range(n_codes):
        oc = model.OperatorCodes(i)
        codes.append(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()))
    tensors, graph_io, named = [], [], []
    for g in range(n_sub):
        sg = model.Subgraphs(g)
        n_t = sg.TensorsLength()
        tensors.append(n_t)
        named.append(set())
        where = f"subgraph {g}"
        graph_in, graph_out = _ints(sg.InputsAsNumpy()), _ints(sg.OutputsAsNumpy())
        if any(not 0 <= t < n_t for t in graph_in + graph_out):
            return f"{where}: its inputs or outputs refer to a tensor outside 0..{n_t - 1}"
        graph_io.append((set(graph_in), set(graph_out)))
        ready = set(graph_in)  # tensors an operator may read: inputs, constants, variables
        fixed = set()  # constants: no operator may write them
        for t in range(n_t):
            tensor = sg.Tensors(t)
            b = tensor.Buffer()
            if not 0 <= b < max(n_buf, 1):
                return f"{where}: tensor {t} refers to buffer {b} of {n_buf}"
            shape = _ints(tensor.ShapeAsNumpy())
            if any(d < 0 for d in shape) or math.prod(shape) >= _MAX_ELEMENTS:
                return f"{where}: tensor {t} has shape {shape}"
            if b not in constant:
                buf = model.Buffers(b)
                constant[b] = b > 0 and (buf.DataLength() > 0 or buf.Offset() > 1)
            if constant[b]:
                fixed.add(t)
            if constant[b] or tensor.IsVariable():
                ready.add(t)
            if tensor.Name() is not None:
                named[g].add(t)
        written = set(graph_in)
        for o in range(sg.OperatorsLength()):
            op = sg.Operators(o)
            if not 0 <= op.OpcodeIndex() < n_codes:
                return f"{where}: operator {o} has opcode {op.OpcodeIndex()} of {n_codes}"
            ins, outs = _ints(op.InputsAsNumpy()), _ints(op.OutputsAsNumpy())
            if not outs or (not ins and codes[op.OpcodeIndex()] not in _NO_INPUT_OPS):
                return f"{where}: operator {o} has no inputs or no outputs"
            if any(not -1 <= t < n_t for t in ins) or any(not 0 <= t < n_t for t in outs):
                return f"{where}: operator {o} refers to a tensor outside 0..{n_t - 1}"
            if any(t >= 0 and t not in ready for t in ins):  # operators run in file order
                return f"{where}: operator {o} reads a tensor before anything writes it"
            out_set = set(outs)
            if len(out_set) < len(outs) or out_set & (written | fixed) or out_set & set(ins):
                return f"{where}: operator {o} writes a constant or an already written tensor"
            written |= out_set
            ready |= out_set
    keys = set()
    for i in range(model.SignatureDefsLength()):
        sd = model.SignatureDefs(i)
        g = sd.SubgraphIndex()
        if sd.SignatureKey() is None or sd.SignatureKey() in keys or not 0 <= g < n_sub:
            return f"signature {i} has no name, a repeated name or no subgraph"
        keys.add(sd.SignatureKey())
        for kind, count, get, allowed in (
            ("input", sd.InputsLength(), sd.Inputs, graph_io[g][0]),
            ("output", sd.OutputsLength(), sd.Outputs, graph_io[g][1]),
        ):
            seen = set()
            for j in range(count):
                tm = get(j)
                name, t = tm.Name(), tm.TensorIndex()
                if name is None or t not in allowed or t not in named[g] or {name, t} & seen:
                    key = sd.SignatureKey().decode(errors="replace")
                    return f"signature {key!r}: {kind} {j} is not one of its graph's {kind}s"
                seen.update((name, t))
    return ""
