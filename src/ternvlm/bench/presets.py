"""Speed shapes: random-weight models with the dimensions of real edge VLMs.

Only the sizes matter for memory and speed, so the weights are random (seeded) and ternarized
post-training with k-means (no fine-tuning); perplexity of such models means nothing and is not
reported. ``tiny`` is the shape of ``ternvlm bench --quick``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig
from ..errors import TernvlmError

# SigLIP-base-like encoder (SmolVLM-256M/500M use the 93M SigLIP base patch-16 at 512 px)
_SIGLIP_BASE = dict(image_size=512, patch_size=16, hidden=768, layers=12, heads=12, mlp=3072)


def _smolvlm(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(**_SIGLIP_BASE),
        connector=ConnectorConfig(scale_factor=4, kind="linear"),
        decoder=DecoderConfig(
            vocab_size=49152,
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            mlp=mlp,
            max_seq_len=8192,
            rope_theta=100000.0,
            tie_embeddings=True,
        ),
        architecture="smolvlm-shaped",
    )


PRESETS: dict[str, Callable[[], VLMConfig]] = {
    "smolvlm-256m": lambda: _smolvlm(576, 30, 9, 3, 1536),
    "smolvlm-500m": lambda: _smolvlm(960, 32, 15, 5, 2560),
    "tiny": lambda: VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden=32, layers=1, heads=2, mlp=64),
        connector=ConnectorConfig(scale_factor=2),
        decoder=DecoderConfig(
            vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, max_seq_len=64
        ),
        architecture="tiny",
    ),
}


def preset_config(name: str) -> VLMConfig:
    """The config of preset ``name`` (validated)."""
    if name not in PRESETS:
        raise TernvlmError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


def save_ptq(model, bits: str, tokenizer, out: Path, card: str) -> None:
    """A post-training k-means quantized copy of ``model`` (``bits``: ternary or binary), saved
    as a checkpoint that records its recipe; ``model`` itself is left float."""
    from ..models.checkpoint import save_checkpoint
    from ..quant.api import quantize_
    from ..quant.config import preset

    q = copy.deepcopy(model)
    qc = preset("ternvlm" if bits == "ternary" else "binary")
    quantize_(q, qc, progress=True)
    q.cfg = copy.deepcopy(q.cfg)
    q.cfg.quantization_config = qc.to_dict()
    save_checkpoint(out, q, tokenizer, card=card)


def build_preset(
    name: str, out: Path, bits: tuple[str, ...] = ("ternary", "binary"), seed: int = 0
) -> dict[str, Path]:
    """Random float checkpoint of preset ``name`` plus its post-training k-means quantizations.

    Returns {"float": dir, "ternary": dir, "binary": dir}; existing checkpoints of the same
    preset are reused (a second bench run skips the build).
    """
    from ..models.checkpoint import load_checkpoint, save_checkpoint
    from ..models.vlm import VLM

    cfg = preset_config(name)
    tok = load_checkpoint("default")[1].tokenizer  # any tokenizer whose ids fit the vocab
    if tok.get_vocab_size() > cfg.decoder.vocab_size:
        raise TernvlmError("internal error: preset vocab smaller than the tokenizer")
    dirs = {"float": out / "float", **{b: out / b for b in bits}}
    if all((d / "config.json").exists() for d in dirs.values()):
        return dirs
    torch.manual_seed(seed)
    model = VLM(cfg).eval()
    with torch.no_grad():  # nn.Embedding's N(0, 1) would make a tied head's logits huge
        model.decoder.embed_tokens.weight.normal_(0.0, 0.02)
    save_checkpoint(dirs["float"], model, tok, card=f"random weights, preset {name}, seed {seed}")
    for b in bits:
        save_ptq(model, b, tok, dirs[b], f"k-means PTQ ({b}) of preset {name}")
    return dirs
