"""``quantize_(model, config)``: swap selected nn.Linear layers for QuantLinear, in place."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import nn
from tqdm import tqdm

from ..errors import TernvlmError
from .config import QuantConfig
from .linear import QuantLinear


@dataclass
class QuantReport:
    """What the init did: per-layer Lloyd iterations and relative L2 error, and its wall time."""

    layers: dict[str, tuple[int, float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def max_iterations(self) -> int:
        return max((it for it, _ in self.layers.values()), default=0)

    @property
    def mean_rel_error(self) -> float:
        errs = [e for _, e in self.layers.values()]
        return sum(errs) / max(len(errs), 1)


def selected_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the nn.Linear modules ``cfg`` quantizes (by top-level part, minus exclusions)."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, QuantLinear):
            continue
        part = name.split(".", 1)[0]
        if part not in cfg.parts:
            continue
        if name.endswith("lm_head") and not cfg.include_lm_head:
            continue
        if any(x in name for x in cfg.exclude):
            continue
        names.append(name)
    return names


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize_(
    model: nn.Module, cfg: QuantConfig, init: bool = True, progress: bool = False
) -> QuantReport:
    """Replace the selected Linear layers; ``init=False`` builds empty ones for loading weights."""
    cfg.validate()
    names = selected_linears(model, cfg)
    if not names:
        raise TernvlmError(
            f"no nn.Linear layers selected for quantization (parts={list(cfg.parts)}, "
            f"exclude={list(cfg.exclude)})"
        )
    gran = cfg.gran
    if gran.kind == "group":
        bad = [n for n in names if model.get_submodule(n).in_features % gran.group_size]
        if bad:
            k = model.get_submodule(bad[0]).in_features
            raise TernvlmError(
                f"group size {gran.group_size} does not divide the input dimension {k} of {bad[0]}"
            )
    report = QuantReport()
    t0 = time.perf_counter()
    for name in tqdm(names, desc=f"{cfg.bits} init ({cfg.init})", disable=not progress):
        lin = model.get_submodule(name)
        if init:
            q = QuantLinear.from_linear(lin, cfg)
            report.layers[name] = (q.init_iterations, q.init_rel_error)
        else:
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg)
        _set(model, name, q)
    report.seconds = time.perf_counter() - t0
    return report


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def clip_latents_(model: nn.Module) -> None:
    """Keep latent weights in [-1, 1] after an optimizer step (BinaryConnect-style)."""
    for m in quant_layers(model).values():
        m.clip_latent_()
