"""LLaVA prompts as transformers' ``LlavaProcessor`` makes them, without transformers at run time.

Followed: transformers 5.24 ``models/llava/processing_llava.py`` and ``processing_utils.py``
(``apply_chat_template``).

Text (:meth:`LlavaProcessor.encode`): a prompt without ``<image>`` is the user's message (our
``qa_prompt(q)`` becomes ``q``, the caption prompt "Can you describe this image?":
:func:`~ternvlm.models.hf_idefics3_processor.user_message`), rendered with the folder's chat
template for ``[{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text":
prompt}]}]`` and ``add_generation_prompt=True`` (jinja2 as transformers renders it:
:func:`~ternvlm.models.hf_idefics3_processor.render_chat_template`); llava-1.5-hf's template gives
``USER: <image>\\n{prompt} ASSISTANT:``. A prompt that already holds ``<image>`` is used as given.
Each ``<image>`` then becomes ``image_seq_length`` copies of it, transformers'
``replace_image_token``: ``(height // patch_size) * (width // patch_size) +
num_additional_image_tokens``, minus 1 when the processor's ``vision_feature_select_strategy`` is
``"default"`` (llava-1.5-hf: 24 x 24 + 1 - 1 = 576). The text is tokenized as a whole with
tokenizer.json's post-processor (Llama's adds ``<s>``), except when it starts with the bos token
(as ``apply_chat_template(tokenize=True)`` does). A training target is appended as `` target`` +
eos (LLaVA-1.5's ``ASSISTANT: answer</s>``). Images: :meth:`Processor.pixels`, unchanged (one
view per image, resized as :mod:`ternvlm.models.hf_llava` describes).

Settings (:func:`read_settings`, stored as ``VLMConfig.processor`` so a saved checkpoint or an
exported .tflite is rebuilt with the same layout by
:func:`~ternvlm.models.processor.processor_for`): the chat template (read as transformers'
processor reads it: processor_config.json, chat_template.json, chat_template.jinja, then
tokenizer_config.json), ``image_token`` and ``patch_size`` / ``num_additional_image_tokens`` /
``vision_feature_select_strategy`` from processor_config.json, the bos/eos/unk/pad strings (template
variables) and generation_config.json's eos ids (:attr:`Processor.stop_ids`).

A folder without a chat template keeps the plain ``<bos> <image> x N prompt`` layout
(:class:`~ternvlm.models.processor.Processor`). Not covered: a count of image tokens that differs
from the model's (transformers' model refuses such inputs too; it is an error at load), a
processor_config.json without ``patch_size`` (transformers 5 cannot expand the image token then;
ours uses the model's count, what transformers 4's legacy in-model expansion gave), a tokenizer
whose ``image_token`` attribute overrides processor_config.json, several conversation turns and
system prompts (only one user message is built; pass a prompt holding ``<image>`` for any other
text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer

from ..config import VLMConfig
from ..errors import TernvlmError
from .hf_idefics3_processor import (
    PROCESSOR_CONFIG,
    _eos_ids,
    _read_json,
    _special_token_strings,
    read_chat_settings,
    read_chat_template,
    render_chat_template,
    user_message,
)
from .processor import Encoded, Processor

KIND = "llava"
IMAGE = "<image>"  # LlavaProcessor's default image_token


def image_seq_length(proc: dict[str, Any], cfg: VLMConfig, where: Path) -> int:
    """Image tokens per image as transformers' ``LlavaProcessor.replace_image_token`` counts them
    for our ``image_size`` x ``image_size`` pixels; the model's count without ``patch_size``."""
    patch = proc.get("patch_size")
    if patch is None:
        return cfg.image_tokens
    extra = proc.get("num_additional_image_tokens", 0)
    if not isinstance(patch, int) or patch <= 0 or not isinstance(extra, int):
        raise TernvlmError(
            f"corrupt processor config {where}: patch_size {patch!r} / "
            f"num_additional_image_tokens {extra!r}"
        )
    side = cfg.vision.image_size
    drop = proc.get("vision_feature_select_strategy") == "default"
    n = (side // patch) ** 2 + extra - int(drop)
    if n != cfg.image_tokens:
        raise TernvlmError(
            f"unsupported processor config {where}: it expands <image> into {n} tokens "
            f"(({side} // patch_size {patch})^2 + num_additional_image_tokens {extra}"
            f"{' - 1 for strategy default' if drop else ''}), the model gives "
            f"{cfg.image_tokens} image features"
        )
    return n


def read_settings(folder: Path, cfg: VLMConfig, tokenizer: Tokenizer) -> dict[str, Any] | None:
    """The LLaVA processor settings of a transformers folder (stored as ``cfg.processor``), or
    None when it has no chat template (the plain layout is kept)."""
    template = read_chat_template(folder)
    if template is None:
        return None
    proc = _read_json(folder / PROCESSOR_CONFIG, "processor config") or {}
    token = proc.get("image_token", IMAGE)
    if not isinstance(token, str):
        raise TernvlmError(f"corrupt processor config {folder / PROCESSOR_CONFIG}: image_token")
    settings = {
        "kind": KIND,
        "image_token": token,
        "image_seq_length": image_seq_length(proc, cfg, folder / PROCESSOR_CONFIG),
        "chat_template": template,
        "use_chat_template": True,
        "special_tokens": _special_token_strings(folder),
        "stop_ids": list(dict.fromkeys(_eos_ids(folder))),
    }
    LlavaProcessor(cfg, tokenizer, settings)  # validates them
    return settings


class LlavaProcessor(Processor):
    """transformers' ``LlavaProcessor`` text layout (chat template, image token expansion) on our
    tokenizer; see the module docstring. ``settings``: ``cfg.processor`` when not given.

    ``chat`` (default on) decides whether plain prompts go through the chat template; off, they get
    the plain :class:`Processor` layout. A plain attribute: set it to change the behaviour.
    """

    def __init__(
        self, cfg: VLMConfig, tokenizer: Tokenizer, settings: dict[str, Any] | None = None
    ) -> None:
        super().__init__(cfg, tokenizer)
        s = cfg.processor if settings is None else settings
        if not isinstance(s, dict) or s.get("kind") != KIND:
            raise TernvlmError(f"invalid model config: processor settings {s!r} are not LLaVA's")
        try:
            self.image_token = str(s["image_token"])
            self.image_seq_length = int(s["image_seq_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TernvlmError(f"invalid LLaVA processor settings: {exc!r}") from None
        read_chat_settings(self, s, "LLaVA")
        if self.image_seq_length != cfg.image_tokens:
            raise TernvlmError(
                f"invalid LLaVA processor settings: image_seq_length {self.image_seq_length} != "
                f"the model's {cfg.image_tokens} image tokens"
            )
        image_id = tokenizer.token_to_id(self.image_token)
        if image_id != cfg.image_token_id:
            raise TernvlmError(
                f"the tokenizer's {self.image_token} is id {image_id}, the model's image_token_id "
                f"is {cfg.image_token_id}"
            )

    def uses_chat(self) -> bool:
        return self.chat and self.chat_template is not None

    def prompt_text(self, prompt: str, n_images: int = 1) -> str | None:
        """The prompt before image expansion: as given when it holds the image token, else the
        rendered chat template; None for the plain layout (no template or ``chat`` off)."""
        if self.image_token in prompt:
            return prompt
        if not self.uses_chat():
            return None
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": user_message(prompt)}]
        return render_chat_template(
            self.chat_template,
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            **self.special_tokens,
        )

    def expand(self, text: str, n_images: int) -> str:
        """Each image token -> ``image_seq_length`` of them (``replace_image_token``)."""
        found = text.count(self.image_token)
        if found != n_images:
            raise TernvlmError(
                f"the prompt has {found} {self.image_token} tokens for {n_images} images"
            )
        return text.replace(self.image_token, self.image_token * self.image_seq_length)

    def encode(
        self, prompt: str, target: str | None = None, n_images: int | None = None
    ) -> Encoded:
        """Prompt ids with each image expanded (``n_images``: default 1, or the prompt's count of
        image tokens) and, when given, `` target<eos>`` appended."""
        n = n_images if n_images is not None else max(1, prompt.count(self.image_token))
        text = self.prompt_text(prompt, n)
        if text is None:
            if n != 1:
                raise TernvlmError(f"the plain prompt layout takes one image, not {n}")
            return super().encode(prompt, target)
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer.encode(self.expand(text, n), add_special_tokens=add_special).ids
        return self.finish(ids, target)

    def prepare(
        self, images: list[Image.Image], prompt: str, target: str | None = None
    ) -> tuple[Encoded, torch.Tensor]:
        """transformers' ``LlavaProcessor(text=..., images=...)`` for one prompt about ``images``."""
        return self.encode(prompt, target, len(images)), self.pixels(images)
