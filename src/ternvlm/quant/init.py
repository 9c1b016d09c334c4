"""Ternary and binary initializers: codes in {-1, 0, +1} (binary {-1, +1}) and a scale per group.

All work on a [n_groups, group_len] tensor at once (see ``groups.py``). ``kmeans`` is the seed's
contribution: Lloyd's algorithm with centroids {-a, 0, +a}; ``optimal`` is the exact L2 optimum
(k-means is a local search towards it); ``absmean`` (BitNet b1.58), ``twn`` and ``random`` are the
usual baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TernvlmError

TERNARY_INITS = ("kmeans", "kmeans_asym", "optimal", "absmean", "twn", "random")
BINARY_INITS = ("kmeans", "kmeans_asym", "optimal", "absmean", "random")
_EPS = 1e-12


@dataclass
class QuantResult:
    codes: torch.Tensor  # int8 [G, L] in {-1, 0, 1}
    scale: torch.Tensor  # [G] (symmetric) or [G, 3] centroids for codes -1, 0, +1 (asymmetric)
    iterations: int = 0

    def dequant(self) -> torch.Tensor:
        if self.scale.dim() == 2:  # asymmetric: per-code centroids
            return self.scale.gather(1, (self.codes.long() + 1))
        return self.codes.float() * self.scale[:, None]

    def sq_error(self, w: torch.Tensor) -> torch.Tensor:
        """Per-group squared L2 error."""
        return (w.float() - self.dequant()).pow(2).sum(1)


def _mean_abs_where(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (a * mask).sum(1) / mask.sum(1).clamp(min=1)


def absmean(w: torch.Tensor, bits: str = "ternary") -> QuantResult:
    """BitNet b1.58: a = mean|w|, codes = clip(round(w / a)); binary: sign(w), a = mean|w|."""
    a = w.abs().mean(1).clamp(min=_EPS)
    if bits == "binary":
        return QuantResult(_sign(w), a)
    return QuantResult(torch.clamp(torch.round(w / a[:, None]), -1, 1).to(torch.int8), a)


def twn(w: torch.Tensor) -> QuantResult:
    """Ternary weight networks: threshold 0.7 mean|w|, a = mean |w| above it."""
    aw = w.abs()
    mask = aw > 0.7 * aw.mean(1, keepdim=True)
    a = _mean_abs_where(aw, mask).clamp(min=_EPS)
    return QuantResult((torch.sign(w) * mask).to(torch.int8), a)


def kmeans(
    w: torch.Tensor, bits: str = "ternary", max_iter: int = 100, start: str = "absmean"
) -> QuantResult:
    """Lloyd's algorithm with centroids {-a, 0, a}: zero |w| < a/2, a = mean of the rest; repeat.

    Stops when no group changes its assignment (or ``max_iter``); ``iterations`` is the count of
    Lloyd steps the slowest group needed.
    """
    aw = w.abs()
    if bits == "binary":  # centroids {-a, a}: the assignment is sign(w) whatever a is
        return QuantResult(_sign(w), aw.mean(1).clamp(min=_EPS), 1)
    a = twn(w).scale if start == "twn" else aw.mean(1)
    mask = aw > a[:, None] / 2
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        a = _mean_abs_where(aw, mask)
        new = aw > a[:, None] / 2
        if torch.equal(new, mask):
            break
        mask = new
    return QuantResult((torch.sign(w) * mask).to(torch.int8), a.clamp(min=_EPS), it)


def kmeans_asym(w: torch.Tensor, bits: str = "ternary", max_iter: int = 100) -> QuantResult:
    """1-D k-means with free centroids (3 for ternary, 2 for binary), started at {-a, 0, a}."""
    wf = w.float()
    a = wf.abs().mean(1)
    if bits == "binary":
        cents = torch.stack([-a, torch.zeros_like(a), a], 1)
        codes = _sign(wf)
        for it in range(1, max_iter + 1):  # noqa: B007
            neg, pos = codes < 0, codes > 0
            cents[:, 0] = (wf * neg).sum(1) / neg.sum(1).clamp(min=1)
            cents[:, 2] = (wf * pos).sum(1) / pos.sum(1).clamp(min=1)
            new = torch.where(wf * 2 > (cents[:, 0] + cents[:, 2])[:, None], 1, -1).to(torch.int8)
            if torch.equal(new, codes):
                break
            codes = new
        cents[:, 1] = (cents[:, 0] + cents[:, 2]) / 2
        return QuantResult(codes, cents, it)
    cents = torch.stack([-a, torch.zeros_like(a), a], 1)
    codes = _nearest(wf, cents)
    for it in range(1, max_iter + 1):  # noqa: B007
        for c in range(3):
            m = codes == (c - 1)
            has = m.sum(1) > 0
            cents[:, c] = torch.where(has, (wf * m).sum(1) / m.sum(1).clamp(min=1), cents[:, c])
        new = _nearest(wf, cents)
        if torch.equal(new, codes):
            break
        codes = new
    return QuantResult(codes, cents, it)


def _nearest(w: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    d = (w[:, :, None] - cents[:, None, :]).abs()
    return (d.argmin(-1) - 1).to(torch.int8)


def optimal(w: torch.Tensor, bits: str = "ternary") -> QuantResult:
    """Exact L2-optimal symmetric ternary: keep the k largest |w| with a = their mean, best k.

    For a fixed support of size k the best a is the mean of those |w|, and the error is
    sum(w^2) - S_k^2 / k with S_k the sum of the k largest |w|: scan k over the sorted values.
    """
    aw = w.abs().double()  # float32 cumsums over ~1e6 values shift the chosen cut-off
    if bits == "binary":
        return QuantResult(_sign(w), aw.mean(1).float().clamp(min=_EPS), 0)
    srt, order = aw.sort(1, descending=True)
    cs = srt.cumsum(1)
    k = torch.arange(1, aw.shape[1] + 1, dtype=aw.dtype)
    best = (cs.pow(2) / k).argmax(1)  # index k-1 of the best support size
    a = cs.gather(1, best[:, None])[:, 0] / (best + 1).to(aw.dtype)
    keep_sorted = torch.arange(aw.shape[1])[None, :] <= best[:, None]
    mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return QuantResult((torch.sign(w) * mask).to(torch.int8), a.float().clamp(min=_EPS), 0)


def random_init(w: torch.Tensor, bits: str = "ternary", seed: int = 0) -> QuantResult:
    """Codes drawn uniformly (ablation: ignores the pre-trained values), a = mean|w|."""
    g = torch.Generator().manual_seed(seed)
    if bits == "binary":
        codes = (torch.randint(0, 2, w.shape, generator=g) * 2 - 1).to(torch.int8)
    else:
        codes = (torch.randint(0, 3, w.shape, generator=g) - 1).to(torch.int8)
    return QuantResult(codes, w.abs().mean(1).clamp(min=_EPS), 0)


def _sign(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 0, 1, -1).to(torch.int8)


def quantize_groups(w: torch.Tensor, init: str, bits: str = "ternary", **kw) -> QuantResult:
    """Dispatch by name; ``w`` is [n_groups, group_len]."""
    if bits not in ("ternary", "binary"):
        raise TernvlmError(f"unknown bits {bits!r}; expected ternary or binary")
    names = TERNARY_INITS if bits == "ternary" else BINARY_INITS
    if init not in names:
        raise TernvlmError(f"unknown {bits} init {init!r}; expected one of {', '.join(names)}")
    w = w.detach().float()
    if init == "kmeans":
        return kmeans(w, bits, **kw)
    if init == "kmeans_asym":
        return kmeans_asym(w, bits, **kw)
    if init == "optimal":
        return optimal(w, bits)
    if init == "absmean":
        return absmean(w, bits)
    if init == "twn":
        return twn(w)
    return random_init(w, bits, **kw)
