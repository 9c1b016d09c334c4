"""Moondream2 checkpoints (``vikhyatk/moondream2``) loaded onto ternvlm's own :class:`VLM`.

Followed revision: Hub ``vikhyatk/moondream2`` revision **2024-05-08**, whose remote code is
``moondream/{moondream,vision_encoder,modeling_phi,configuration_moondream}.py`` of github
vikhyat/moondream at commit ae3179a (``LATEST_REVISION = "2024-05-08"``; ``hf_release.py`` pushes
that code with the weights). Revision 2024-04-02 has the same network and tensor names (its
config.json calls the text config ``phi_config``; both names are read). Moondream2 is a
configuration of our one model family:

* vision (``vision_encoder.encoder.model.visual.*``): SigLIP so400m-style ViT, 378x378 image,
  14x14 patches (27x27 = 729), ``patch_embed.linear`` = a Linear on patches flattened in
  (channel, row, column) order, which is exactly our strided conv's weight reshaped to
  [hidden, 3, 14, 14]; learned ``pos_embed`` [1, 729, 1152]; 27 pre-LN blocks (``norm1``,
  ``attn.qkv`` fused as q|k|v rows, ``attn.proj``, ``norm2``, ``mlp.fc1``/``fc2`` with tanh GELU),
  16 heads (fixed in the code), LayerNorm eps 1e-5 (torch's default); final ``norm``
  = :class:`~ternvlm.models.vision.VisionEncoder` (stem "patch", no position buckets);
* projector (``vision_encoder.projection.mlp.fc1``/``fc2``, biases, tanh GELU, inner width 8192)
  = :class:`~ternvlm.models.connector.Connector` with ``kind="mlp"``, ``scale_factor=1``,
  ``gelu="tanh"``, ``mlp_hidden`` = fc1's width;
* decoder (``text_model.*``, Phi-1.5): parallel blocks ``x + attn(ln(x)) + mlp(ln(x))`` sharing one
  LayerNorm ``h.N.ln``, ``mixer.Wqkv`` (fused q|k|v rows, bias), ``mixer.out_proj``,
  ``mlp.fc1``/``fc2`` with ``gelu_new`` (tanh GELU), rotary embeddings on the first
  ``partial_rotary_factor`` (0.5: 32 of 64) dims of each head, rotate-half style; final
  ``lm_head.ln`` and ``lm_head.linear`` (with bias) = :class:`~ternvlm.models.decoder.Decoder`
  with ``norm="layernorm"``, ``parallel_block``, biases, ``lm_head_bias``.

Merge and prompt: Moondream does not put placeholder tokens in the text; ``input_embeds`` builds
``[BOS embedding] + 729 image embeddings + embeddings of "\\n\\nQuestion: {q}\\n\\nAnswer:"``. Our
VLM writes image features over image-token slots, so the image placeholder is an id the tokenizer
never produces: the last row of the padded embedding table, ``vocab_size - 1`` (51199; the
codegen/GPT-2 tokenizer has fewer tokens than the 51200 rows: the revision's create_gguf.py pads
the rest with ``[PAD{i}]``; checked at load time). :class:`MoondreamProcessor` lays out
``<bos> <placeholder> x 729 prompt`` and puts prompts into Moondream's template; BOS and EOS are
the tokenizer's (``<|endoftext|>``, 50256 for both), as Moondream's generate uses them.
Images: bicubic resize to 378x378 (aspect ratio not kept), scale to [0, 1], normalize with mean
0.5 and std 0.5, as the revision's torchvision ``preprocess``.

The vision and projector sizes are constants in Moondream's code, not in config.json; here they
are read from the tensor shapes (the published values when a shape is absent), so smaller
checkpoints of the same layout load too. The text sizes come from config.json's ``text_config``
over PhiConfig's defaults of that revision.

Not supported (a TernvlmError says so): revisions from 2024-05-20 to 2024-08-26, whose projector
takes the global features concatenated with features of local image crops (``projection.mlp.fc1``
input is twice the vision width; crops are not implemented); revisions from 2025-01-09 on
(``HfMoondream``: a different layout under ``model.vision.*`` / ``model.text.*``); the March 2024
revisions (2024-03-04 to 2024-03-13) have this layout but used exact GELU and, in the vision
blocks, timm's LayerNorm eps 1e-6, which nothing in the files records: they load, computed as
2024-04-02/05-08 are; Phi ``qk_layernorm``, RoPE scaling and grouped-query heads (Moondream's
fused Wqkv has none of these).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig
from ..errors import TernvlmError
from .checkpoint import CONFIG, TOKENIZER, load_weights, state_dict_for_save, weight_problems
from .hf_idefics3 import _read_json, local_folder, read_hf_weights
from .processor import CAPTION_PROMPT, Encoded, Processor
from .tokenizer import load_tokenizer
from .vlm import VLM

REVISION = "2024-05-08"
SUPPORTED_MODEL_TYPES = ("moondream1",)  # config.json's model_type of every Moondream2 revision
_TEXT_MODEL_TYPES = ("phi",)
_TEXT_ACTS = ("gelu_new", "gelu_pytorch_tanh")  # both are tanh-approximated GELU
_EOT = "<|endoftext|>"

# PhiConfig defaults of the revision (configuration_moondream.py); config.json may leave them out.
_PHI_DEFAULTS: dict[str, Any] = {
    "model_type": "phi",
    "vocab_size": 51200,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: as many as attention heads
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "partial_rotary_factor": 0.5,
    "qk_layernorm": False,
}
# Constants of vision_encoder.py (VisionTransformer, VitBlock, Attention, VisionProjection).
_VISION = {"image_size": 378, "patch_size": 14, "hidden": 1152, "layers": 27, "mlp": 4304}
VISION_HEADS = 16  # Attention(dim, num_heads=16): not recorded anywhere in the files
_VISION_EPS = 1e-5  # nn.LayerNorm's default
_PROJ_HIDDEN = 8192  # VisionProjection: model_dim * 4

_V = "vision_encoder.encoder.model.visual."
_P = "vision_encoder.projection.mlp."
_T = "text_model.transformer."
_H = "text_model.lm_head."
_POS, _PATCH = _V + "pos_embed", _V + "patch_embed.linear.weight"
_PROJ_FC1 = _P + "fc1.weight"
_WTE, _HEAD = _T + "embd.wte.weight", _H + "linear.weight"

# (our name prefix, Moondream name prefix) for tensors copied as they are.
_NAMES = (
    ("vision.patch_embedding.bias", _V + "patch_embed.linear.bias"),
    ("vision.post_layernorm.", _V + "norm."),
    ("connector.linear_1.", _P + "fc1."),
    ("connector.linear_2.", _P + "fc2."),
    ("decoder.embed_tokens.weight", _WTE),
    ("decoder.norm.", _H + "ln."),
    ("decoder.lm_head.", _H + "linear."),
)
# Inside a block: (our name, Moondream name); q/k/v map to thirds of the fused tensor.
_BLOCKS = {
    "vision": (
        _V + "blocks.",
        (
            ("layer_norm1.", "norm1."),
            ("layer_norm2.", "norm2."),
            ("self_attn.out_proj.", "attn.proj."),
            ("mlp.", "mlp."),
        ),
        "attn.qkv.",
    ),
    "decoder": (
        _T + "h.",
        (
            ("input_layernorm.", "ln."),
            ("self_attn.o_proj.", "mixer.out_proj."),
            ("mlp.", "mlp."),
        ),
        "mixer.Wqkv.",
    ),
}
_BLOCK_KEY = re.compile(r"(vision|decoder)\.layers\.(\d+)\.(.+)")
_QKV_KEY = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def moondream_name(ours: str) -> tuple[str, str, int]:
    """Our state-dict key -> (Moondream key, how, part).

    ``how``: "copy"; "qkv" (rows ``part`` third of the fused q|k|v tensor); "patch" (the Linear
    weight [hidden, 3 * p * p] is our conv weight [hidden, 3, p, p] flattened); "pos" (Moondream
    keeps a leading batch axis of 1).
    """
    if ours == "vision.patch_embedding.weight":
        return _PATCH, "patch", 0
    if ours == "vision.position_embedding.weight":
        return _POS, "pos", 0
    m = _BLOCK_KEY.fullmatch(ours)
    if m:
        part, index, rest = m.groups()
        prefix, renames, qkv = _BLOCKS[part]
        q = _QKV_KEY.fullmatch(rest)
        if q:
            return f"{prefix}{index}.{qkv}{q.group(2)}", "qkv", "qkv".index(q.group(1))
        for mine, theirs in renames:
            if rest.startswith(mine):
                return f"{prefix}{index}.{theirs}{rest[len(mine) :]}", "copy", 0
    for mine, theirs in _NAMES:
        if ours.startswith(mine):
            return theirs + ours[len(mine) :], "copy", 0
    raise KeyError(ours)


def _unsupported(model_type: Any) -> TernvlmError:
    return TernvlmError(
        f"unsupported Hugging Face model_type {model_type!r}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _unsupported_2025() -> TernvlmError:
    return TernvlmError(
        "unsupported Moondream2 checkpoint: this is the layout of revisions 2025-01-09 and later "
        "(HfMoondream, tensors under model.vision.* / model.text.*); supported: the 2024 layout "
        f"of revisions 2024-04-02 and {REVISION} (vision_encoder.* / text_model.*), e.g. "
        f"`hf download vikhyatk/moondream2 --revision {REVISION} --local-dir DIR`"
    )


def _text_config(data: dict[str, Any]) -> dict[str, Any]:
    text = data.get("text_config")
    if text is None:
        text = data.get("phi_config")  # the name before 2024-04-20 (revision 2024-04-02)
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise TernvlmError(f"invalid Moondream config: text_config must be an object, got {text!r}")
    return {**_PHI_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}


def _vision_sizes(shapes: Mapping[str, Sequence[int]] | None) -> dict[str, int]:
    """Vision and projector sizes from the tensor shapes (published constants where absent)."""
    sizes = {**_VISION, "proj_in": _VISION["hidden"], "proj_hidden": _PROJ_HIDDEN}
    if not shapes:
        return sizes
    pos, patch = shapes.get(_POS), shapes.get(_PATCH)
    if pos is not None and len(pos) == 3:
        sizes["hidden"] = int(pos[2])
        side = math.isqrt(int(pos[1]))
        if side * side != pos[1]:
            raise TernvlmError(
                f"unsupported Moondream checkpoint: {_POS} holds {pos[1]} positions, "
                "not a square patch grid"
            )
        if patch is not None and len(patch) == 2:
            p = math.isqrt(int(patch[1]) // 3)
            if 3 * p * p != patch[1]:
                raise TernvlmError(
                    f"unsupported Moondream checkpoint: {_PATCH} takes {patch[1]} inputs, "
                    "not 3 x a square patch"
                )
            sizes["patch_size"], sizes["image_size"] = p, side * p
    blocks = {
        int(m.group(1)) for k in shapes if (m := re.match(re.escape(_V) + r"blocks\.(\d+)\.", k))
    }
    if blocks:
        sizes["layers"] = max(blocks) + 1
    fc1 = shapes.get(_V + "blocks.0.mlp.fc1.weight")
    if fc1 is not None and len(fc1) == 2:
        sizes["mlp"] = int(fc1[0])
    proj = shapes.get(_PROJ_FC1)
    if proj is not None and len(proj) == 2:
        sizes["proj_hidden"], sizes["proj_in"] = int(proj[0]), int(proj[1])
    return sizes


def supported_text_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The text config over PhiConfig's defaults; TernvlmError for what is not supported."""
    if not isinstance(cfg_dict, dict):
        raise TernvlmError(f"expected Moondream's config.json as a dict, got {cfg_dict!r}")
    model_type = cfg_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(model_type)
    archs = cfg_dict.get("architectures") or []
    if "HfMoondream" in archs or (
        "config" in cfg_dict and "text_config" not in cfg_dict and "phi_config" not in cfg_dict
    ):
        raise _unsupported_2025()
    t = _text_config(cfg_dict)
    if t["model_type"] not in _TEXT_MODEL_TYPES:
        raise TernvlmError(
            f"unsupported Moondream text_config model_type {t['model_type']!r}; "
            f"supported: {', '.join(_TEXT_MODEL_TYPES)}"
        )
    if t["hidden_act"] not in _TEXT_ACTS:
        raise TernvlmError(f"unsupported Moondream config: text hidden_act {t['hidden_act']!r}")
    if t["qk_layernorm"]:
        raise TernvlmError("unsupported Moondream config: qk_layernorm (Phi q/k LayerNorms)")
    if t["rope_scaling"]:
        raise TernvlmError(f"unsupported Moondream config: rope_scaling {t['rope_scaling']!r}")
    kv_heads = t["num_key_value_heads"]
    if kv_heads is not None and kv_heads != t["num_attention_heads"]:
        raise TernvlmError(
            f"unsupported Moondream config: num_key_value_heads {kv_heads} != "
            f"num_attention_heads {t['num_attention_heads']} (Moondream's fused Wqkv has no "
            "grouped heads)"
        )
    return t


def config_from_moondream(
    cfg_dict: dict[str, Any], shapes: Mapping[str, Sequence[int]] | None = None
) -> VLMConfig:
    """Moondream2's config.json (plus, optionally, tensor name -> shape) -> our :class:`VLMConfig`.

    Without ``shapes`` the vision side has the published sizes (so400m, 378 px, projector 8192).
    Token ids are placeholders here (BOS/EOS come from the tokenizer in :func:`load_moondream`);
    the image placeholder is ``vocab_size - 1``.
    """
    t = supported_text_config(cfg_dict)
    if shapes and any(k.startswith(("model.vision.", "model.text.")) for k in shapes):
        raise _unsupported_2025()
    v = _vision_sizes(shapes)
    if v["proj_in"] == 2 * v["hidden"]:
        raise TernvlmError(
            f"unsupported Moondream2 checkpoint: its projector ({_PROJ_FC1}, input "
            f"{v['proj_in']} = 2 x vision width {v['hidden']}) takes global features "
            "concatenated with features of local image crops (revisions 2024-05-20 to "
            "2024-08-26); image crops are not supported. Supported: the single-view layout of "
            f"revisions 2024-04-02 and {REVISION} "
            f"(`hf download vikhyatk/moondream2 --revision {REVISION} --local-dir DIR`)"
        )
    if v["hidden"] % VISION_HEADS:
        raise TernvlmError(
            f"unsupported Moondream checkpoint: vision width {v['hidden']} is not a multiple of "
            f"Moondream's {VISION_HEADS} vision heads"
        )
    try:
        hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
        vocab = int(t["vocab_size"])
        cfg = VLMConfig(
            vision=VisionConfig(
                image_size=v["image_size"],
                patch_size=v["patch_size"],
                stem="patch",
                hidden=v["hidden"],
                layers=v["layers"],
                heads=VISION_HEADS,
                mlp=v["mlp"],
                norm_eps=_VISION_EPS,
                position_buckets=False,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
            ),
            connector=ConnectorConfig(
                scale_factor=1, kind="mlp", bias=True, mlp_hidden=v["proj_hidden"], gelu="tanh"
            ),
            decoder=DecoderConfig(
                vocab_size=vocab,
                hidden=hidden,
                layers=int(t["num_hidden_layers"]),
                heads=heads,
                kv_heads=heads,
                mlp=int(t["intermediate_size"]),
                max_seq_len=int(t["max_position_embeddings"]),
                rope_theta=float(t["rope_theta"]),
                partial_rotary=float(t["partial_rotary_factor"]),
                norm="layernorm",
                norm_eps=float(t["layer_norm_eps"]),
                mlp_type="gelu",
                attn_bias=True,
                mlp_bias=True,
                parallel_block=True,
                tie_embeddings=bool(t["tie_word_embeddings"]),
                lm_head_bias=True,
            ),
            image_token_id=vocab - 1,
            architecture="moondream2",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TernvlmError(f"invalid Moondream config: {exc}") from None
    return cfg.validate()


def _resolve_tie(cfg: VLMConfig, sd: dict[str, torch.Tensor]) -> VLMConfig:
    """Tied as PhiForCausalLM would load it: config asks for it and no different head is saved."""
    tie = cfg.decoder.tie_embeddings
    if tie and _HEAD in sd and not (_WTE in sd and torch.equal(sd[_HEAD], sd[_WTE])):
        tie = False
    if tie:
        sd.pop(_HEAD, None)
    if tie == cfg.decoder.tie_embeddings:
        return cfg
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_embeddings=tie))


def expected_shapes(net: VLM) -> dict[str, tuple[int, ...]]:
    """Moondream tensor name -> shape that ``net`` needs from a checkpoint."""
    out: dict[str, tuple[int, ...]] = {}
    for k, val in state_dict_for_save(net).items():
        name, how, _ = moondream_name(k)
        shape = tuple(val.shape)
        if how == "qkv":
            shape = (3 * shape[0], *shape[1:])
        elif how == "patch":
            shape = (shape[0], math.prod(shape[1:]))
        elif how == "pos":
            shape = (1, *shape)
        out[name] = shape
    return out


def our_state_dict(net: VLM, sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Moondream tensors -> ``net``'s state dict; names every missing/unexpected/mis-shaped one."""
    problems = weight_problems(expected_shapes(net), sd)
    if problems:
        raise TernvlmError(
            f"Moondream checkpoint {where} does not match its {CONFIG}: " + "; ".join(problems)
        )
    out = {}
    for k, val in state_dict_for_save(net).items():
        name, how, part = moondream_name(k)
        t = sd[name]
        if how == "qkv":
            t = t.chunk(3, dim=0)[part]
        elif how in ("patch", "pos"):
            t = t.reshape(val.shape)
        out[k] = t
    return out


def _special_ids(folder: Path, tok: Any) -> tuple[int, int]:
    """(BOS, EOS) ids as the tokenizer files name them (``<|endoftext|>`` for Moondream2)."""
    names: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / fname
        if not path.exists():
            continue
        data = _read_json(path, "tokenizer config")
        for role in ("bos_token", "eos_token"):
            val = data.get(role)
            if isinstance(val, dict):
                val = val.get("content")
            if isinstance(val, str) and role not in names:
                names[role] = val
    ids = []
    for role in ("bos_token", "eos_token"):
        name = names.get(role, _EOT)
        i = tok.token_to_id(name)
        if i is None:
            raise TernvlmError(
                f"Moondream tokenizer {folder / TOKENIZER} has no {role} {name!r} "
                "(named in tokenizer_config.json / special_tokens_map.json, or <|endoftext|>)"
            )
        ids.append(int(i))
    return ids[0], ids[1]


def moondream_prompt(question: str) -> str:
    """The text Moondream2's ``answer_question`` puts after the image."""
    return f"\n\nQuestion: {question}\n\nAnswer:"


_OUR_QA = re.compile(r"question: (.*) answer:", re.DOTALL)  # processor.qa_prompt's layout
CAPTION_QUESTION = "Describe this image."  # the question Moondream2's README captions with


def as_moondream_prompt(prompt: str) -> str:
    """Any prompt of the toolkit -> Moondream's template.

    Already templated text (``\\n\\nQuestion: ...``) is kept; ``qa_prompt(q)`` and the caption
    prompt become ``moondream_prompt(q)`` / ``moondream_prompt("Describe this image.")``; any other
    text is taken as the question.
    """
    if prompt.startswith("\n\nQuestion:"):
        return prompt
    if prompt.strip() == CAPTION_PROMPT:
        return moondream_prompt(CAPTION_QUESTION)
    m = _OUR_QA.fullmatch(prompt.strip())
    return moondream_prompt((m.group(1) if m else prompt).strip())


class MoondreamProcessor(Processor):
    """Moondream2's text layout: ``<bos> <placeholder> x 729 "\\n\\nQuestion: q\\n\\nAnswer:"``.

    Moondream's ``input_embeds`` does the same with embeddings (BOS, then the image, then the
    prompt text tokenized without special tokens); a target is appended as `` answer<eos>``.
    """

    def encode(self, prompt: str, target: str | None = None) -> Encoded:
        return super().encode(as_moondream_prompt(prompt), target)


def load_moondream(path: str | Path) -> tuple[VLM, MoondreamProcessor]:
    """Load a Moondream2 Hub folder of the 2024 layout (or a Hub id; see module docstring)."""
    try:
        folder = local_folder(path)
    except TernvlmError as exc:
        if "hf download" not in str(exc):
            raise
        raise TernvlmError(
            f"{exc} (Moondream2: add `--revision {REVISION}`, the layout this loader reads)"
        ) from None
    data = _read_json(folder / CONFIG, "model config")
    supported_text_config(data)  # unsupported configs fail before the weights are read
    sd, where = read_hf_weights(folder)
    # read_hf_weights prefixes Idefics3's bare "text_model." names with "model."; Moondream's
    # own "text_model.*" tensors keep their names.
    sd = {k[len("model.") :] if k.startswith("model.text_model.") else k: v for k, v in sd.items()}
    cfg = config_from_moondream(data, {k: tuple(v.shape) for k, v in sd.items()})
    cfg = _resolve_tie(cfg, sd)
    tok = load_tokenizer(folder / TOKENIZER)
    if tok.get_vocab_size(with_added_tokens=True) > cfg.image_token_id:
        raise TernvlmError(
            f"unsupported Moondream checkpoint: the tokenizer has "
            f"{tok.get_vocab_size(with_added_tokens=True)} tokens, so no row of the "
            f"{cfg.decoder.vocab_size}-row embedding is left unused for the image placeholder"
        )
    bos, eos = _special_ids(folder, tok)
    cfg = dataclasses.replace(cfg, bos_token_id=bos, eos_token_id=eos, pad_token_id=bos)
    net = VLM(cfg)
    load_weights(net, our_state_dict(net, sd, where), where)
    net.eval()
    return net, MoondreamProcessor(cfg, tok)
