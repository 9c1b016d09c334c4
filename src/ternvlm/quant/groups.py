"""Granularity: how a weight matrix [N, K] is cut into groups that share one scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TernvlmError


@dataclass(frozen=True)
class Granularity:
    kind: str  # "tensor", "row" or "group"
    group_size: int = 0

    @classmethod
    def parse(cls, text: str) -> Granularity:
        """``tensor``, ``row`` or ``group:G`` (blocks of G input columns within a row)."""
        if text in ("tensor", "row"):
            return cls(text)
        kind, _, g = text.partition(":")
        if kind == "group" and g.isdigit() and int(g) > 0:
            return cls("group", int(g))
        raise TernvlmError(f"unknown granularity {text!r}; expected tensor, row or group:G (G > 0)")

    def __str__(self) -> str:
        return f"group:{self.group_size}" if self.kind == "group" else self.kind

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """[N, K] -> [n_groups, group_len] view (row-major, so groups never straddle rows)."""
        if w.dim() != 2:
            raise TernvlmError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        n, k = w.shape
        if self.kind == "tensor":
            return w.reshape(1, n * k)
        if self.kind == "row":
            return w
        if k % self.group_size:
            raise TernvlmError(
                f"group size {self.group_size} does not divide the input dimension {k}"
            )
        return w.reshape(n * k // self.group_size, self.group_size)

    def n_groups(self, shape: tuple[int, int]) -> int:
        n, k = shape
        return {"tensor": 1, "row": n}.get(self.kind, n * k // max(self.group_size, 1))
