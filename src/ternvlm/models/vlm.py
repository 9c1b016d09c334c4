"""The VLM: vision encoder -> connector -> decoder, image features placed at image-token slots."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VLMConfig
from .connector import Connector
from .decoder import Decoder
from .kvcache import KVCache
from .vision import VisionEncoder


def _init_weights(m: nn.Module) -> None:
    """GPT-2 style: N(0, 0.02) for projections and embeddings (tied head keeps logits small)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.vision = VisionEncoder(cfg.vision)
        self.connector = Connector(cfg.connector, cfg.vision.hidden, cfg.decoder.hidden)
        self.decoder = Decoder(cfg.decoder)
        self.apply(_init_weights)

    def set_gradient_checkpointing(
        self, enabled: bool = True, parts: tuple[str, ...] = ("vision", "decoder")
    ) -> None:
        """Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) of the blocks of
        ``parts``: a training forward keeps only each block's input and recomputes the block in
        the backward pass. Same loss and gradients, less memory, about one more forward of time.
        Inference (no grad, or a KV cache) is unaffected."""
        bad = [p for p in parts if p not in ("vision", "decoder")]
        if bad:
            raise ValueError(f"gradient checkpointing parts must be vision or decoder, not {bad}")
        self.vision.gradient_checkpointing = enabled and "vision" in parts
        self.decoder.gradient_checkpointing = enabled and "decoder" in parts

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, image_tokens, decoder hidden]."""
        return self.connector(self.vision(pixel_values))

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None, plain: bool = False
    ) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions.

        ``plain``: image tokens without features keep their token embedding (a decode step that
        generated the image token, as transformers does) instead of being an error.
        """
        x = self.decoder.embed_tokens(input_ids)
        mask = input_ids == self.cfg.image_token_id
        n_slots = int(mask.sum())
        if n_slots == 0 or (plain and image_features is None):
            return x
        if image_features is None:
            raise ValueError("input_ids contain image tokens but no image was given")
        feats = image_features.reshape(-1, image_features.shape[-1]).to(x.dtype)
        if feats.shape[0] != n_slots:
            raise ValueError(f"{n_slots} image-token slots but {feats.shape[0]} image features")
        x = x.clone()
        x[mask] = feats
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        cache: KVCache | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. Pass ``image_features`` to reuse an encoded image."""
        if image_features is None and pixel_values is not None:
            image_features = self.encode_image(pixel_values)
        decoding = cache is not None and cache.length > 0  # the prompt's image is in the cache
        return self.decoder(self.embed(input_ids, image_features, plain=decoding), cache)
