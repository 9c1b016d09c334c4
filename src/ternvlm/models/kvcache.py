"""Preallocated key/value cache: static shapes, so decode steps never reallocate (unlike the seed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, kv_heads, max_len, head_dim]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls,
        layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype=torch.float32,
    ) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype) for _ in range(layers)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kvh, T, D] at the current length; return all cached k/v so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
