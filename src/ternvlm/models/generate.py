"""Text generation with the KV cache: prefill image + prompt once, then one token per step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from .processor import Processor
from .vlm import VLM


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # tokens that end generation besides the model's eos


def stop_set(eos: int, g: GenerationConfig) -> set[int]:
    return {eos, *g.stop_ids}


def pick_token(logits: torch.Tensor, g: GenerationConfig, gen: torch.Generator) -> int:
    if g.temperature <= 0:
        return int(logits.argmax())
    logits = logits / g.temperature
    if g.top_k > 0:
        kth = torch.topk(logits, min(g.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


@torch.no_grad()
def generate_ids(
    model: VLM,
    prompt_ids: list[int],
    pixels: torch.Tensor,
    g: GenerationConfig,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after ``prompt_ids`` (stops at <eos>, a ``g.stop_ids`` token or the context
    end; the stop token is not returned). ``pixels``: every image view the prompt's image tokens
    take, in order ([K+1, 3, S, S] for one SmolVLM image split into K tiles)."""
    model.eval()
    stop = stop_set(model.cfg.eos_token_id, g)
    room = model.cfg.decoder.max_seq_len - len(prompt_ids)
    steps = max(0, min(g.max_new_tokens, room))
    gen = torch.Generator().manual_seed(g.seed)
    feats = model.encode_image(pixels)
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    if use_cache:
        cache = model.decoder.new_cache(1)
        logits = model(ids, image_features=feats, cache=cache)[0, -1]
        for _ in range(steps):
            nxt = pick_token(logits, g, gen)
            if nxt in stop:
                break
            out.append(nxt)
            if len(out) == steps:
                break
            logits = model(torch.tensor([[nxt]]), cache=cache)[0, -1]
        return out
    for _ in range(steps):
        logits = model(
            torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1), image_features=feats
        )[0, -1]
        nxt = pick_token(logits, g, gen)
        if nxt in stop:
            break
        out.append(nxt)
    return out


def generate(
    model: VLM,
    processor: Processor,
    image: Image.Image,
    prompt: str,
    g: GenerationConfig | None = None,
) -> str:
    g = g or GenerationConfig()
    if processor.stop_ids:
        g = dataclasses.replace(
            g, stop_ids=tuple(dict.fromkeys((*g.stop_ids, *processor.stop_ids)))
        )
    enc, px = processor.prepare([image], prompt)
    if hasattr(model, "generate_ids"):  # a LiteRT-backed model (runtime.vlm.TfliteVLM)
        return processor.decode(model.generate_ids(enc.ids, px, g))
    return processor.decode(generate_ids(model, enc.ids, px, g))
