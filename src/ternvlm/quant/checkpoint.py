"""Ternary/binary checkpoint tensors: packed codes plus per-group scales, in safetensors.

A QuantLinear ``name`` is stored as ``name.qweight`` (uint8, 2-bit ternary or 1-bit binary codes,
rows packed independently, see ``pack.py``), ``name.scale`` (float32, per group) and ``name.bias``.
Loading rebuilds QuantLinear modules whose latent weights are the codes themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TernvlmError
from .api import quant_layers, quantize_
from .config import QuantConfig
from .pack import pack, packed_row_bytes, unpack

_QUANT_KEYS = ("latent", "norm", "scale", "bias")


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every QuantLinear replaced by its packed codes, scale and bias."""
    layers = quant_layers(model)
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if k.rpartition(".")[0] not in layers or k.rpartition(".")[2] not in _QUANT_KEYS
    }
    for name, m in layers.items():
        fmt = m.cfg.pack_format
        codes = m.codes()
        sd[f"{name}.qweight"] = torch.from_numpy(pack(codes.numpy(), fmt))
        sd[f"{name}.scale"] = m.effective_scale(codes.float()).detach().float().clone()
        if m.bias is not None:
            sd[f"{name}.bias"] = m.bias.detach().clone()
    return sd


def prepare_quantized(model: nn.Module, qc: dict[str, Any]) -> QuantConfig:
    """Swap in empty QuantLinear layers described by a checkpoint's ``quantization_config``."""
    if not isinstance(qc, dict):
        raise TernvlmError("invalid quantization_config: expected an object")
    qc = {k: v for k, v in qc.items() if k not in ("format", "modules")}
    cfg = QuantConfig.from_dict(qc)
    # The stored scale is the effective one whatever the training mode was: load it as learned.
    quantize_(model, dataclasses.replace(cfg, scale="learned"), init=False)
    return cfg


@torch.no_grad()
def load_packed_(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> dict:
    """Unpack codes into the QuantLinear layers; returns the remaining (float) tensors."""
    rest = dict(sd)
    for name, m in quant_layers(model).items():
        fmt = m.cfg.pack_format
        try:
            qw = rest.pop(f"{name}.qweight").numpy().astype(np.uint8)
            scale = rest.pop(f"{name}.scale")
        except KeyError as exc:
            raise TernvlmError(f"checkpoint {where} lacks quantized tensor {exc}") from None
        if qw.shape != (m.out_features, packed_row_bytes(m.in_features, fmt)):
            raise TernvlmError(f"checkpoint {where}: {name}.qweight has shape {qw.shape}")
        if tuple(scale.shape) != tuple(m.scale.shape):
            raise TernvlmError(f"checkpoint {where}: {name}.scale has shape {tuple(scale.shape)}")
        codes = unpack(qw, m.in_features, fmt)
        if codes.size and codes.max() > 1:  # 2-bit value 3 is not a ternary code
            raise TernvlmError(f"checkpoint {where}: {name}.qweight holds invalid codes")
        m.latent.copy_(torch.from_numpy(codes).float())
        m.scale.copy_(scale.float())
        if m.bias is not None:
            b = rest.pop(f"{name}.bias", None)
            if b is None:
                raise TernvlmError(f"checkpoint {where} lacks {name}.bias")
            m.bias.copy_(b.float())
    return rest
