"""Activation quantization fused with smoothing and the low-rank down-projection.

Each program owns BLOCK_M rows and walks their groups in order: one contiguous [BLOCK_M,
GROUP] tile load per group (16-byte vectors), smoothing and the group's scale in fp32, the
codes packed in registers (the tile is split into even and odd channels after the load, not
loaded at stride 2), and ONE low-rank product with K = GROUP into an fp32 accumulator: for a
bf16 proj_down, x_hat split into two bf16 halves (two MMAs, ~2^-17 relative); otherwise
tf32x3. Both divisions (by smooth, by the group scale) take Markstein's FMA correction from
IEEE reciprocals on the GPU (bit-exact, see common.div_correct). The loop is pipelined by
Triton (num_stages). Deterministic: each output element is produced by one program in a fixed order.

Prologues (constexpr, at most one): MODULATE quantizes ``LayerNorm(x) * (1 + scale) + shift``:
a first pass over the program's rows gathers each row's fp32 statistics (Welford per lane,
lanes merged by the equal-count parallel formula, a fixed order), then the per-group pass
normalizes and modulates in registers, rounding to x's dtype after each op as diffusers'
unfused torch ops do. GELU quantizes ``gelu_tanh(x)``, torch's formula, rounded to x's dtype.
Neither writes the 16-bit intermediate.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from triton.language.extra import libdevice

from engine.kernels.triton.common import INTERPRET, LaunchConfig, div_correct, dot_bf16, mul_rn, tanh_f32
from engine.kernels.triton.common import round_to as _round_to

# 16 rows per program: 272 programs at M = 4352, two or three per SM. block_n is unused here
# (the low-rank width is BLOCK_R).
ACT_CONFIGS: dict[int, LaunchConfig] = {9: LaunchConfig(16, 0, 4, 4), 8: LaunchConfig(16, 0, 4, 3)}
INTERPRETER_CONFIG = LaunchConfig(16, 0, 4, 1)
LORA_CHUNK = 32  # ranks of the low-rank branch per program (common.block_r; grid axis 1)


# RN(1 / 7) and RN(1 / 15) in fp32 (IEEE division on the host), for the group scale's division.
_RCP_QMAX_S = tl.constexpr(float(np.float32(1.0) / np.float32(7.0)))
_RCP_QMAX_U = tl.constexpr(float(np.float32(1.0) / np.float32(15.0)))


def act_config(major: int) -> LaunchConfig:
    """The launch config for an architecture (compute-capability major)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    return ACT_CONFIGS[9 if major >= 9 else 8]


@triton.jit
def _row_stats(x_ptrs, K, eps, GROUP: tl.constexpr, COMPILED: tl.constexpr):
    """(mean, rstd) of each row, fp32: Welford per lane over the row's groups, then the lanes
    merged exactly by the parallel formula for equal counts; one read of the rows. rstd as
    torch's LayerNorm takes it: rsqrtf on the GPU (its CUDA kernel), 1 / sqrt on the CPU.
    Divisions are IEEE (``div_rn``): Triton's ``/`` compiles to the approximate ``div.full.f32``
    on the GPU where the interpreter divides exactly (tests/test_triton_static.py reads the PTX)."""
    mean_l = tl.zeros(x_ptrs.shape, dtype=tl.float32)
    m2_l = tl.zeros(x_ptrs.shape, dtype=tl.float32)
    n_groups = K // GROUP
    for g in range(0, n_groups):
        x = tl.load(x_ptrs + g * GROUP).to(tl.float32)
        delta = x - mean_l
        mean_l += delta * tl.div_rn(1.0, tl.cast(g + 1, tl.float32))
        m2_l += delta * (x - mean_l)
    mean = tl.div_rn(tl.sum(mean_l, axis=1), float(GROUP))
    spread = mean_l - mean[:, None]
    m2 = tl.sum(m2_l, axis=1) + n_groups * tl.sum(spread * spread, axis=1)
    var = tl.div_rn(m2, tl.cast(K, tl.float32)) + eps
    rstd = libdevice.rsqrt(var) if COMPILED else tl.div_rn(1.0, tl.sqrt_rn(var))
    return mean, rstd


@triton.jit
def _gelu_tanh(x, COMPILED: tl.constexpr):
    """torch's gelu(approximate="tanh") in fp32, its operation order."""
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + tanh_f32(inner, COMPILED))


@triton.jit
def quantize_act_kernel(
    x_ptr,  # [M, K]
    smooth_ptr,  # [K]
    rsmooth_ptr,  # f32 [K], RN(1 / smooth) (read only with COMPILED)
    down_ptr,  # [R, K]
    qx_ptr,  # u8 [M, K/2]
    ascales_ptr,  # f32 [M, G], stored group-major (stride 1 along M)
    lora_ptr,  # f32 [M, R]
    mscale_ptr,  # [B, K], x's dtype (read only with MODULATE)
    mshift_ptr,  # [B, K], x's dtype (read only with MODULATE)
    M,
    K,
    R,
    stride_xm,
    stride_dr,
    stride_qm,
    stride_ag,
    shift,
    rows_per_image,  # S = M / B (MODULATE)
    stride_mb,  # row stride of mod_scale and mod_shift
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr,
    UNSIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    COMPILED: tl.constexpr,  # for a GPU: libdevice rint, FMA division, bf16 MMA (not interpreted)
    DOWN_BF16: tl.constexpr,
    MODULATE: tl.constexpr,  # x <- LayerNorm(x) * (1 + scale) + shift, rounded like torch
    GELU: tl.constexpr,  # x <- gelu_tanh(x), rounded like torch
    HAS_SHIFT: tl.constexpr = True,  # shift != 0 (else x + shift is skipped for bf16 x)
    ONE_CHUNK: tl.constexpr = False,  # R <= BLOCK_R: grid axis 1 is 1, no runtime branch on it
):
    HALF: tl.constexpr = GROUP // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    # The low-rank branch BLOCK_R ranks at a time (at most LORA_CHUNK): program (i, c)
    # projects rows block i onto ranks [c * BLOCK_R, (c + 1) * BLOCK_R); the programs of chunk 0
    # also write the codes and scales. Registers and shared memory do not grow with the rank;
    # a rank past LORA_CHUNK re-reads x once per extra chunk (from L2, mostly).
    chunk = tl.program_id(1)
    r0 = chunk * BLOCK_R
    row_ok = offs_m < M
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)  # int64: M * K passes 2^31 at ~139k tokens
    kk = tl.arange(0, GROUP)
    j = tl.arange(0, HALF)
    rr = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + kk[None, :]
    d_rows = tl.minimum(r0 + rr, tl.maximum(R - 1, 0)).to(tl.int64)  # rows past R repeat row R-1
    d_ptrs = down_ptr + d_rows[:, None] * stride_dr + kk[None, :]
    q_ptrs = qx_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + j[None, :]
    s_ptrs = ascales_ptr + offs_m
    lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BF16_X: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if MODULATE:
        mean, rstd = _row_stats(x_ptrs, K, eps, GROUP, COMPILED)  # [BM] each
        image = (rows // rows_per_image) * stride_mb
        ms_ptrs = mscale_ptr + image[:, None] + kk[None, :]
        mh_ptrs = mshift_ptr + image[:, None] + kk[None, :]
    for g in range(0, K // GROUP):
        x = _widen(tl.load(x_ptrs), COMPILED)  # [BM, GROUP], contiguous rows
        if MODULATE:
            x = modulate(x, mean, rstd, ms_ptrs, mh_ptrs, DT, COMPILED)
            ms_ptrs += GROUP
            mh_ptrs += GROUP
        if GELU:
            x = _round_to(_gelu_tanh(x, COMPILED), DT, COMPILED)
        # x + 0 only turns -0 into +0, which neither the codes, the scales nor the low-rank
        # sum (it starts from +0) can see. Skipped for bf16 only: there the widening's
        # inline asm is opaque (not pure), which keeps Triton from recomputing the chain in
        # the MMA operand's layout; fp16 and fp32 x keep the add, which does the same.
        h = smooth_divide(x, smooth_ptr + g * GROUP + kk, rsmooth_ptr + g * GROUP + kk, shift,
                          HAS_SHIFT or not BF16_X, COMPILED)  # fmt: skip
        if ONE_CHUNK or chunk == 0:
            _quantize_group(h, q_ptrs, s_ptrs + g * stride_ag, row_ok, BLOCK_M, GROUP, UNSIGNED, COMPILED)
        if HAS_LORA:
            lora = down_project(h, tl.load(d_ptrs), lora, DOWN_BF16, COMPILED)  # d: [BR, GROUP]
        x_ptrs += GROUP
        d_ptrs += GROUP
        q_ptrs += HALF
    if HAS_LORA:
        out = lora_ptr + offs_m.to(tl.int64)[:, None] * R + (r0 + rr)[None, :]
        tl.store(out, lora, mask=row_ok[:, None] & (r0 + rr < R)[None, :])


@triton.jit
def modulate(x, mean, rstd, ms_ptrs, mh_ptrs, DT: tl.constexpr, COMPILED: tl.constexpr):
    """``LayerNorm(x) * (1 + scale) + shift`` of one [BM, GROUP] tile (fp32 x, the row's mean and
    rstd), each op rounded to x's dtype ``DT``, as the unfused torch ops round."""
    xn = _round_to((x - mean[:, None]) * rstd[:, None], DT, COMPILED)
    a = _round_to(1.0 + tl.load(ms_ptrs).to(tl.float32), DT, COMPILED)
    p = _round_to(mul_rn(xn, a, COMPILED), DT, COMPILED)  # no FMA with the add below
    return _round_to(p + tl.load(mh_ptrs).to(tl.float32), DT, COMPILED)


@triton.jit
def smooth_divide(x, s_ptrs, rs_ptrs, shift, ADD_SHIFT: tl.constexpr, COMPILED: tl.constexpr):
    """x_hat = (x + shift) / smooth, IEEE-rounded, for one [BM, GROUP] tile of fp32 x. On the GPU
    the reciprocal comes from the host (IEEE), three instructions per element (div_correct);
    ``ADD_SHIFT`` False skips ``x + shift`` there (shift == 0, where it only turns -0 into +0)."""
    s = tl.load(s_ptrs).to(tl.float32)
    if COMPILED:
        rs = tl.load(rs_ptrs)
        if ADD_SHIFT:
            x = x + shift
        return div_correct(x, s[None, :], rs[None, :])
    return tl.div_rn(x + shift, s[None, :])


@triton.jit
def down_project(h, d, lora, DOWN_BF16: tl.constexpr, COMPILED: tl.constexpr):
    """``lora + h @ d^T`` for x_hat ``h`` [BM, GROUP] and proj_down's tile ``d`` [BR, GROUP]."""
    if DOWN_BF16:
        # proj_down is exact in bf16, x_hat = hi + lo in two bf16 parts (16 mantissa
        # bits): two bf16 MMAs with exact products and fp32 sums, ~2^-17 relative.
        h_hi, h_lo = _split_bf16(h, COMPILED)
        lora = dot_bf16(h_hi, tl.trans(d), lora, COMPILED)
        return dot_bf16(h_lo, tl.trans(d), lora, COMPILED)
    # fp32 or fp16 factors: three TF32 MMAs, fp32-class accuracy
    return tl.dot(h, tl.trans(d.to(tl.float32)), lora, input_precision="tf32x3")


@triton.jit
def _split_bf16(h, COMPILED: tl.constexpr):
    """``(hi, lo)``: hi = RN_bf16(h), lo = RN_bf16(h - hi) (h - hi is exact in fp32). On the GPU
    two elements at a time in inline PTX (a bf16x2 conversion, the halves widened by a shift and
    a mask, two subtractions, a bf16x2 conversion), where ``tl`` compiled to a conversion per
    element, a byte permute to pair them and a widening each: 8 fewer SASS per group on sm_90."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1; cvt.rn.bf16x2.f32 $0, $3, $2; shl.b32 t0, $0, 16; "
            "and.b32 t1, $0, 0xffff0000; sub.rn.f32 t0, $2, t0; sub.rn.f32 t1, $3, t1; "
            "cvt.rn.bf16x2.f32 $1, t1, t0; }",
            "=r,=r,r,r",
            [h],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=2,
        )
    hi = h.to(tl.bfloat16)
    return hi, (h - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _widen(x, COMPILED: tl.constexpr):
    """x as fp32. bf16 on the GPU two at a time in inline PTX (a shift and a mask per pair: the
    exact conversion), where ``tl`` compiled to a byte permute and a widening for every odd one.
    Not pure on purpose: Triton then cannot hoist the MMA operand's layout conversion above it,
    which recomputed the whole chain (both divisions, the split) in that layout (471 SASS per
    group on sm_90 where the chain has no ``x + shift``, 268 as it is)."""
    if COMPILED and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; mov.b32 t, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
            "=r,=r,r",
            [x],
            dtype=tl.float32,
            is_pure=False,
            pack=2,
        )
    return x.to(tl.float32)


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as torch's amax does (PTX ``max.NaN.f32``); ``tl.max`` compiles to
    ``max.f32``, which drops a NaN operand, where the interpreter (numpy) keeps it."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_group(
    h,
    q_ptrs,
    s_ptrs,
    row_ok,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    UNSIGNED: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """One group of x_hat [BM, GROUP] -> its packed codes and its scale per row, stored."""
    HALF: tl.constexpr = GROUP // 2
    # NaN propagates into the scale (and so into the row's output) as in the reference.
    if UNSIGNED:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        amax = _max_nan(tl.reduce(h, 1, _max_nan), 0.0)
    else:
        amax = tl.reduce(tl.abs(h), 1, _max_nan)
    QMAX: tl.constexpr = 15.0 if UNSIGNED else 7.0
    if COMPILED:
        # RN(amax / QMAX) by Markstein's correction from RN(1 / QMAX) (4 instructions, not a full
        # division with its range check and slow-path call): exact for every finite amax, the
        # subnormal quotients included (see test_kernels_triton's scale test); inf would give NaN there: selected.
        rq = _RCP_QMAX_U if UNSIGNED else _RCP_QMAX_S
        q0 = amax * rq
        scale = tl.fma(tl.fma(q0, -QMAX, amax), rq, q0)
        scale = tl.where(amax == float("inf"), amax, scale)
    else:
        scale = tl.div_rn(amax, QMAX)
    denom = tl.where(scale > 0, scale, 1.0)
    if COMPILED:
        # A subnormal scale (a group of tiny values): scale both sides by 2^64, exactly.
        lift = tl.where(denom < 1e-30, 18446744073709551616.0, 1.0)
        denom = denom * lift
        # RN(1 / denom) as PTX's IEEE reciprocal (rcp.rn), what div_rn(1, denom) computes, in
        # one instruction fewer on sm_90 (no FCHK; ptxas keeps its own range check).
        rd = tl.inline_asm_elementwise(
            "rcp.rn.f32 $0, $1;", "=r,r", [denom], dtype=tl.float32, is_pure=True, pack=1
        )
        v = div_correct(h * lift[:, None], denom[:, None], rd[:, None])
    else:
        v = tl.div_rn(h, denom[:, None])
    # Half-to-even straight to int32 (one cvt.rni on the GPU); the interpreter has no
    # libdevice: the exact 1.5 * 2^23 trick (|v| <= 15 here).
    q = libdevice.float2int_rn(v) if COMPILED else ((v + 12582912.0) - 12582912.0).to(tl.int32)
    # No zero-group select: a zero scale leaves denom = 1 over values that all round to 0
    # (or below 0, unsigned). The clamp stays for scales in the subnormal range, whose
    # rounding can push |x_hat| / scale past 7 (15); on the codes, in int32.
    q = tl.minimum(tl.maximum(q, 0 if UNSIGNED else -8), 15 if UNSIGNED else 7)
    q_even, q_odd = tl.split(tl.reshape(q, (BLOCK_M, HALF, 2)))  # channel 2j, 2j+1
    packed = ((q_even & 0xF) | ((q_odd & 0xF) << 4)).to(tl.uint8)
    tl.store(q_ptrs, packed, mask=row_ok[:, None])
    if COMPILED:
        _store_rows(s_ptrs, scale, row_ok)
    else:
        tl.store(s_ptrs, scale, mask=row_ok)


@triton.jit
def _store_rows(ptrs, v, ok):
    """``tl.store(ptrs, v, mask=ok)`` in v's own layout, on the GPU: each row's scale is held
    by the threads that reduced it, and each of them stores it (the same value to the same
    address, one transaction per warp), where ``tl.store`` moved it through shared memory to one
    owner per value (two barriers, a store and a load per group)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.f32 [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r,r",
        [ptrs.to(tl.int64, bitcast=True), v, ok.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
