"""Fused W4A16 GEMV: y = x @ dequant(qweight)^T + bias for a few rows (M <= 4).

The AdaLN modulation linears take one conditioning vector per image, so their cost is reading
the weight. This kernel reads the packed 4-bit weight, its scales and zeros once per call (no
dequantized copy in memory), and keeps the math in registers, per group g of GROUP channels::

    y[m, n] = sum_g  wscales[n, g] * sum_{k in g} code[n, k] * x[m, k]
                   + wzeros[n, g]  * sum_{k in g} x[m, k]

Codes are unsigned (0..15); their conversion to fp32 is exact (magic-number OR). x may be any
float dtype; the sums are fp32; y is written in y's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.triton.common import INTERPRET, LaunchConfig

# block_m = rows of x handled together (padded to a power of two), block_n = output channels
# per program; BLOCK_K channels per loop step.
GEMV_CONFIGS: dict[int, LaunchConfig] = {9: LaunchConfig(4, 32, 4, 3), 8: LaunchConfig(4, 32, 4, 3)}
GEMV_BLOCK_K = 256
MAX_ROWS = 4
INTERPRETER_CONFIG = LaunchConfig(4, 16, 4, 1)


def gemv_config(major: int) -> LaunchConfig:
    """The launch config for an architecture (compute-capability major)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    return GEMV_CONFIGS[9 if major >= 9 else 8]


@triton.jit
def _codes_to_f32(c):
    """uint codes 0..15 (int32) -> fp32 exactly: OR into the mantissa of 2^23, subtract 2^23."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,  # [M, K]
    qw_ptr,  # u8 [N, K/2], unsigned codes
    wscales_ptr,  # [N, G]
    wzeros_ptr,  # [N, G]
    bias_ptr,  # [N]
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_ym,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    GPB: tl.constexpr = BLOCK_K // GROUP  # groups per loop step
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    jb = tl.arange(0, BLOCK_K // 2)
    kk = tl.arange(0, BLOCK_K)
    gg = tl.arange(0, GPB)
    w_ptrs = qw_ptr + cols[:, None] * stride_wn + jb[None, :]
    s_ptrs = wscales_ptr + cols[:, None] * stride_sn + gg[None, :] * stride_sg
    z_ptrs = wzeros_ptr + cols[:, None] * stride_zn + gg[None, :] * stride_zg
    y0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # no masks: 16-byte vector loads
            p = tl.load(w_ptrs).to(tl.int32)  # [BN, BK/2]
            s = tl.load(s_ptrs).to(tl.float32)  # [BN, GPB]
            z = tl.load(z_ptrs).to(tl.float32)
        else:  # K is a multiple of GROUP, not of BLOCK_K
            k_ok = (k0 + jb * 2) < K
            g_ok = (k0 + gg * GROUP) < K
            p = tl.load(w_ptrs, mask=k_ok[None, :], other=0).to(tl.int32)
            s = tl.load(s_ptrs, mask=g_ok[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_ptrs, mask=g_ok[None, :], other=0.0).to(tl.float32)
        lo = _codes_to_f32(p & 0xF)  # channel k0 + 2j
        hi = _codes_to_f32(p >> 4)  # channel k0 + 2j + 1
        for m in tl.static_range(ROWS):
            xv = tl.load(x_ptr + m * stride_xm + k0 + kk, mask=(k0 + kk < K) & (m < M), other=0.0)
            x_e, x_o = tl.split(tl.reshape(xv.to(tl.float32), (BLOCK_K // 2, 2)))
            t = lo * x_e[None, :] + hi * x_o[None, :]  # [BN, BK/2]
            dots = tl.sum(tl.reshape(t, (BLOCK_N, GPB, GROUP // 2)), axis=2)  # [BN, GPB]
            xsum = tl.sum(tl.reshape(xv.to(tl.float32), (GPB, GROUP)), axis=1)  # [GPB]
            part = tl.sum(s * dots + z * xsum[None, :], axis=1)  # [BN]
            if m == 0:
                y0 += part
            elif m == 1:
                y1 += part
            elif m == 2:
                y2 += part
            else:
                y3 += part
        w_ptrs += BLOCK_K // 2
        s_ptrs += GPB * stride_sg
        z_ptrs += GPB * stride_zg
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols).to(tl.float32)
        y0 += b
        y1 += b
        y2 += b
        y3 += b
    out = y_ptr + offs_n
    ty = y_ptr.dtype.element_ty
    tl.store(out, y0.to(ty), mask=n_ok)
    if ROWS > 1:
        tl.store(out + stride_ym, y1.to(ty), mask=n_ok & (M > 1))
    if ROWS > 2:
        tl.store(out + 2 * stride_ym, y2.to(ty), mask=n_ok & (M > 2))
        tl.store(out + 3 * stride_ym, y3.to(ty), mask=n_ok & (M > 3))
