"""Checkpoint folders (config.json, model.safetensors, tokenizer.json), written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from ..config import VLMConfig
from ..errors import TernvlmError
from .processor import Processor, processor_for
from .tokenizer import load_tokenizer
from .vlm import VLM

CONFIG, WEIGHTS, TOKENIZER, CARD = "config.json", "model.safetensors", "tokenizer.json", "README.md"


def default_model_dir() -> Path:
    """The pre-trained default model shipped inside the package."""
    return Path(str(resources.files("ternvlm") / "assets" / "default"))


def resolve(model: str | Path) -> Path:
    """``default``, a checkpoint folder or a Hugging Face Hub id (``owner/name[@revision]``,
    downloaded once into huggingface_hub's cache) -> folder path (checked to exist).

    A local path always wins; only a name that is not on disk and has the shape of a Hub id
    goes to the network, and a failure names both readings (local folder, Hub repository)."""
    path = default_model_dir() if str(model) == "default" else Path(model)
    if not path.exists():
        from .hf_idefics3 import local_folder  # the Hub download and its error messages

        return local_folder(model)
    if not path.is_dir():
        raise TernvlmError(f"checkpoint must be a folder with {CONFIG} and {WEIGHTS}: {path}")
    return path


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmpdir)`` then swap tmpdir into ``target``: readers never see a half folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def state_dict_for_save(model: VLM) -> dict[str, torch.Tensor]:
    """Float tensors as saved; ternary/binary layers as packed codes and scales."""
    if model.cfg.quantization_config is not None:
        from ..quant.checkpoint import packed_state

        sd = packed_state(model)
    else:
        sd = model.state_dict()
    if model.cfg.decoder.tie_embeddings:
        sd.pop("decoder.lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(
    out: str | Path,
    model: VLM,
    tokenizer: Tokenizer,
    card: str | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    def write(tmp: Path) -> None:
        model.cfg.save(tmp / CONFIG)
        sd = state_dict_for_save(model)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        tokenizer.save(str(tmp / TOKENIZER))
        if card:
            (tmp / CARD).write_text(card)
        if extra:
            torch.save(extra, tmp / "train_state.pt")

    atomic_dir(Path(out), write)


def load_checkpoint(model: str | Path) -> tuple[VLM, Processor]:
    """Load a checkpoint folder; every failure becomes a one-line TernvlmError.

    A Hugging Face folder (its config.json has a ``model_type``) is mapped onto our model by
    :mod:`ternvlm.models.hf_idefics3` (SmolVLM), :mod:`ternvlm.models.hf_moondream`
    (Moondream2) or :mod:`ternvlm.models.hf_llava` (LLaVA); anything else is our own format.
    """
    path = resolve(model)
    if is_hf_folder(path):
        from .hf_idefics3 import SUPPORTED_MODEL_TYPES as IDEFICS3
        from .hf_idefics3 import load_idefics3
        from .hf_llava import SUPPORTED_MODEL_TYPES as LLAVA
        from .hf_llava import load_llava
        from .hf_moondream import SUPPORTED_MODEL_TYPES as MOONDREAM
        from .hf_moondream import load_moondream

        model_type = json.loads((path / CONFIG).read_text()).get("model_type")
        if model_type in MOONDREAM:
            return load_moondream(path)
        if model_type in IDEFICS3:
            return load_idefics3(path)
        if model_type in LLAVA:
            return load_llava(path)
        raise TernvlmError(
            f"unsupported Hugging Face model_type {model_type!r}; "
            f"supported: {', '.join(IDEFICS3 + LLAVA + MOONDREAM)}"
        )
    cfg = VLMConfig.load(path / CONFIG)
    tok = load_tokenizer(path / TOKENIZER)
    weights = path / WEIGHTS
    if not weights.exists():
        raise TernvlmError(f"missing weights: {weights}")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TernvlmError(f"corrupt weights {weights}: {exc}") from None
    net = VLM(cfg)
    if cfg.quantization_config is not None:
        from ..quant.checkpoint import prepare_quantized

        prepare_quantized(net, cfg.quantization_config)
    load_weights(net, sd, str(weights))
    net.eval()
    return net, processor_for(cfg, tok)


def is_hf_folder(path: Path) -> bool:
    """True when ``path/config.json`` is a transformers config (it names a ``model_type``)."""
    try:
        data = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False  # VLMConfig.load reports the missing or corrupt file
    return isinstance(data, dict) and "model_type" in data


def weight_problems(expected: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of ``sd`` against ``expected`` name -> shape."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    if shapes:
        problems.append(
            "mis-shaped tensors "
            + ", ".join(f"{k} {tuple(sd[k].shape)} != {expected[k]} expected" for k in shapes[:5])
        )
    return problems


def load_weights(net: VLM, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load that names missing, unexpected and mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in state_dict_for_save(net).items()}
    problems = weight_problems(expected, sd)
    if problems:
        raise TernvlmError(f"checkpoint {where} does not match its config: " + "; ".join(problems))
    if net.cfg.quantization_config is not None:
        from ..quant.checkpoint import load_packed_

        sd = load_packed_(net, sd, where)
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
