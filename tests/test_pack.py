import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternvlm.errors import TernvlmError
from ternvlm.quant.pack import CODE_RANGE, pack, packed_row_bytes, unpack


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 41),
    st.sampled_from(["2bit", "1.6bit", "1bit", "int8", "int4"]),
    st.integers(0, 99),
)
def test_round_trip_any_shape(n, k, fmt, seed):
    rng = np.random.default_rng(seed)
    lo, hi = CODE_RANGE[fmt]
    codes = rng.choice([-1, 1], size=(n, k)) if fmt == "1bit" else rng.integers(lo, hi + 1, (n, k))
    p = pack(codes, fmt)
    assert p.dtype == np.uint8 and p.shape == (n, packed_row_bytes(k, fmt))
    assert np.array_equal(unpack(p, k, fmt), codes)


def test_documented_layouts():
    assert pack(np.array([[-1, 0, 1, 1]]), "2bit")[0, 0] == 0 + (1 << 2) + (2 << 4) + (2 << 6)
    assert pack(np.array([[1, 1, 1, 1, 1]]), "1.6bit")[0, 0] == 242
    assert pack(np.array([[1, -1, -1, -1, -1, -1, -1, 1]]), "1bit")[0, 0] == 0b10000001
    assert packed_row_bytes(580, "1.6bit") * 8 == 580 * 1.6  # 1.6 bits per weight
    assert pack(np.array([[-8, 7, 1]]), "int4").tolist() == [
        [0 + (15 << 4), 9 + (8 << 4)]
    ]  # pad: code 0
    assert pack(np.array([[-127, 5]]), "int8").tolist() == [[129, 5]]


def test_bad_codes_and_shapes():
    with pytest.raises(TernvlmError):
        pack(np.array([[0, 2]]), "2bit")
    with pytest.raises(TernvlmError):
        pack(np.array([[0, 1]]), "1bit")
    with pytest.raises(TernvlmError):
        pack(np.array([[-9, 1]]), "int4")
    with pytest.raises(TernvlmError):
        pack(np.array([[-128, 1]]), "int8")
    with pytest.raises(TernvlmError):
        unpack(np.zeros((2, 3), np.uint8), 20, "2bit")
    with pytest.raises(TernvlmError):
        pack(np.zeros((2, 3)), "3bit")
