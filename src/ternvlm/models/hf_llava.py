"""Hugging Face LLaVA checkpoints (``LlavaForConditionalGeneration``) loaded onto our :class:`VLM`.

LLaVA is a configuration of our one model family, not a second network:

* vision tower, CLIP (``clip_vision_model``) or SigLIP (``siglip_vision_model``) =
  :class:`~ternvlm.models.vision.VisionEncoder`. CLIP sets its options: a learned
  ``class_embedding`` before the patches with its own position (``class_token``), a patch conv
  without bias (``patch_bias``), ``pre_layrnorm`` on the embeddings (``pre_norm``), quick-GELU
  MLPs (``act``). LLaVA reads ``hidden_states[vision_feature_layer]`` (default -2): the output of
  that many encoder layers, before any ``post_layernorm``. So our ``vision.layers`` is the number
  of layers LLaVA runs (23 of CLIP-L's 24 by default), ``post_norm`` is off, and the tensors of
  the layers after it, ``post_layernorm`` and SigLIP's pooling ``head`` are not loaded (unused);
* ``vision_feature_select_strategy``: ``"default"`` drops token 0 (``drop_first_token``: the
  class token of CLIP; for SigLIP, which has none, the first patch, exactly as transformers
  does), ``"full"`` keeps every token. Image tokens = patches (+1 class token, -1 dropped);
* connector: ``multi_modal_projector.linear_1 -> GELU -> linear_2`` with biases =
  :class:`~ternvlm.models.connector.Connector` ``kind="mlp"``, ``scale_factor=1`` (no pixel
  shuffle); ``projector_hidden_act`` ``gelu`` (exact) or a tanh GELU;
* decoder: llama (RMSNorm, RoPE, SwiGLU, grouped-query attention, separate or tied ``lm_head``)
  = :class:`~ternvlm.models.decoder.Decoder`;
* merge: the image features replace the ``image_token_index`` token embeddings in order
  (transformers' ``masked_scatter``), as :meth:`VLM.embed` does.

Only the folder layout of ``save_pretrained`` is read (config.json, model.safetensors or its
sharded index, tokenizer.json, optional processor_config.json / preprocessor_config.json, chat
template, generation_config.json); transformers itself is not needed. Files name tensors as
transformers' save_pretrained writes them (``language_model.model.``, ``language_model.lm_head.``,
``vision_tower.``, ``multi_modal_projector.``; Hub files of transformers 4 have
``vision_tower.vision_model.``) or as transformers 5 holds them in memory
(``model.language_model.``, ``model.vision_tower.``, ...); all are renamed to the latter, as
transformers' conversion mapping does, and errors name tensors as the file does.

Images: resized as transformers' PIL image processors do (bicubic): CLIP's shortest edge to
``image_size`` then a center crop, SigLIP's square resize, LLaVA's ``do_pad`` (pad to a square
with the mean colour first); mean/std from the image processor config when present. Not covered:
a shortest edge that differs from the crop size (e.g. 256 -> 224), other resample filters than
bicubic, transformers' torchvision ("fast") processors (antialiased resize: pixels differ
slightly), an image size that is not a multiple of the patch size (SigLIP-so400m-patch14-384),
``vision_feature_layer`` lists (several layers concatenated), LLaVA-NeXT /
OneVision (other model types) and non-llama text models.

Prompts: with a chat template in the folder, :func:`load_llava` returns a
:class:`~ternvlm.models.hf_llava_processor.LlavaProcessor`: transformers' ``LlavaProcessor``
layout (the template rendered, each ``<image>`` expanded to the image tokens), its settings
stored in ``VLMConfig.processor`` so saved and exported models keep it. Without one the layout is
``<bos> <image> x image_tokens prompt``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..config import ConnectorConfig, VisionConfig, VLMConfig
from ..errors import TernvlmError
from .checkpoint import CONFIG, TOKENIZER, load_weights, state_dict_for_save, weight_problems
from .hf_idefics3 import (
    _LLAMA_DEFAULTS,
    PREPROCESSOR,
    _as_dict,
    _image_norm,
    _one_id,
    _read_json,
    _square,
    llama_decoder,
    local_folder,
    read_hf_weights,
    reject_quantized,
    swap_prefix,
)
from .hf_idefics3_processor import PROCESSOR_CONFIG, image_processor_dict
from .hf_llava_processor import read_settings
from .processor import Processor, processor_for
from .tokenizer import load_tokenizer
from .vlm import VLM

SUPPORTED_MODEL_TYPES = ("llava",)
_CLIP, _SIGLIP = "clip_vision_model", "siglip_vision_model"
_TOWERS = (_CLIP, _SIGLIP)
_TEXT_MODEL_TYPES = ("llama",)
_TEXT_ACTS = ("silu", "swish")
# transformers' ACT2FN names -> ours ("gelu_new" is the tanh GELU written out).
_VISION_ACTS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}
_PROJECTOR_ACTS = {"gelu": "erf", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
_STRATEGIES = ("default", "full")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# save_pretrained writes a *diff* config.json: keys equal to the class defaults are left out, so
# they are restored from these tables (transformers 5.x CLIPVisionConfig / SiglipVisionConfig /
# LlamaConfig / LlavaConfig defaults). A vision_config dict starts from its class defaults; a
# missing vision_config is LLaVA-1.5's CLIP ViT-L/14-336 (LlavaConfig's sub-config defaults).
_TOWER_DEFAULTS: dict[str, dict[str, Any]] = {
    _CLIP: {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    _SIGLIP: {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}
_LLAVA_VISION: dict[str, Any] = {
    "model_type": _CLIP,
    "intermediate_size": 4096,
    "hidden_size": 1024,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
_TOP_DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
}

_TOWER = "model.vision_tower."
# (our name prefix, transformers name prefix); one table for both directions.
_NAMES = (
    ("vision.patch_embedding.", _TOWER + "embeddings.patch_embedding."),
    ("vision.class_embedding", _TOWER + "embeddings.class_embedding"),
    ("vision.position_embedding.", _TOWER + "embeddings.position_embedding."),
    ("vision.pre_layernorm.", _TOWER + "pre_layrnorm."),
    ("vision.layers.", _TOWER + "encoder.layers."),
    ("vision.post_layernorm.", _TOWER + "post_layernorm."),
    ("connector.", "model.multi_modal_projector."),
    ("decoder.lm_head.", "lm_head."),
    ("decoder.", "model.language_model."),
)
_EMBED, _HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
# Older layouts, renamed as transformers' conversion mapping does (first match wins); a tower
# saved before transformers 5 has a "vision_model." level more.
_LEGACY = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", _TOWER),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
_LEGACY_TOWER = _TOWER + "vision_model."


def hf_name(ours: str) -> str:
    """Our state-dict key -> the transformers key of the same tensor."""
    name = swap_prefix(ours, _NAMES)
    if name is None:
        raise KeyError(ours)
    return name


def our_name(theirs: str) -> str | None:
    """A transformers key -> our key, or None when the tensor has no place in our model."""
    return swap_prefix(theirs, _NAMES, reverse=True)


def canonical_name(name: str) -> str:
    """A tensor name of any LLaVA save layout -> its transformers 5 name."""
    for old, new in _LEGACY:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    if name.startswith(_LEGACY_TOWER):
        name = _TOWER + name[len(_LEGACY_TOWER) :]
    return name


def _unsupported(model_type: Any) -> TernvlmError:
    return TernvlmError(
        f"unsupported Hugging Face model_type {model_type!r}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


_ARCH = "LLaVA"


def _bad(msg: str) -> TernvlmError:
    return TernvlmError(f"unsupported LLaVA config: {msg}")


def _vision_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The vision_config with the defaults transformers fills in (model_type included)."""
    given = data.get("vision_config")
    if given is None:
        return {**_TOWER_DEFAULTS[_CLIP], **_LLAVA_VISION}
    if not isinstance(given, dict):
        raise TernvlmError(f"invalid LLaVA config: vision_config must be an object, got {given!r}")
    tower = given.get("model_type") or _CLIP
    if tower not in _TOWERS:
        raise TernvlmError(
            f"unsupported LLaVA vision tower: vision_config model_type {tower!r}; "
            f"supported: {', '.join(_TOWERS)}"
        )
    return {**_TOWER_DEFAULTS[tower], **given, "model_type": tower}


def _feature_layer(top: dict[str, Any], layers: int) -> int:
    """``vision_feature_layer`` -> how many encoder layers run (index into hidden_states)."""
    fl = top["vision_feature_layer"]
    if isinstance(fl, (list, tuple)):
        raise _bad(
            f"vision_feature_layer {list(fl)}: a list (several layers' features concatenated) is "
            "not implemented, only one layer"
        )
    if not isinstance(fl, int) or not -(layers + 1) <= fl <= layers:
        raise _bad(
            f"vision_feature_layer {fl!r} is not a hidden state of a {layers}-layer vision tower"
        )
    return fl % (layers + 1)


def config_from_hf(hf_config: Any) -> VLMConfig:
    """A transformers ``LlavaConfig`` (object or config.json dict) -> our :class:`VLMConfig`."""
    data = _as_dict(hf_config)
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(model_type)
    reject_quantized(data, "LLaVA")
    top = {**_TOP_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    if "image_token_index" not in data and data.get("image_token_id") is not None:
        top["image_token_index"] = data["image_token_id"]  # LlavaConfig's attribute_map alias
    v = _vision_dict(data)
    t = {**_LLAMA_DEFAULTS, **(data.get("text_config") or {})}
    if t["model_type"] not in _TEXT_MODEL_TYPES:
        raise TernvlmError(
            f"unsupported LLaVA text_config model_type {t['model_type']!r}; "
            f"supported: {', '.join(_TEXT_MODEL_TYPES)}"
        )
    clip = v["model_type"] == _CLIP
    if v["hidden_act"] not in _VISION_ACTS:
        raise _bad(f"vision hidden_act {v['hidden_act']!r}; supported: {', '.join(_VISION_ACTS)}")
    if top["projector_hidden_act"] not in _PROJECTOR_ACTS:
        raise _bad(
            f"projector_hidden_act {top['projector_hidden_act']!r}; "
            f"supported: {', '.join(_PROJECTOR_ACTS)}"
        )
    if t["hidden_act"] not in _TEXT_ACTS:
        raise _bad(f"text hidden_act {t['hidden_act']!r}")
    if v["num_channels"] != 3:
        raise _bad(f"{v['num_channels']} image channels")
    size, patch = (
        _square(v["image_size"], "image_size", _ARCH),
        _square(v["patch_size"], "patch_size", _ARCH),
    )
    if size % patch:
        raise _bad(
            f"vision image_size {size} is not a multiple of patch_size {patch} (the patch conv "
            "would drop the remainder, e.g. SigLIP-so400m at 384 px; not implemented)"
        )
    strategy = top["vision_feature_select_strategy"]
    if strategy not in _STRATEGIES:
        raise _bad(
            f"vision_feature_select_strategy {strategy!r}; supported: {', '.join(_STRATEGIES)}"
        )
    try:
        hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
        if t["head_dim"] not in (None, hidden // heads):
            raise _bad(
                f"text head_dim {t['head_dim']} != hidden_size / num_attention_heads = "
                f"{hidden // heads}"
            )
        eos = _one_id(t["eos_token_id"], "eos_token_id", 2, _ARCH)
        tie = bool(top["tie_word_embeddings"]) or bool(t["tie_word_embeddings"])
        cfg = VLMConfig(
            vision=VisionConfig(
                image_size=size,
                patch_size=patch,
                stem="patch",
                hidden=int(v["hidden_size"]),
                layers=_feature_layer(top, int(v["num_hidden_layers"])),
                heads=int(v["num_attention_heads"]),
                mlp=int(v["intermediate_size"]),
                norm_eps=float(v["layer_norm_eps"]),
                image_mean=OPENAI_CLIP_MEAN if clip else (0.5, 0.5, 0.5),
                image_std=OPENAI_CLIP_STD if clip else (0.5, 0.5, 0.5),
                act=_VISION_ACTS[v["hidden_act"]],
                patch_bias=not clip,
                class_token=clip,
                pre_norm=clip,
                post_norm=False,
                drop_first_token=strategy == "default",
                resize="crop" if clip else "stretch",
            ),
            connector=ConnectorConfig(
                scale_factor=1,
                kind="mlp",
                bias=bool(top["multimodal_projector_bias"]),
                gelu=_PROJECTOR_ACTS[top["projector_hidden_act"]],
            ),
            decoder=llama_decoder(t, hidden, heads, tie, _ARCH),
            image_token_id=_one_id(top["image_token_index"], "image_token_index", 0, _ARCH),
            bos_token_id=_one_id(t["bos_token_id"], "bos_token_id", 1, _ARCH),
            eos_token_id=eos,
            pad_token_id=_one_id(
                t["pad_token_id"] if t["pad_token_id"] is not None else top.get("pad_token_id"),
                "pad_token_id",
                eos,
                _ARCH,
            ),
            architecture="llava",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TernvlmError(f"invalid LLaVA config: {exc}") from None
    if not 0 <= cfg.image_token_id < cfg.decoder.vocab_size:
        raise TernvlmError(
            f"invalid LLaVA config: image_token_index {cfg.image_token_id} is outside the "
            f"vocabulary of {cfg.decoder.vocab_size}"
        )
    return cfg.validate()


def _unused(data: dict[str, Any], cfg: VLMConfig) -> tuple[str, ...]:
    """Name prefixes of tensors LLaVA has but never uses: they are not loaded."""
    v = _vision_dict(data)
    after = range(cfg.vision.layers, int(v["num_hidden_layers"]))  # layers after the read one
    names = [_TOWER + f"encoder.layers.{i}." for i in after]
    names += [_TOWER + "post_layernorm.", _TOWER + "embeddings.position_ids"]
    if v["model_type"] == _SIGLIP:
        names.append(_TOWER + "head.")  # the attention-pooling head (vision_use_head)
    return tuple(names)


def saved_names(names: Iterable[str]) -> Callable[[str], str]:
    """transformers 5 name -> the name in the layout of a file with these tensor ``names``.

    save_pretrained of transformers 5 writes ``language_model.model.``, ``vision_tower.``;
    llava-hf's Hub files have ``vision_tower.vision_model.``. Errors name tensors as the file does.
    """
    names = list(names)
    legacy = any(k.startswith(tuple(old for old, _ in _LEGACY)) for k in names)
    tower = any(k.startswith(("vision_tower.vision_model.", _LEGACY_TOWER)) for k in names)

    def saved(name: str) -> str:
        if tower and name.startswith(_TOWER):
            name = _LEGACY_TOWER + name[len(_TOWER) :]
        if legacy:
            for old, new in _LEGACY:
                if name.startswith(new):
                    return old + name[len(new) :]
        return name

    return saved


def read_llava_weights(
    folder: Path, data: dict[str, Any], cfg: VLMConfig
) -> tuple[dict[str, torch.Tensor], str, Callable[[str], str]]:
    """The tensors under transformers 5 names (unused ones left out), the file, its layout."""
    raw, where = read_hf_weights(folder)
    unused = _unused(data, cfg)
    sd = {}
    for k, val in raw.items():
        name = canonical_name(k)
        if not name.startswith(unused) and not name.endswith("rotary_emb.inv_freq"):
            sd[name] = val
    return sd, where, saved_names(raw)


def _resolve_tie(
    cfg: VLMConfig, sd: dict[str, torch.Tensor]
) -> tuple[VLMConfig, dict[str, torch.Tensor]]:
    """Tie the LM head to the embeddings as transformers would load this checkpoint.

    Tied when the config says so and the file has no separate head, or the head equals the
    embeddings; a head that differs is kept separate.
    """
    tie = cfg.decoder.tie_embeddings
    if tie and _HEAD in sd and not (_EMBED in sd and torch.equal(sd[_HEAD], sd[_EMBED])):
        tie = False
    if tie:
        sd = {k: val for k, val in sd.items() if k != _HEAD}
    if tie != cfg.decoder.tie_embeddings:
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_embeddings=tie))
    return cfg, sd


def _check_weights(
    net: VLM, sd: dict[str, torch.Tensor], where: str, saved: Callable[[str], str]
) -> None:
    """Name (as the file names them) every missing, unexpected or mis-shaped tensor."""
    expected = {saved(hf_name(k)): tuple(v.shape) for k, v in state_dict_for_save(net).items()}
    problems = weight_problems(expected, {saved(k): val for k, val in sd.items()})
    if problems:
        raise TernvlmError(
            f"LLaVA checkpoint {where} does not match its {CONFIG}: " + "; ".join(problems)
        )


def _size(value: Any, what: str, path: Path) -> tuple[int, int] | int | None:
    """An image processor size: (height, width), a shortest edge (int) or None (not given)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
    raise TernvlmError(f"unsupported preprocessor config {path}: {what} {value!r}")


def _preprocessing(cfg: VLMConfig, folder: Path) -> VLMConfig:
    """Mean/std and the resize mode from the image processor config when there is one
    (processor_config.json's nested ``image_processor``, as transformers 5 saves a processor, else
    preprocessor_config.json)."""
    pre = image_processor_dict(folder)
    if pre is None:
        return cfg
    nested = (folder / PROCESSOR_CONFIG).exists() and isinstance(
        _read_json(folder / PROCESSOR_CONFIG, "processor config").get("image_processor"), dict
    )
    path = folder / (PROCESSOR_CONFIG if nested else PREPROCESSOR)  # named in errors
    cfg = _image_norm(cfg, folder)
    v = cfg.vision
    n = v.image_size
    rescale = pre.get("rescale_factor", 1 / 255)
    if not pre.get("do_rescale", True) or not pre.get("do_normalize", True):
        raise TernvlmError(
            f"unsupported preprocessor config {path}: images are always rescaled by 1/255 and "
            "normalised"
        )
    if not isinstance(rescale, (int, float)) or abs(rescale * 255 - 1) > 1e-6:
        raise TernvlmError(f"unsupported preprocessor config {path}: rescale_factor {rescale!r}")
    crop = bool(pre.get("do_center_crop", v.resize == "crop"))
    pad = bool(pre.get("do_pad", False))
    size = _size(pre.get("size"), "size", path)
    if size is None:
        size = n if v.resize == "crop" else (n, n)
    elif isinstance(size, int) and v.resize != "crop":
        size = (size, size)  # a bare int: SigLIP's processors read it as a square
    crop_size = _size(pre.get("crop_size"), "crop_size", path) if crop else None
    if crop and crop_size is None:
        crop_size = (n, n)
    elif isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    # An int size is the shortest edge: square only after do_pad or with the center crop.
    if (
        crop_size not in (None, (n, n))
        or size not in (n, (n, n))
        or (size == n and not (crop or pad))
    ):
        raise TernvlmError(
            f"unsupported preprocessor config {path}: resize to {pre.get('size')!r} then center "
            f"crop {pre.get('crop_size') if crop else 'off'} does not give the vision tower's "
            f"{n}x{n} input; supported: shortest edge {n} + center crop {n}x{n}, or a {n}x{n} "
            "resize (either with do_pad)"
        )
    resize = "pad" if pad else ("crop" if size == n else "stretch")
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, resize=resize))


def load_llava(path: str | Path) -> tuple[VLM, Processor]:
    """Load a ``LlavaForConditionalGeneration.save_pretrained`` folder (or a Hub id)."""
    folder = local_folder(path)
    data = _read_json(folder / CONFIG, "model config")
    cfg = config_from_hf(data)
    sd, where, saved = read_llava_weights(folder, data, cfg)
    cfg, sd = _resolve_tie(cfg, sd)
    cfg = _preprocessing(cfg, folder)
    tok = load_tokenizer(folder / TOKENIZER)
    settings = read_settings(folder, cfg, tok)
    if settings is not None:  # a chat template: transformers' LlavaProcessor layout
        cfg = dataclasses.replace(cfg, processor=settings)
    net = VLM(cfg)
    _check_weights(net, sd, where, saved)
    load_weights(net, {our_name(k): val for k, val in sd.items()}, where)
    net.eval()
    return net, processor_for(cfg, tok)
