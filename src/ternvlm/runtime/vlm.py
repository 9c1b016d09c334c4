"""A ternvlm .tflite as a VLM: the same calls as the PyTorch model, run by LiteRT.

``TfliteVLM`` reads the model config and tokenizer from the file's metadata and drives the three
signatures. It quacks like ``models.vlm.VLM`` where evaluation and generation need it
(``encode_image``, ``model(input_ids, image_features=...)`` -> logits, ``cfg``, ``eval``), so
``ternvlm eval`` and ``ternvlm generate`` take a .tflite exactly like a checkpoint.

The KV cache lives on the host (one array per layer and kind, [1, L, kvh, D], position-major);
decode reads it and returns the new position's keys/values, which we write at ``pos``. With our
driver the cache arrays are decode's own inputs and prefill writes its keys/values straight into
their first rows (no copy and no second buffer).

Images: the exported prefill graph has a static ``[1, image_tokens, hidden]`` image-feature input,
room for exactly one image view per prompt. SmolVLM (Idefics3) image splitting (K tiles + a global
view, each ``image_tokens`` long) therefore does not run on a .tflite: the processor rebuilt from
the file's metadata has splitting turned off (one view per image, as transformers'
``do_image_splitting=False``; prompt layout and chat template are kept), and a prompt or feature
tensor with more image slots than the file was exported for raises a TernvlmError instead of
giving a wrong answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..config import VLMConfig
from ..errors import TernvlmError
from ..models.generate import GenerationConfig, pick_token, stop_set
from ..models.processor import processor_for

Runner = Callable[..., dict[str, np.ndarray]]  # runner(signature, **inputs) -> outputs


def read_tflite_metadata(path: str | Path) -> tuple[VLMConfig, dict, Tokenizer]:
    """Model config, export info (plus the custom ops the file uses) and tokenizer of a
    ternvlm .tflite."""
    from ..export.align import truncated_buffers
    from ..export.exporter import META_CONFIG, META_TOKENIZER, read_metadata

    p = Path(path)
    if not p.is_file():
        raise TernvlmError(f"no such file: {p}")
    data = p.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise TernvlmError(f"{p} is not a .tflite flatbuffer")
    try:
        if truncated_buffers(data):
            raise TernvlmError(f"{p} is truncated: its weights end past the end of the file")
        meta = read_metadata(data)
        custom_ops = custom_op_names(data)
    except TernvlmError:
        raise
    except Exception as e:  # a damaged flatbuffer fails anywhere inside the schema reader
        raise TernvlmError(f"{p} is not a readable .tflite file ({type(e).__name__})") from None
    if META_CONFIG not in meta or META_TOKENIZER not in meta:
        raise TernvlmError(f"{p} was not exported by ternvlm (no config/tokenizer metadata)")
    try:
        config = json.loads(meta[META_CONFIG])
        tok = Tokenizer.from_str(meta[META_TOKENIZER].decode())
        info = {**config["export"], "custom_ops": custom_ops}  # read here: the file is in memory
        return VLMConfig.from_dict(config["model"]), info, tok
    except Exception as e:
        raise TernvlmError(f"{p}: damaged ternvlm metadata ({type(e).__name__})") from None


def custom_op_names(data: bytes) -> list[str]:
    """Custom op codes a .tflite uses (empty: builtin ops only)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(bytearray(data), 0)
    codes = (m.OperatorCodes(i).CustomCode() for i in range(m.OperatorCodesLength()))
    return sorted({c.decode() for c in codes if c})


def _interpreter_runner(path: Path, threads: int, needed: list[str]) -> Runner:
    """The wheel's stock Interpreter: only for files without custom ops (``needed`` empty)."""
    from ai_edge_litert.interpreter import Interpreter

    if needed:
        raise TernvlmError(
            f"{path.name} uses custom ops {', '.join(needed)} that the stock LiteRT interpreter "
            "does not have; files with ternvlm custom ops need --backend litert"
        )
    try:
        it = Interpreter(str(path), num_threads=threads)
        it.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TernvlmError(
            f"the stock LiteRT interpreter cannot run {path.name} ({first}); files with ternvlm "
            "custom ops need --backend litert"
        ) from None
    runners = {s: it.get_signature_runner(s) for s in it.get_signature_list()}
    return lambda sig, **inputs: runners[sig](**inputs)


def _driver_runner(path: Path, threads: int) -> tuple[Runner, object]:
    """Our C API driver with the custom ops registered (ternvlm.runtime.litert)."""
    from .litert import LiteRtModel

    m = LiteRtModel(str(path), threads=threads)
    return (lambda sig, **inputs: m(sig, **inputs)), m


class TfliteVLM:
    def __init__(self, path: str | Path, threads: int = 1, backend: str = "litert") -> None:
        self.path = Path(path)
        self.cfg, self.export_info, tok = read_tflite_metadata(self.path)
        self.processor = processor_for(self.cfg, tok)
        if getattr(self.processor, "split", False):
            self.processor.split = False  # one image view: the static prefill input (see above)
        self.prefill_len = int(self.export_info["prefill_len"])
        self.cache_len = int(self.export_info["cache_len"])
        self.last_logits_only = self.export_info.get("prefill_logits") == "last"
        self._handle = None
        if backend == "interpreter":
            self._run = _interpreter_runner(self.path, threads, self.export_info["custom_ops"])
        elif backend == "litert":
            self._run, self._handle = _driver_runner(self.path, threads)
        else:
            raise TernvlmError(f"unknown backend {backend!r} (litert or interpreter)")
        d = self.cfg.decoder
        self._kv_shape = (1, self.cache_len, d.kv_heads, d.head_dim)
        names = [f"{c}_{i}" for i in range(d.layers) for c in "kv"]
        self._prefill_in_cache = False
        if self._handle is not None:  # the driver's own decode inputs (zeros): no copy per step
            self.cache = {n: self._handle.input_array("decode", n) for n in names}
            self._prefill_in_cache = self._bind_prefill_into_cache(names)
        else:
            self.cache = {n: np.zeros(self._kv_shape, np.float32) for n in names}
        self._kv_names = names

    def _bind_prefill_into_cache(self, names: list[str]) -> bool:
        """Prefill's keys/values [1, T, kvh, D] written into the first T rows of the cache."""
        if self.prefill_len > self.cache_len:
            return False
        try:
            for j, name in enumerate(names):
                rows = self.cache[name][:, : self.prefill_len]
                self._handle.bind("prefill", f"output_{j + 1}", rows, output=True)
        except TernvlmError:  # LiteRT wants more room than the cache has left: copy instead
            return False
        return True

    # -- VLM interface used by eval and generate ------------------------------------------
    def eval(self) -> TfliteVLM:
        return self

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TfliteVLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, image_tokens, hidden], one image per run (batch 1 graph)."""
        px = pixel_values.detach().float().numpy()
        out = [
            self._run("encode_image", pixel_values=np.ascontiguousarray(p[None]))["output_0"]
            for p in px
        ]
        return torch.from_numpy(np.concatenate(out))

    def __call__(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        cache=None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] by one prefill per row (rows padded to the exported length)."""
        if cache is not None:
            raise TernvlmError("TfliteVLM keeps its own cache: use prefill/decode")
        if self.last_logits_only:
            raise TernvlmError(
                f"{self.path} was exported with --prefill-logits last: it returns the last "
                "position's logits only; export with --prefill-logits all to score texts"
            )
        if image_features is None:
            if pixel_values is None:
                raise TernvlmError("a .tflite VLM needs an image (pixel_values or image_features)")
            image_features = self.encode_image(pixel_values)
        ids = input_ids.numpy()
        feats = image_features.detach().float().numpy()
        if feats.shape[0] != ids.shape[0]:
            raise TernvlmError(
                f"{self.path} takes one image view per prompt: got {feats.shape[0]} image "
                f"feature rows for {ids.shape[0]} prompts (image splitting is not supported)"
            )
        rows = [self.prefill(list(map(int, r)), feats[j : j + 1])[0] for j, r in enumerate(ids)]
        return torch.from_numpy(np.stack(rows))

    # -- the two decoder signatures ------------------------------------------------------
    def prefill(self, ids: list[int], image_features: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits [n, V] for a prompt of n tokens ([1, V]: the last one, for files exported
        with --prefill-logits last); the cache then holds positions [0, n)."""
        n = len(ids)
        if n > self.prefill_len:
            raise TernvlmError(
                f"prompt of {n} tokens exceeds the exported prefill length {self.prefill_len}"
            )
        room = self.cfg.image_tokens
        slots = sum(1 for t in ids if t == self.cfg.image_token_id)
        if slots > room or image_features.shape[:-1] != (1, room):
            views = int(np.prod(image_features.shape[:-1])) // max(room, 1)
            raise TernvlmError(
                f"{self.path} was exported for one image view of {room} image tokens per prompt; "
                f"got {slots} image-token slots and {views} image view(s) (SmolVLM image "
                "splitting is not supported on .tflite: turn it off, processor.split = False)"
            )
        x = np.full((1, self.prefill_len), self.cfg.pad_token_id, np.int32)
        x[0, :n] = ids
        extra = {"last": np.array([n - 1], np.int32)} if self.last_logits_only else {}
        feats = np.ascontiguousarray(image_features, np.float32)
        if self._handle is not None:  # in place: keys/values land in the cache (see __init__)
            h = self._handle
            for name, value in {"input_ids": x, "image_features": feats, **extra}.items():
                h.input_array("prefill", name)[...] = value
            h.run("prefill")
            out = {
                f"output_{j}": h.output_array("prefill", f"output_{j}")
                for j in range(len(self._kv_names) + 1)
            }
        else:
            out = self._run("prefill", input_ids=x, image_features=feats, **extra)
        if not self._prefill_in_cache:
            for j, name in enumerate(self._kv_names):
                self.cache[name][:, :n] = out[f"output_{j + 1}"][:, :n]
        return out["output_0"][0, : 1 if self.last_logits_only else n].copy(), n

    def decode(self, token: int, pos: int) -> np.ndarray:
        """Logits [V] of ``token`` at position ``pos`` (cache holds [0, pos)); caches it."""
        if not 0 <= pos < self.cache_len:
            raise TernvlmError(f"position {pos} is outside the exported cache of {self.cache_len}")
        if self._handle is not None:
            h = self._handle
            h.input_array("decode", "token")[...] = token
            h.input_array("decode", "pos")[...] = pos
            h.run("decode")
            out = {
                f"output_{j}": h.output_array("decode", f"output_{j}")
                for j in range(len(self._kv_names) + 1)
            }
        else:
            out = self._run(
                "decode",
                token=np.array([[token]], np.int32),
                pos=np.array([pos], np.int32),
                **self.cache,
            )
        for j, name in enumerate(self._kv_names):
            self.cache[name][:, pos : pos + 1] = out[f"output_{j + 1}"]
        return out["output_0"][0, -1].copy()

    def generate_ids(
        self, prompt_ids: list[int], pixels: torch.Tensor, g: GenerationConfig
    ) -> list[int]:
        """Like models.generate.generate_ids with the cache, on LiteRT."""
        stop = stop_set(self.cfg.eos_token_id, g)
        room = min(self.cfg.decoder.max_seq_len, self.cache_len) - len(prompt_ids)
        steps = max(0, min(g.max_new_tokens, room))
        gen = torch.Generator().manual_seed(g.seed)
        feats = self.encode_image(pixels).numpy()
        logits, pos = self.prefill(prompt_ids, feats)
        logits = logits[-1]
        out: list[int] = []
        for _ in range(steps):
            nxt = pick_token(torch.from_numpy(logits), g, gen)
            if nxt in stop:
                break
            out.append(nxt)
            if len(out) == steps:
                break
            logits = self.decode(nxt, pos)
            pos += 1
        return out
