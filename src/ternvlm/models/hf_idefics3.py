"""Hugging Face Idefics3 checkpoints (SmolVLM) loaded onto ternvlm's own :class:`VLM`.

Idefics3 is a configuration of our one model family, not a second network:

* vision: SigLIP ViT (``patch_embedding`` conv with bias, learned positions, pre-LN blocks with a
  tanh-GELU MLP, ``post_layernorm``) = :class:`~ternvlm.models.vision.VisionEncoder`;
* connector: pixel shuffle by ``scale_factor`` then ``modality_projection.proj`` (linear, no bias)
  = :class:`~ternvlm.models.connector.Connector` with ``kind="linear"``;
* decoder: llama (RMSNorm, RoPE, SwiGLU, grouped-query attention, separate or tied ``lm_head``)
  = :class:`~ternvlm.models.decoder.Decoder`;
* merge: the image features replace the ``<image>`` token embeddings in order (transformers'
  ``masked_scatter``), as :meth:`VLM.embed` does.

Only the folder layout of ``Idefics3ForConditionalGeneration.save_pretrained`` and
``Idefics3Processor.save_pretrained`` is read (config.json, model.safetensors or its sharded index,
tokenizer.json, and when present processor_config.json / preprocessor_config.json, the chat
template, tokenizer_config.json, generation_config.json): transformers itself is not needed.

Preprocessing: when the tokenizer has Idefics3's image tokens (``<fake_token_around_image>``,
``<global-img>``: every SmolVLM), :func:`load_idefics3` returns a
:class:`~ternvlm.models.hf_idefics3_processor.SmolVLMProcessor`: transformers' image splitting
(LANCZOS tiles plus a global view), prompt expansion, chat template and stop tokens, with its
settings stored in ``VLMConfig.processor`` so saved and exported models keep them. Otherwise the
plain ``<bos> <image> x N prompt`` layout with one bicubic-resized image of the encoder's size.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig
from ..errors import TernvlmError
from .checkpoint import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    load_weights,
    state_dict_for_save,
    weight_problems,
)
from .hf_idefics3_processor import read_settings
from .processor import Processor, processor_for
from .tokenizer import load_tokenizer
from .vlm import VLM

WEIGHTS_INDEX, PREPROCESSOR = "model.safetensors.index.json", "preprocessor_config.json"

SUPPORTED_MODEL_TYPES = ("idefics3",)  # SmolVLM-256M/500M/2.2B (-Instruct) are model_type idefics3
_TEXT_MODEL_TYPES = ("llama",)
_VISION_ACTS = ("gelu_pytorch_tanh", "gelu_new")  # both are tanh-approximated GELU
_TEXT_ACTS = ("silu", "swish")

# save_pretrained writes a *diff* config.json: keys equal to the class defaults are left out, so
# they are restored from these tables (transformers 5.x Idefics3VisionConfig / LlamaConfig /
# Idefics3Config defaults).
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_LLAMA_DEFAULTS: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: as many as attention heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_parameters": None,
    "rope_scaling": None,  # transformers 4.x name of rope_parameters
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
}
_TOP_DEFAULTS: dict[str, Any] = {
    "image_token_id": 128257,
    "tie_word_embeddings": False,
    "scale_factor": 2,
}

# (our name prefix, transformers name prefix); one table for both directions.
_NAMES = (
    ("vision.patch_embedding.", "model.vision_model.embeddings.patch_embedding."),
    ("vision.position_embedding.", "model.vision_model.embeddings.position_embedding."),
    ("vision.layers.", "model.vision_model.encoder.layers."),
    ("vision.post_layernorm.", "model.vision_model.post_layernorm."),
    ("connector.proj.", "model.connector.modality_projection.proj."),
    ("decoder.lm_head.", "lm_head."),
    ("decoder.", "model.text_model."),
)
_EMBED, _HEAD = "model.text_model.embed_tokens.weight", "lm_head.weight"
# An Idefics3Model (no LM head class around it) saves its tensors without the "model." prefix.
_BARE_PREFIXES = ("vision_model.", "connector.", "text_model.")

# owner/name, optionally @revision (a branch, tag or commit: vikhyatk/moondream2@2024-05-08)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_.-]+)?")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja"]  # chat_template.jinja


def swap_prefix(name: str, pairs, reverse: bool = False) -> str | None:
    """``name`` with the first matching prefix of (ours, theirs) ``pairs`` swapped (theirs ->
    ours when ``reverse``); None when no prefix matches."""
    for mine, theirs in pairs:
        src, dst = (theirs, mine) if reverse else (mine, theirs)
        if name.startswith(src):
            return dst + name[len(src) :]
    return None


def hf_name(ours: str) -> str:
    """Our state-dict key -> the transformers key of the same tensor."""
    name = swap_prefix(ours, _NAMES)
    if name is None:
        raise KeyError(ours)
    return name


def our_name(theirs: str) -> str | None:
    """A transformers key -> our key, or None when the tensor has no place in our model."""
    return swap_prefix(theirs, _NAMES, reverse=True)


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict()
    raise TernvlmError(
        f"expected a Hugging Face config (dict or PretrainedConfig), got {hf_config!r}"
    )


def _unsupported(model_type: Any) -> TernvlmError:
    return TernvlmError(
        f"unsupported Hugging Face model_type {model_type!r}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _square(value: Any, name: str, arch: str = "Idefics3") -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise TernvlmError(f"unsupported {arch} config: non-square vision {name} {value}")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TernvlmError(f"invalid {arch} config: vision {name} {value!r}") from None


def _one_id(value: Any, name: str, default: int, arch: str = "Idefics3") -> int:
    """Token id from a config value that may be None, an int or a list (first one is kept)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return default
    if not isinstance(value, int):
        raise TernvlmError(f"invalid {arch} config: {name} must be an integer, got {value!r}")
    return value


def _rope(t: dict[str, Any], arch: str = "Idefics3") -> tuple[float, float]:
    """(rope_theta, partial_rotary) from a llama config of transformers 4.x or 5.x."""
    params = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise TernvlmError(f"unsupported {arch} config: rope_parameters {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise TernvlmError(
            f"unsupported {arch} config: rope_type {kind!r} (only 'default' RoPE is implemented)"
        )
    theta = params.get("rope_theta", t.get("rope_theta"))
    partial = params.get("partial_rotary_factor", t.get("partial_rotary_factor"))
    return float(theta if theta is not None else 10000.0), float(partial or 1.0)


def llama_decoder(t: dict[str, Any], hidden: int, heads: int, tie: bool, arch: str = "Idefics3"):
    """Our DecoderConfig for a transformers LlamaConfig dict (defaults already filled in)."""
    theta, partial = _rope(t, arch)
    return DecoderConfig(
        vocab_size=int(t["vocab_size"]),
        hidden=hidden,
        layers=int(t["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(t["num_key_value_heads"] or heads),
        mlp=int(t["intermediate_size"]),
        max_seq_len=int(t["max_position_embeddings"]),
        rope_theta=theta,
        partial_rotary=partial,
        norm="rmsnorm",
        norm_eps=float(t["rms_norm_eps"]),
        mlp_type="swiglu",
        attn_bias=bool(t["attention_bias"]),
        mlp_bias=bool(t["mlp_bias"]),
        tie_embeddings=tie,
    )


def reject_quantized(data: dict[str, Any], arch: str) -> None:
    """A Hub checkpoint already quantized (GPTQ, AWQ, bitsandbytes...) is not a float teacher."""
    quant = data.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise TernvlmError(
            f"unsupported {arch} checkpoint: it is quantized ({method}); use the float checkpoint"
        )


def config_from_hf(hf_config: Any) -> VLMConfig:
    """A transformers ``Idefics3Config`` (object or config.json dict) -> our :class:`VLMConfig`."""
    data = _as_dict(hf_config)
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(model_type)
    reject_quantized(data, "Idefics3")
    top = {**_TOP_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    v = {**_VISION_DEFAULTS, **(data.get("vision_config") or {})}
    # Without a text_config, transformers builds llama with rms_norm_eps 1e-5 (Idefics3Config).
    t = {**_LLAMA_DEFAULTS, **(data.get("text_config") or {"rms_norm_eps": 1e-5})}
    if t["model_type"] not in _TEXT_MODEL_TYPES:
        raise TernvlmError(
            f"unsupported Idefics3 text_config model_type {t['model_type']!r}; "
            f"supported: {', '.join(_TEXT_MODEL_TYPES)}"
        )
    if v["hidden_act"] not in _VISION_ACTS:
        raise TernvlmError(f"unsupported Idefics3 config: vision hidden_act {v['hidden_act']!r}")
    if t["hidden_act"] not in _TEXT_ACTS:
        raise TernvlmError(f"unsupported Idefics3 config: text hidden_act {t['hidden_act']!r}")
    if v["num_channels"] != 3:
        raise TernvlmError(f"unsupported Idefics3 config: {v['num_channels']} image channels")
    try:
        hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
        if t["head_dim"] not in (None, hidden // heads):
            raise TernvlmError(
                f"unsupported Idefics3 config: text head_dim {t['head_dim']} != "
                f"hidden_size / num_attention_heads = {hidden // heads}"
            )
        eos = _one_id(t["eos_token_id"], "eos_token_id", 2)
        cfg = VLMConfig(
            vision=VisionConfig(
                image_size=_square(v["image_size"], "image_size"),
                patch_size=_square(v["patch_size"], "patch_size"),
                stem="patch",
                hidden=int(v["hidden_size"]),
                layers=int(v["num_hidden_layers"]),
                heads=int(v["num_attention_heads"]),
                mlp=int(v["intermediate_size"]),
                norm_eps=float(v["layer_norm_eps"]),
                position_buckets=True,
            ),
            connector=ConnectorConfig(scale_factor=int(top["scale_factor"]), kind="linear"),
            decoder=llama_decoder(t, hidden, heads, bool(top["tie_word_embeddings"])),
            image_token_id=_one_id(top["image_token_id"], "image_token_id", 0),
            bos_token_id=_one_id(t["bos_token_id"], "bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=_one_id(t["pad_token_id"], "pad_token_id", eos),
            architecture="idefics3",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TernvlmError(f"invalid Idefics3 config: {exc}") from None
    if not 0 <= cfg.image_token_id < cfg.decoder.vocab_size:
        raise TernvlmError(
            f"invalid Idefics3 config: image_token_id {cfg.image_token_id} is outside the "
            f"vocabulary of {cfg.decoder.vocab_size}"
        )
    return cfg.validate()


def local_folder(path: str | Path) -> Path:
    """A local checkpoint folder, or a Hub id (``owner/name[@revision]``) downloaded by
    huggingface_hub (config, weights and tokenizer files only; cached by huggingface_hub)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise TernvlmError(f"checkpoint must be a folder with {CONFIG} and {WEIGHTS}: {p}")
    name = str(path)
    if not _HUB_ID.fullmatch(name) or ".." in name:
        raise TernvlmError(f"checkpoint not found: {p}")
    repo, _, revision = name.partition("@")
    rev_arg = f" --revision {revision}" if revision else ""
    hint = (
        f"download it where there is network (`hf download {repo}{rev_arg} --local-dir DIR`) "
        "and pass DIR"
    )
    try:
        import huggingface_hub
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise TernvlmError(
            f"checkpoint not found: {name} is not a local folder, and huggingface_hub is not "
            f"installed to fetch it from the Hub; {hint}"
        ) from None
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo, revision=revision or None, allow_patterns=_HUB_FILES
            )
        )
    except RepositoryNotFoundError:
        raise TernvlmError(
            f"checkpoint not found: {name} is neither a local folder nor a Hub repository "
            "you can access"
        ) from None
    except Exception as exc:  # no network: connection errors, offline mode, nothing cached
        reason = (str(exc).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise TernvlmError(
            f"checkpoint not found: {name} is not a local folder, and it cannot be downloaded "
            f"from the Hugging Face Hub: there is no network ({type(exc).__name__}: {reason}); "
            f"{hint}"
        ) from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TernvlmError(f"missing {what}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TernvlmError(f"corrupt {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TernvlmError(f"corrupt {what} {path}: expected a JSON object")
    return data


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of model.safetensors (or its shards) with canonical transformers names."""
    single, index = folder / WEIGHTS, folder / WEIGHTS_INDEX
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = _read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise TernvlmError(f"corrupt weights index {index}: no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        raise TernvlmError(f"missing weights: {single} (or a sharded {WEIGHTS_INDEX})")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise TernvlmError(f"missing weights: {f}")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TernvlmError(f"corrupt weights {f}: {exc}") from None
        for k, val in part.items():
            sd["model." + k if k.startswith(_BARE_PREFIXES) else k] = val
    return sd, str(single if single.exists() else index)


def _resolve_tie(
    cfg: VLMConfig, data: dict[str, Any], sd: dict[str, torch.Tensor]
) -> tuple[VLMConfig, dict[str, torch.Tensor]]:
    """Tie the LM head to the embeddings as transformers would load this checkpoint.

    Tied when the config says so and the file has no separate head, or the head equals the
    embeddings; a head that differs is kept separate. A file without a head whose text_config
    asks for tying (some SmolVLM configs carry the flag there only) is tied as well.
    """
    tie = cfg.decoder.tie_embeddings
    text_tie = bool((data.get("text_config") or {}).get("tie_word_embeddings"))
    if _HEAD not in sd:
        tie = tie or text_tie
    elif tie and not (_EMBED in sd and torch.equal(sd[_HEAD], sd[_EMBED])):
        tie = False
    if tie:
        sd = {k: val for k, val in sd.items() if k != _HEAD}
    if tie != cfg.decoder.tie_embeddings:
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_embeddings=tie))
    return cfg, sd


def _check_weights(net: VLM, sd: dict[str, torch.Tensor], where: str) -> None:
    """Name (in transformers' names) every missing, unexpected or mis-shaped tensor."""
    expected = {hf_name(k): tuple(v.shape) for k, v in state_dict_for_save(net).items()}
    problems = weight_problems(expected, sd)
    if problems:
        raise TernvlmError(
            f"Idefics3 checkpoint {where} does not match its {CONFIG}: " + "; ".join(problems)
        )


def _image_norm(cfg: VLMConfig, folder: Path) -> VLMConfig:
    """image_mean / image_std of the image processor config when there is one
    (processor_config.json's nested ``image_processor``, else preprocessor_config.json)."""
    from .hf_idefics3_processor import image_processor_dict

    pre = image_processor_dict(folder)
    if pre is None:
        return cfg
    path = f"image processor config of {folder}"
    try:
        mean = tuple(float(x) for x in pre.get("image_mean", cfg.vision.image_mean))
        std = tuple(float(x) for x in pre.get("image_std", cfg.vision.image_std))
    except (TypeError, ValueError) as exc:
        raise TernvlmError(f"corrupt {path}: {exc}") from None
    if len(mean) != 3 or len(std) != 3:
        raise TernvlmError(f"corrupt {path}: image_mean/std need 3 values")
    vision = dataclasses.replace(cfg.vision, image_mean=mean, image_std=std)
    return dataclasses.replace(cfg, vision=vision)


def load_idefics3(path: str | Path) -> tuple[VLM, Processor]:
    """Load an ``Idefics3ForConditionalGeneration.save_pretrained`` folder (or a Hub id); the
    processor is a SmolVLMProcessor when the folder's tokenizer has Idefics3's image tokens."""
    folder = local_folder(path)
    data = _read_json(folder / CONFIG, "model config")
    cfg = config_from_hf(data)
    sd, where = read_hf_weights(folder)
    cfg, sd = _resolve_tie(cfg, data, sd)
    cfg = _image_norm(cfg, folder)
    tok = load_tokenizer(folder / TOKENIZER)
    settings = read_settings(folder, cfg, tok)
    if settings is not None:
        cfg = dataclasses.replace(cfg, processor=settings)
    net = VLM(cfg)
    _check_weights(net, sd, where)
    load_weights(net, {our_name(k): val for k, val in sd.items()}, where)
    net.eval()
    return net, processor_for(cfg, tok)
