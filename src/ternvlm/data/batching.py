"""Padding encoded sequences into tensors with a target mask (right padding keeps causality)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.processor import Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]: next-token targets, -100 where no loss
    image_index: torch.Tensor  # [B]: which encoded image each sequence uses


def collate(encoded: list[Encoded], image_index: list[int], pad_id: int) -> Batch:
    t = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), t), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), t), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        # position p predicts token p+1; targets are ids[target_start:]
        labels[i, e.target_start - 1 : n - 1] = torch.tensor(e.ids[e.target_start :])
    return Batch(ids, labels, torch.tensor(image_index, dtype=torch.long))
