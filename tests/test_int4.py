"""Exact properties of 4-bit group quantization and nibble packing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.quant import (
    dequantize_int4,
    dequantize_int4_asym,
    pack_int4,
    quantize_int4,
    quantize_int4_asym,
    unpack_int4,
)

shapes = st.tuples(st.integers(1, 5), st.integers(1, 4)).map(lambda t: (t[0], 64 * t[1]))
values = st.sampled_from(["normal", "zeros", "huge", "tiny", "mixed_zero_groups", "single_spike"])


def make(shape: tuple[int, int], kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "huge":
        return x / x.abs().max() * 3e38
    if kind == "tiny":
        return x * 1e-38
    if kind == "mixed_zero_groups":
        x[:, :64] = 0
        return x
    if kind == "single_spike":
        x[0, 0] = 1e6
    return x


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), signed=st.booleans())
def test_pack_unpack_roundtrip(shape, seed, signed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(packed, signed=signed), codes)


def test_pack_layout_low_nibble_is_even_channel():
    codes = torch.tensor([[1, 2, -1, -8, 7, 0]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0x21, 0x8F, 0x07]]


@settings(max_examples=80, deadline=None)
@given(shape=shapes, kind=values, seed=st.integers(0, 2**16), unsigned=st.booleans())
def test_quantize_bounds(shape, kind, seed, unsigned):
    x = make(shape, kind, seed)
    if unsigned:
        x = x.abs()
    codes, scales = quantize_int4(x, 64, unsigned=unsigned)
    assert scales.shape == (shape[0], shape[1] // 64)
    assert torch.isfinite(scales).all() and (scales >= 0).all()
    lo, hi = (0, 15) if unsigned else (-8, 7)
    assert codes.min() >= lo and codes.max() <= hi
    deq = dequantize_int4(codes, scales)
    assert torch.isfinite(deq).all()
    # Error bound: half a quantization step per element (scales are exact fp32 here).
    step = scales.repeat_interleave(64, dim=-1)
    assert ((deq - x).abs() <= 0.5 * step * (1 + 1e-6) + 1e-45).all()
    # An all-zero group has scale 0 and codes 0.
    zero_groups = x.unflatten(-1, (-1, 64)).abs().amax(-1) == 0
    assert (scales[zero_groups] == 0).all()


def test_unsigned_clamps_negatives_to_zero():
    x = torch.full((1, 64), -0.01)
    x[0, 1] = 1.5
    codes, scales = quantize_int4(x, 64, unsigned=True)
    assert codes[0, 0] == 0 and codes[0, 1] == 15 and scales[0, 0] == pytest.approx(0.1)


def test_scales_stored_in_low_precision_are_what_codes_use():
    x = torch.randn(8, 128) * 3
    codes, scales = quantize_int4(x, 64, scale_dtype=torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    ref = torch.round(x.unflatten(-1, (2, 64)) / scales.float().unsqueeze(-1)).clamp(-8, 7)
    assert torch.equal(codes, ref.flatten(-2).to(torch.int8))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, kind=values, seed=st.integers(0, 2**16))
def test_asymmetric_bounds(shape, kind, seed):
    w = make(shape, kind, seed).clamp(-1e30, 1e30)  # (max - min) must stay finite
    codes, scales, zeros = quantize_int4_asym(w, 64)
    assert codes.min() >= 0 and codes.max() <= 15
    deq = dequantize_int4_asym(codes, scales, zeros)
    step = scales.repeat_interleave(64, dim=-1)
    tol = 0.5 * step * (1 + 1e-5) + 1e-6 * w.abs().amax(-1, keepdim=True)
    assert torch.isfinite(deq).all() and ((deq - w).abs() <= tol).all()


def test_bad_group_size_is_named():
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        quantize_int4(torch.randn(2, 96), 64)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(2, 96), 3)
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int8))
