"""QuantConfig: what ``quantize_`` does to a model (torchao-style config object), and presets.

The ``seed`` preset reproduces the recipe of the paper's code exactly (per-row k-means with 10
Lloyd iterations, latent weights clip(w/m, -1, 1) thresholded at +-0.5, learned per-row scale and
bias, outputs clipped at +-100, text decoder only); every improvement we add is measured against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import TernvlmError
from .groups import Granularity
from .init import BINARY_INITS, TERNARY_INITS

PARTS = ("vision", "connector", "decoder")
SCALE_MODES = ("learned", "recompute")


@dataclass
class QuantConfig:
    bits: str = "ternary"  # "ternary" ({-1,0,1} x scale) or "binary" ({-1,1} x scale)
    init: str = "kmeans"
    granularity: str = "row"  # "tensor", "row" or "group:G"
    parts: tuple[str, ...] = PARTS  # which sub-models get their nn.Linear layers quantized
    include_lm_head: bool = False  # the LM head (tied to the embeddings) stays float by default
    kmeans_iters: int = 100  # Lloyd iterations cap (k-means runs to convergence below it)
    scale: str = "learned"  # "learned" (a parameter) or "recompute" (L2-optimal given the codes)
    latent_clip: float | None = 1.0  # latent range in units of m (None: unclipped, BitNet-like)
    learn_bias: bool = False  # add a learned per-output bias (the seed's recipe)
    output_clip: float | None = None  # clamp layer outputs to +-value (the seed used 100)
    seed: int = 0  # for the ``random`` init
    name: str = "custom"
    exclude: tuple[str, ...] = field(default_factory=tuple)  # module-name substrings left float

    def validate(self) -> QuantConfig:
        if self.bits not in ("ternary", "binary"):
            raise TernvlmError(f"unknown bits {self.bits!r}; expected ternary or binary")
        inits = TERNARY_INITS if self.bits == "ternary" else BINARY_INITS
        if self.init not in inits:
            raise TernvlmError(
                f"unknown {self.bits} init {self.init!r}; expected one of {', '.join(inits)}"
            )
        if self.init == "kmeans_asym":
            raise TernvlmError(
                "kmeans_asym has three free centroids and no symmetric scale: it is a "
                "reconstruction-only init (see benchmarks); use kmeans or optimal for training"
            )
        Granularity.parse(self.granularity)
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise TernvlmError(f"unknown parts {bad or '(none)'}; choose from {', '.join(PARTS)}")
        if self.scale not in SCALE_MODES:
            raise TernvlmError(f"unknown scale mode {self.scale!r}; expected learned or recompute")
        if self.kmeans_iters < 1:
            raise TernvlmError("kmeans_iters must be at least 1")
        if self.latent_clip is not None and self.latent_clip < 1:
            raise TernvlmError("latent_clip must be at least 1 (or None)")
        if self.output_clip is not None and self.output_clip <= 0:
            raise TernvlmError("output_clip must be positive")
        self.parts = tuple(self.parts)
        self.exclude = tuple(self.exclude)
        return self

    @property
    def gran(self) -> Granularity:
        return Granularity.parse(self.granularity)

    @property
    def pack_format(self) -> str:
        return "2bit" if self.bits == "ternary" else "1bit"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TernvlmError(f"invalid quantization_config: unknown fields {sorted(unknown)}")
        data = dict(data)
        for k in ("parts", "exclude"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data).validate()


def preset(name: str, **overrides: Any) -> QuantConfig:
    """Named recipes: ``seed`` (the paper's), ``ternvlm`` (ours), ``binary``."""
    presets = {
        "seed": dict(
            bits="ternary",
            init="kmeans",
            granularity="row",
            parts=("decoder",),
            kmeans_iters=10,
            scale="learned",
            learn_bias=True,
            output_clip=100.0,
        ),
        "ternvlm": dict(bits="ternary", init="kmeans", granularity="row"),
        "binary": dict(bits="binary", init="kmeans", granularity="row"),
    }
    if name not in presets:
        raise TernvlmError(f"unknown preset {name!r}; expected one of {', '.join(presets)}")
    return QuantConfig(**{**presets[name], "name": name, **overrides}).validate()
