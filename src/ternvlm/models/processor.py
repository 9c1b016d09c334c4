"""Turns (image, prompt, target) into model inputs: the one place that fixes the text layout.

Layout: ``<bos> <image> x image_tokens prompt target <eos>``; loss and metrics use target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import Tokenizer

from ..config import VLMConfig
from ..data.images import to_pixels
from ..errors import TernvlmError


def qa_prompt(question: str) -> str:
    return f"question: {question} answer:"


CAPTION_PROMPT = "caption:"


@dataclass
class Encoded:
    ids: list[int]
    target_start: int  # index of the first target token in ``ids``


class Processor:
    # Token ids that end generation besides ``cfg.eos_token_id`` (SmolVLM: <end_of_utterance>).
    stop_ids: tuple[int, ...] = ()

    def __init__(self, cfg: VLMConfig, tokenizer: Tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    def prepare(
        self, images: list[Image.Image], prompt: str, target: str | None = None
    ) -> tuple[Encoded, torch.Tensor]:
        """Ids and pixels of one prompt about ``images``, laid out together: what generation
        uses. Here ``encode`` + ``pixels``; a processor whose text depends on the image (SmolVLM
        image splitting) overrides it."""
        return self.encode(prompt, target), self.pixels(images)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        v = self.cfg.vision
        return to_pixels(images, v.image_size, v.image_mean, v.image_std, v.resize)

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, prompt: str, target: str | None = None) -> Encoded:
        """Prompt ids (with image slots) and, when given, `` target<eos>`` appended."""
        c = self.cfg
        ids = [c.bos_token_id] + [c.image_token_id] * c.image_tokens + self.tokens(prompt)
        return self.finish(ids, target)

    def finish(self, ids: list[int], target: str | None, end: int | None = None) -> Encoded:
        """Prompt ids + `` target<end>`` (``end``: eos unless given), checked against the
        context: the tail every processor's ``encode`` shares."""
        c = self.cfg
        start = len(ids)
        if target is not None:
            ids = ids + self.tokens(" " + target.strip()) + [c.eos_token_id if end is None else end]
        if len(ids) > c.decoder.max_seq_len:
            n_img = sum(1 for t in ids if t == c.image_token_id)
            raise TernvlmError(
                f"prompt is too long: {len(ids)} tokens (with {n_img} image tokens) "
                f"> context of {c.decoder.max_seq_len}"
            )
        return Encoded(ids, start)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def processor_for(cfg: VLMConfig, tokenizer: Tokenizer) -> Processor:
    """The processor whose text layout the model was trained with (kept across save/export:
    ``cfg.architecture`` is stored with the weights and in .tflite metadata)."""
    if cfg.architecture == "moondream2":
        from .hf_moondream import MoondreamProcessor  # its prompt template

        return MoondreamProcessor(cfg, tokenizer)
    if cfg.architecture == "idefics3" and cfg.processor is not None:
        from .hf_idefics3_processor import SmolVLMProcessor  # splitting, chat template

        return SmolVLMProcessor(cfg, tokenizer)
    if cfg.architecture == "llava" and cfg.processor is not None:
        from .hf_llava_processor import LlavaProcessor  # chat template, image token expansion

        return LlavaProcessor(cfg, tokenizer)
    return Processor(cfg, tokenizer)
