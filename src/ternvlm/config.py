"""Dataclass configs for the VLM family, saved as JSON next to the weights.

Block details (norm type, MLP type, biases, parallel attention/MLP, partial rotary) are options,
so SmolVLM's llama decoder and Moondream2's Phi-1.5 decoder are configurations of one code base.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import TernvlmError

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
STEMS = ("patch", "conv")
CONNECTORS = ("linear", "mlp")
GELUS = ("erf", "tanh")
VISION_ACTS = ("gelu_tanh", "gelu", "quick_gelu")
RESIZES = ("stretch", "crop", "pad")


@dataclass
class VisionConfig:
    """SigLIP-style ViT encoder; CLIP (LLaVA's tower) through the options after ``image_std``."""

    image_size: int = 64
    patch_size: int = 8
    stem: str = "patch"  # "patch": one strided conv (SigLIP); "conv": 3x3 conv then patchify
    hidden: int = 128
    layers: int = 4  # blocks run (LLaVA: the blocks before the hidden state it reads)
    heads: int = 4
    mlp: int = 512
    norm_eps: float = 1e-6
    # Idefics3 (NaViT) positions: patch (i, j) of the grid takes the learned position of its
    # fractional bucket, computed in float32 as transformers does; on some grid sides (19, 25, ...)
    # rounding moves a row or column to its neighbour's position. False: patch k uses position k.
    position_buckets: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    act: str = "gelu_tanh"  # block MLP: "gelu_tanh" (SigLIP), "gelu" (exact), "quick_gelu" (CLIP)
    patch_bias: bool = True  # CLIP's patch conv has no bias
    class_token: bool = False  # CLIP: a learned class embedding before the patches, own position
    pre_norm: bool = False  # CLIP: LayerNorm ``pre_layernorm`` on the embeddings, before block 1
    post_norm: bool = True  # LayerNorm ``post_layernorm`` after the last block (LLaVA: none)
    drop_first_token: bool = False  # LLaVA "default" strategy: output token 0 is dropped
    # Image to square: "stretch" (resize), "crop" (shortest edge to image_size, then center
    # crop: CLIP), "pad" (pad to a square with the mean colour, then resize: LLaVA do_pad).
    resize: str = "stretch"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Feature vectors per image: patches, plus the class token, minus a dropped first one."""
        return self.num_patches + int(self.class_token) - int(self.drop_first_token)


@dataclass
class ConnectorConfig:
    """Idefics3-style connector: pixel shuffle by ``scale_factor`` then a projection."""

    scale_factor: int = 2
    kind: str = "linear"  # "linear" (Idefics3) or "mlp" (LLaVA: linear-GELU-linear)
    bias: bool = False
    mlp_hidden: int = 0  # "mlp": width between the two linears; 0 = decoder hidden (Moondream: 4x)
    gelu: str = "erf"  # "mlp": "erf" (exact GELU) or "tanh" (tanh-approximated, Moondream2)


@dataclass
class DecoderConfig:
    """Decoder-only language model; defaults describe a llama-style block."""

    vocab_size: int = 512
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    mlp: int = 512
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    partial_rotary: float = 1.0  # fraction of head dims that get rotary embeddings (Phi: 0.5)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp_type: str = "swiglu"
    attn_bias: bool = False
    mlp_bias: bool = False
    parallel_block: bool = False  # Phi-style x + attn(ln(x)) + mlp(ln(x))
    tie_embeddings: bool = True
    lm_head_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: int = 3
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    architecture: str = "tinyvlm"
    quantization_config: dict[str, Any] | None = None  # set on ternary/binary checkpoints
    # Text layout and image preprocessing of a Hugging Face processor the model was loaded with
    # (SmolVLM: image splitting, chat template, stop tokens; see models/hf_idefics3_processor.py;
    # LLaVA: chat template, image token expansion; models/hf_llava_processor.py),
    # kept so a saved or exported model is rebuilt with the same processor. None: the default
    # ``<bos> <image> x N prompt`` layout. Left out of the saved JSON when None.
    processor: dict[str, Any] | None = None

    @property
    def image_tokens(self) -> int:
        """Number of decoder positions one image occupies."""
        return self.vision.num_tokens // self.connector.scale_factor**2

    def validate(self) -> VLMConfig:
        v, c, d = self.vision, self.connector, self.decoder
        checks = [
            (
                v.image_size % v.patch_size == 0,
                "vision.image_size must be a multiple of patch_size",
            ),
            (v.hidden % v.heads == 0, "vision.hidden must be a multiple of vision.heads"),
            (v.stem in STEMS, f"vision.stem must be one of {STEMS}"),
            (v.layers >= 0, "vision.layers must be >= 0"),
            (v.act in VISION_ACTS, f"vision.act must be one of {VISION_ACTS}"),
            (v.resize in RESIZES, f"vision.resize must be one of {RESIZES}"),
            (v.patch_bias or v.stem == "patch", "vision.patch_bias=false needs stem 'patch'"),
            (
                not (v.position_buckets and v.class_token),
                "vision.position_buckets cannot be combined with vision.class_token",
            ),
            (
                c.scale_factor == 1 or v.class_token == v.drop_first_token,
                "connector.scale_factor must be 1 when the vision output is not the patch grid "
                "(vision.class_token kept or vision.drop_first_token without a class token)",
            ),
            (
                (v.image_size // v.patch_size) % c.scale_factor == 0,
                "patch grid side must be a multiple of connector.scale_factor",
            ),
            (c.kind in CONNECTORS, f"connector.kind must be one of {CONNECTORS}"),
            (c.gelu in GELUS, f"connector.gelu must be one of {GELUS}"),
            (c.mlp_hidden >= 0, "connector.mlp_hidden must be >= 0 (0 = decoder hidden)"),
            (d.hidden % d.heads == 0, "decoder.hidden must be a multiple of decoder.heads"),
            (d.heads % d.kv_heads == 0, "decoder.heads must be a multiple of decoder.kv_heads"),
            (d.norm in NORMS, f"decoder.norm must be one of {NORMS}"),
            (d.mlp_type in MLPS, f"decoder.mlp_type must be one of {MLPS}"),
            (0.0 < d.partial_rotary <= 1.0, "decoder.partial_rotary must be in (0, 1]"),
            (d.max_seq_len > self.image_tokens, "decoder.max_seq_len must exceed the image tokens"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TernvlmError(f"invalid model config: {msg}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["processor"] is None:  # configs saved before the field existed stay identical
            del data["processor"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        try:
            sub = {
                "vision": _build(VisionConfig, data.get("vision", {})),
                "connector": _build(ConnectorConfig, data.get("connector", {})),
                "decoder": _build(DecoderConfig, data.get("decoder", {})),
            }
            top = {k: v for k, v in data.items() if k not in sub}
            return _build(cls, {**top, **sub}, nested=True).validate()
        except (TypeError, ValueError) as exc:
            raise TernvlmError(f"invalid model config: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TernvlmError(f"missing model config: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TernvlmError(f"corrupt model config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise TernvlmError(f"corrupt model config {path}: expected a JSON object")
        return cls.from_dict(data)


def _build(cls, data: dict[str, Any], nested: bool = False):
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} expects an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)
