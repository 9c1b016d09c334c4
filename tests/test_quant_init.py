import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternvlm.errors import TernvlmError
from ternvlm.quant.groups import Granularity
from ternvlm.quant.init import QuantResult, quantize_groups


def brute_force_best(w: torch.Tensor) -> float:
    """Lowest L2 error over every {-a,0,a} assignment (a optimal for each support)."""
    best = float("inf")
    for support in itertools.product([0, 1], repeat=w.numel()):
        m = torch.tensor(support, dtype=torch.bool)
        if not m.any():
            err = float(w.pow(2).sum())
        else:
            a = w.abs()[m].mean()
            err = float((w - torch.sign(w) * m * a).pow(2).sum())
        best = min(best, err)
    return best


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=9))
def test_optimal_equals_brute_force(vals):
    w = torch.tensor([vals], dtype=torch.float32)
    r = quantize_groups(w, "optimal")
    assert float(r.sq_error(w)[0]) <= brute_force_best(w[0]) + 1e-4


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_kmeans_close_to_optimal_never_below(dist):
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        w = torch.randn(64, 512, generator=g)
    else:
        w = torch.distributions.Laplace(0.0, 1.0).sample((64, 512))
    opt = quantize_groups(w, "optimal").sq_error(w)
    km = quantize_groups(w, "kmeans")
    e = km.sq_error(w)
    assert (e >= opt - 1e-3).all()
    assert float(e.sum() / opt.sum()) < 1.01
    assert 1 <= km.iterations < 100
    for other in ("absmean", "twn", "random"):
        assert float(quantize_groups(w, other).sq_error(w).sum()) > float(e.sum())


def test_codes_and_scales_are_well_formed():
    w = torch.randn(8, 32)
    for init in ("kmeans", "optimal", "absmean", "twn", "random", "kmeans_asym"):
        for bits in ("ternary", "binary"):
            if bits == "binary" and init == "twn":
                continue
            r: QuantResult = quantize_groups(w, init, bits)
            assert r.codes.dtype == torch.int8 and r.codes.shape == w.shape
            vals = set(r.codes.unique().tolist())
            assert vals <= ({-1, 1} if bits == "binary" else {-1, 0, 1})
            assert torch.isfinite(r.dequant()).all()


def test_binary_kmeans_is_sign_mean_abs():
    w = torch.randn(4, 16)
    r = quantize_groups(w, "kmeans", "binary")
    assert torch.allclose(r.scale, w.abs().mean(1))


def test_all_zero_group_is_safe():
    w = torch.zeros(3, 8)
    for init in ("kmeans", "optimal", "absmean", "twn"):
        assert torch.isfinite(quantize_groups(w, init).dequant()).all()


def test_granularity_parse_and_groups():
    w = torch.arange(24.0).reshape(4, 6)
    assert Granularity.parse("tensor").to_groups(w).shape == (1, 24)
    assert Granularity.parse("row").to_groups(w).shape == (4, 6)
    assert Granularity.parse("group:3").to_groups(w).shape == (8, 3)
    assert np.array_equal(Granularity.parse("group:3").to_groups(w)[1].numpy(), [3, 4, 5])
    with pytest.raises(TernvlmError, match="does not divide"):
        Granularity.parse("group:4").to_groups(w)
    for bad in ("group:0", "group:x", "column"):
        with pytest.raises(TernvlmError, match="unknown granularity"):
            Granularity.parse(bad)


def test_unknown_init_and_bits():
    with pytest.raises(TernvlmError, match="unknown ternary init"):
        quantize_groups(torch.randn(2, 4), "median")
    with pytest.raises(TernvlmError, match="unknown bits"):
        quantize_groups(torch.randn(2, 4), "kmeans", "quaternary")
