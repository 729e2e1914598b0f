"""The W4A8 reference (ops.quantize_act_fp8, ops.w4a8_gemm) against an independent float64 computation.

Every W4A8 kernel is tested against these two functions, so they are checked here by code that
shares nothing with them: the e4m3 values are listed from the format's definition (OCP 8-bit
floating point, E4M3: bias 7, subnormals m * 2^-9, no infinities, S.1111.111 the only NaN) and
rounded to by a nearest-value search with ties to the even code; the weight nibbles are packed
and unpacked with numpy from the checkpoint format's words (docs/checkpoint-format.md: low nibble
= even input channel, two's complement); the GEMM is one float64 matmul of the dequantized
operands. Nothing here calls torch's float8 conversion or engine.quant.int4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.quant import ops

E4M3_MAX = 448.0


def e4m3_grid() -> np.ndarray:
    """The non-negative finite e4m3 values, indexed by their 7-bit code (0x00 .. 0x7E)."""
    values = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # S.1111.111 is NaN in E4M3
            values.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(values)


GRID = e4m3_grid()


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """Round float64 ``v`` (|v| <= 448) to the nearest e4m3 value, ties to the even code."""
    a = np.abs(v)
    hi = np.clip(np.searchsorted(GRID, a), 0, len(GRID) - 1)  # first grid value >= a
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.sign(v) * GRID[pick]


def midpoint_distance(v: np.ndarray) -> np.ndarray:
    """Relative distance of |v| from the nearest midpoint between two e4m3 values."""
    mids = (GRID[1:] + GRID[:-1]) / 2
    a = np.abs(v)
    i = np.clip(np.searchsorted(mids, a), 1, len(mids) - 1)
    return np.minimum(np.abs(a - mids[i]), np.abs(a - mids[i - 1])) / np.maximum(a, 1e-30)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7], [N, K] -> uint8 [N, K/2]: even channel low nibble, two's complement."""
    u = (codes.astype(np.int64) & 0xF).astype(np.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def test_the_grid_is_e4m3():
    # Sanity of the definition above against the format's landmarks (OCP FP8 spec, table 1).
    assert len(GRID) == 127 and GRID[-1] == E4M3_MAX and GRID[1] == 2.0**-9 and GRID[8] == 2.0**-6
    assert GRID[0x7E] == 448.0 and GRID[0x38] == 1.0 and np.all(np.diff(GRID) > 0)


def _inputs(m: int, k: int, r: int, seed: int, outliers: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).exp()  # rows of mixed size
    if outliers:
        x[:, :: max(1, k // 5)] *= 30  # a few large channels, as FLUX's
    smooth = torch.rand(k, generator=g) + 0.5
    proj_down = torch.randn(r, k, generator=g) / k**0.5
    return x, smooth, proj_down


@pytest.mark.parametrize(("m", "k", "shift"), [(7, 64, 0.0), (33, 192, 0.0), (16, 128, 0.171875)])
def test_quantize_act_fp8_against_float64(m, k, shift):
    x, smooth, proj_down = _inputs(m, k, 8, seed=m + k)
    if shift:
        x = torch.nn.functional.gelu(x, approximate="tanh")  # the unsigned layers' input
    codes, ascale, lora_act = ops.quantize_act_fp8(x, smooth, proj_down, shift=shift)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (m, k)
    assert ascale.dtype == torch.float32 and ascale.shape == (m,)

    x_hat = (x.double().numpy() + shift) / smooth.double().numpy()[None]  # [M, K] float64
    amax = np.abs(x_hat).max(axis=1)
    np.testing.assert_allclose(ascale.double().numpy(), amax / E4M3_MAX, rtol=1e-6)
    scaled = x_hat * (E4M3_MAX / amax)[:, None]
    want = round_e4m3(scaled)
    got = codes.double().numpy()
    # The op computes x^ and the scaling in fp32: it may round the other way only where the
    # float64 value lies within fp32's relative precision of a midpoint between two codes.
    near = midpoint_distance(scaled) < 1e-6
    assert np.array_equal(got[~near], want[~near]), np.argwhere((got != want) & ~near)[:5]
    assert near.mean() < 0.01
    assert np.all(np.abs(got) <= E4M3_MAX) and np.all(np.abs(got).max(axis=1) == E4M3_MAX)  # row max -> 448
    np.testing.assert_allclose(lora_act.double().numpy(), x_hat @ proj_down.double().numpy().T, rtol=1e-4, atol=1e-5)
    # The quantization error is what e4m3's 3 mantissa bits allow: at most half a step, 2^-4 relative,
    # for values in the normal range (above 2^-6 of the row's 448).
    normal = np.abs(scaled) >= 2.0**-6
    deq = got * (amax / E4M3_MAX)[:, None]
    assert np.all(np.abs(deq - x_hat)[normal] <= np.abs(x_hat)[normal] * 2.0**-4 * (1 + 1e-6))


def test_quantize_act_fp8_exact_cases():
    # Values that are e4m3 values times a power of two: every step is exact in fp32 and float64,
    # so the codes must be exactly these values; a zero row gives codes 0 and scale 0.
    k = 128
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 127, (4, k), generator=g)
    sign = torch.where(torch.rand(4, k, generator=g) < 0.5, -1.0, 1.0)
    vals = torch.from_numpy(GRID).float()[idx] * sign
    vals[:, 5] = E4M3_MAX  # each row's maximum is 448 exactly
    x = torch.cat([vals * 2.0**-3, torch.zeros(1, k)])  # rows scaled by 2^-3: ascale = 2^-3
    smooth = torch.ones(k)
    codes, ascale, lora_act = ops.quantize_act_fp8(x, smooth, torch.zeros(4, k), shift=0.0)
    assert torch.equal(codes[:4].float(), vals)
    assert torch.equal(ascale, torch.tensor([2.0**-3] * 4 + [0.0]))
    assert torch.equal(codes[4].float(), torch.zeros(k)) and not codes.float().isnan().any()
    assert torch.equal(lora_act, torch.zeros(5, 4))


def _w4a8_float64(codes, ascale, wcodes, wscales, lora_act, proj_up, bias):
    """y = (codes * ascale) (max(wcodes, -7) * wscales)^T + lora_act proj_up^T + bias, all float64."""
    k = wcodes.shape[1]
    gs = k // wscales.shape[1]
    # the contract reads code -8 as -7 (sign-magnitude nibbles have no -8)
    w = np.maximum(wcodes, -7).astype(np.float64) * np.repeat(wscales.double().numpy(), gs, axis=1)  # [N, K]
    a = codes.double().numpy() * ascale.double().numpy()[:, None]  # [M, K]
    y = a @ w.T + lora_act.double().numpy() @ proj_up.double().numpy().T
    return y + (0.0 if bias is None else bias.double().numpy())


@pytest.mark.parametrize(("m", "k", "n", "with_bias"), [(5, 64, 24, True), (19, 256, 40, False), (64, 192, 96, True)])
def test_w4a8_gemm_against_float64(m, k, n, with_bias):
    x, smooth, proj_down = _inputs(m, k, 16, seed=100 + m)
    codes, ascale, lora_act = ops.quantize_act_fp8(x, smooth, proj_down, shift=0.0)
    rng = np.random.default_rng(m * n)
    wcodes = rng.integers(-8, 8, size=(n, k))  # every code, -8 included
    qweight = torch.from_numpy(pack_nibbles(wcodes))
    g = torch.Generator().manual_seed(n)
    wscales = (torch.rand(n, k // 64, generator=g) + 0.1).bfloat16()  # as stored
    proj_up = (torch.randn(n, 16, generator=g) / 4).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None

    y = ops.w4a8_gemm(codes, ascale, qweight, wscales, lora_act, proj_up, bias, out_dtype=torch.float32)
    want = _w4a8_float64(codes, ascale, wcodes, wscales, lora_act, proj_up, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # fp32 accumulation of O(K) terms: relative error a few 1e-7 of the row's magnitude.
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert np.all(np.abs(y.double().numpy() - want) <= 1e-5 * scale)

    # partial is added before the one rounding to out_dtype; the gated residual as documented.
    partial = torch.randn(m, n, generator=g).bfloat16()
    y_p = ops.w4a8_gemm(
        codes, ascale, qweight, wscales, lora_act, proj_up, bias, partial, out_dtype=torch.bfloat16
    )
    want_p = torch.from_numpy(want + partial.double().numpy())
    assert torch.allclose(y_p.double(), want_p, rtol=2**-8, atol=1e-5 * float(scale.max()))
    residual = torch.randn(m, n, generator=g)
    gate = torch.randn(1, n, generator=g)
    y_r = ops.w4a8_gemm(
        codes, ascale, qweight, wscales, lora_act, proj_up, bias, None, residual, gate, out_dtype=torch.float32
    )
    want_r = residual.double().numpy() + gate.double().numpy() * want
    assert np.all(np.abs(y_r.double().numpy() - want_r) <= 1e-5 * (np.abs(want_r) + scale))


def test_w4a8_gemm_reads_the_checkpoint_nibble_order():
    # One nonzero weight code at input channel c of row 0: only activation channel c may reach y.
    k, n = 128, 2
    for c in (0, 1, 62, 63, 64, 127):
        a = torch.zeros(1, k)
        a[0, c] = 1.0
        wcodes = np.zeros((n, k), dtype=np.int64)
        wcodes[0, c] = -3
        y = ops.w4a8_gemm(
            a.to(torch.float8_e4m3fn), torch.ones(1), torch.from_numpy(pack_nibbles(wcodes)),
            torch.ones(n, 2), torch.zeros(1, 1), torch.zeros(n, 1), None, out_dtype=torch.float32,
        )
        assert y.tolist() == [[-3.0, 0.0]], c
