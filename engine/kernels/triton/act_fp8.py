"""The W4A8 activations: x_hat in FP8 (e4m3) with one scale per token, fused with smoothing, the
low-rank down-projection and the block's prologue (engine.quant.ops.quantize_act_fp8 defines it).

Why two passes over K: a code needs its row's amax, which is known only after the whole row.
Holding the row block instead does not fit: 16 rows (the smallest MMA M of the low-rank product)
of x_hat at K = 3072 are 196 KB in fp32 (98 KB as 16-bit x), 384 (192) registers per thread at
four warps, and Triton has no shared-memory buffer indexed by a loop; at K = 12288 / 15360 it
passes an SM's 228 KB of shared memory even as 16-bit x. So each program owns BLOCK_M rows and
walks K twice (128 channels a step in pass 1, 256 in pass 2 on sm_90; the widest power of two
that divides K):

1. x_hat (prologue, smoothing) of each step: its |x_hat| folded into a per-lane running maximum
   (NaN kept, as torch's amax) and its low-rank product accumulated, as quantize_act does;
   then per row amax, ascale = amax / 448 and inv = 448 / amax (IEEE divisions, once per row).
2. x re-read, backwards over K: the tiles pass 1 read last first, so they come from L2 (all of
   x while the programs in flight hold less than L2: 16 rows x K x 2 B each; the rows' ends
   beyond that; see scripts/perfmodel/act_fp8.py), x_hat recomputed bit for bit as in pass 1,
   times inv, rounded to e4m3 (one ``cvt.rn.satfinite.e4m3x2.f32`` per two values on sm_89+:
   round to nearest even, and its saturation to +-448 is the reference's clamp; Triton's own
   fp32 -> float8e4nv cast emits the same instruction on sm_90 but goes through f16 with
   ``cvt.rz`` on sm_89), stored: 1 byte per element.

The modulation prologue adds quantize_act's statistics pass in front (three reads of x); its
product and shift are computed as 16-bit operations on the GPU (``modulate16``). Pass 2
always adds ``shift`` (x + 0 makes -0 +0, as the reference's ``x.float() + shift`` does: e4m3
keeps the sign of zero, the int4 codes did not). The interpreter (and GPUs without the FP8
conversion) round to e4m3 on the bits instead (``e4m3_rne``). Deterministic: each output
element is produced by one program in a fixed order.

Exactness on the GPU: the division by smooth is quantize_act's (common.div_correct), exact where
x_hat is a normal number or zero; a subnormal x_hat (|x / smooth| < 2^-126) may be an ulp off the
IEEE quotient (measured in numpy: 12% of random subnormal quotients), which reaches a code only
in a row whose amax is below ~2^-107 (x_hat * 448 / amax must reach 2^-10 for a nonzero code)
and ascale only for a subnormal amax. Not tested here (the interpreter divides exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.triton.act import (
    _gelu_tanh,
    _max_nan,
    _row_stats,
    _store_rows,
    _widen,
    down_project,
    modulate,
    smooth_divide,
)
from engine.kernels.triton.common import INTERPRET, block_r, row_major
from engine.kernels.triton.common import arch_major as _major  # a module global: the recorders patch it
from engine.kernels.triton.common import round_to as _round_to
from engine.quant.ops import FP8_MAX, LAYER_NORM_EPS

GROUP = 64  # K is a multiple of it (the W4A8 GEMM's weight groups); the smallest block_k
_FP8_MAX = tl.constexpr(FP8_MAX)
LORA_CHUNK = 32  # ranks of the low-rank branch per program (common.block_r; grid axis 1)


@dataclass(frozen=True)
class ActFp8Config:
    """A fixed launch configuration. block_k1 / block_k2: the widest channel step of pass 1 /
    pass 2 (the launcher takes the widest power of two up to it that divides K, at least 64)."""

    block_m: int
    block_k1: int
    block_k2: int
    num_warps: int
    num_stages: int  # pass 1's pipeline depth (Triton's, of the loop with the MMA)
    stages2: int  # pass 2's

    def launch_options(self) -> dict:
        """The launch keywords of this config."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# 16 rows per program as quantize_act (272 programs at M = 4352, two or three per SM).
ACT_FP8_CONFIGS: dict[int, ActFp8Config] = {
    9: ActFp8Config(16, 128, 256, 4, 4, 4),
    8: ActFp8Config(16, 128, 256, 4, 3, 3),
}
INTERPRETER_CONFIG = ActFp8Config(16, 128, 128, 4, 1, 1)


def act_fp8_config(major: int) -> ActFp8Config:
    """The launch config for an architecture (compute-capability major)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    return ACT_FP8_CONFIGS[9 if major >= 9 else 8]


def block_k(k: int, largest: int) -> int:
    """The widest power of two from GROUP up to ``largest`` that divides ``k`` (a multiple of GROUP)."""
    b = largest
    while k % b:
        b //= 2
    return max(b, GROUP)


@triton.jit
def e4m3_rne(v, HW: tl.constexpr):
    """fp32 ``v`` clamped to +-448 (NaN kept) as e4m3 bytes (uint8), rounded to nearest even.
    ``HW``: PTX's ``cvt.rn.satfinite.e4m3x2.f32`` (sm_89+), two values per instruction, whose
    saturation to +-448 is the clamp (448 is e4m3's largest finite value, so clamping before or
    after the rounding is the same). Else min(|v|, 448) rounded on the bits: |v| >= 2^-6 to
    3 mantissa bits by the carry trick (the exponent moves up on a carry), below it to a multiple
    of 2^-9 (the subnormals) by adding and subtracting 1.5 * 2^14; the code of a subnormal is its
    multiple of 2^-9 (8: the first normal, 0x08). NaN: 0x7F with v's sign (torch's conversion)."""
    if HW:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
            "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }",
            "=r,r,r,r,r",
            [v],
            dtype=tl.uint8,
            is_pure=True,
            pack=4,
        )
    bits = v.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(v), 448.0)
    b = a.to(tl.int32, bitcast=True)
    rb = (b + 0x7FFFF + ((b >> 20) & 1)) & -1048576  # RNE to 3 mantissa bits (2^20 = 0x100000)
    normal = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)  # exponent bias 127 -> 7
    sub = (((a + 24576.0) - 24576.0) * 512.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(v != v, 0x7F, code) | ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def modulate16(x, mean, rstd, ms_ptrs, mh_ptrs, dtype: tl.constexpr, COMPILED: tl.constexpr):
    """act.modulate (``LayerNorm(x) * (1 + scale) + shift``, each op rounded to x's ``dtype``)
    with its two last roundings done as 16-bit operations on the GPU (``mul/add.rn.bf16x2``, or
    f16x2): the same bits, since a sum or product of two 16-bit values rounded once to 16 bits is
    that value rounded to fp32 first (fp32 has at least 2p + 2 bits: the double rounding is
    innocuous for + and *). The interpreter, and fp32 x, take act.modulate itself."""
    if COMPILED and dtype != tl.float32:
        xn = ((x - mean[:, None]) * rstd[:, None]).to(dtype)
        a = (1.0 + tl.load(ms_ptrs).to(tl.float32)).to(dtype)
        if dtype == tl.bfloat16:  # the product rounded on its own (Triton would fuse it with the add)
            p = tl.inline_asm_elementwise(
                "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [xn, a], dtype=xn.dtype, is_pure=True, pack=2
            )
        else:
            p = tl.inline_asm_elementwise(
                "mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [xn, a], dtype=xn.dtype, is_pure=True, pack=2
            )
        return (p + tl.load(mh_ptrs)).to(tl.float32)
    return modulate(x, mean, rstd, ms_ptrs, mh_ptrs, dtype, COMPILED)


@triton.jit
def quantize_act_fp8_kernel(
    x_ptr,  # [M, K]
    smooth_ptr,  # [K]
    rsmooth_ptr,  # f32 [K], RN(1 / smooth) (read only with COMPILED)
    down_ptr,  # [R, K]
    codes_ptr,  # u8 [M, K]: the e4m3 bytes
    ascale_ptr,  # f32 [M]
    lora_ptr,  # f32 [M, R]
    mscale_ptr,  # [B, K], x's dtype (read only with MODULATE)
    mshift_ptr,  # [B, K], x's dtype (read only with MODULATE)
    M,
    K,
    R,
    stride_xm,
    stride_dr,
    stride_cm,
    shift,
    rows_per_image,  # S = M / B (MODULATE)
    stride_mb,  # row stride of mod_scale and mod_shift
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K1: tl.constexpr,  # channels per step of pass 1 (divides K)
    BLOCK_K2: tl.constexpr,  # channels per step of pass 2 (divides K)
    STAGES2: tl.constexpr,  # pass 2's pipeline depth (cp.async stages)
    HAS_LORA: tl.constexpr,
    COMPILED: tl.constexpr,  # for a GPU: FMA division, bf16 MMA, inline PTX (not interpreted)
    FP8_CVT: tl.constexpr,  # the GPU's e4m3 conversion (sm_89+)
    DOWN_BF16: tl.constexpr,
    MODULATE: tl.constexpr,  # x <- LayerNorm(x) * (1 + scale) + shift, rounded like torch
    GELU: tl.constexpr,  # x <- gelu_tanh(x), rounded like torch
    HAS_SHIFT: tl.constexpr = True,  # shift != 0 (else pass 1 skips x + shift for bf16 x)
    ONE_CHUNK: tl.constexpr = False,  # R <= BLOCK_R: grid axis 1 is 1, no runtime branch on it
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Program (i, c) projects row block i onto ranks [c * BLOCK_R, (c + 1) * BLOCK_R); the
    # programs of chunk 0 also write the codes and the scales (quantize_act's split).
    chunk = tl.program_id(1)
    r0 = chunk * BLOCK_R
    row_ok = offs_m < M
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)  # int64: M * K passes 2^31 at ~139k tokens
    k1 = tl.arange(0, BLOCK_K1)
    rr = tl.arange(0, BLOCK_R)
    x_row = x_ptr + rows * stride_xm  # [BM]
    d_rows = tl.minimum(r0 + rr, tl.maximum(R - 1, 0)).to(tl.int64)  # rows past R repeat row R-1
    d_ptrs = down_ptr + d_rows[:, None] * stride_dr + k1[None, :]
    lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    amax_l = tl.zeros((BLOCK_M, BLOCK_K1), dtype=tl.float32)  # per lane; rows reduced after pass 1
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BF16_X: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if MODULATE:
        mean, rstd = _row_stats(x_row[:, None] + k1[None, :], K, eps, BLOCK_K1, COMPILED)  # [BM] each
        # (one row of mod_scale per block, broadcast as a [1, BK] tile where the rows of a block
        # share an image, compiled to more SASS per group on sm_90: shuffles into the layout)
        image = (rows // rows_per_image) * stride_mb  # [BM]
        ms_row = mscale_ptr + image
        mh_row = mshift_ptr + image
    # --- pass 1: amax and the low-rank product --------------------------------------------------
    x_ptrs = x_row[:, None] + k1[None, :]
    for i in range(0, K // BLOCK_K1):
        k0 = i * BLOCK_K1
        x = _widen(tl.load(x_ptrs), COMPILED)  # [BM, BLOCK_K1], contiguous rows
        if MODULATE:
            x = modulate16(x, mean, rstd, ms_row[:, None] + (k0 + k1)[None, :], mh_row[:, None] + (k0 + k1)[None, :],
                         DT, COMPILED)  # fmt: skip
        if GELU:
            x = _round_to(_gelu_tanh(x, COMPILED), DT, COMPILED)
        # -0 from skipping x + 0 reaches neither |x_hat| nor the low-rank sum (it starts at +0)
        h = smooth_divide(
            x, smooth_ptr + k0 + k1, rsmooth_ptr + k0 + k1, shift, HAS_SHIFT or not BF16_X, COMPILED
        )
        amax_l = _max_nan(amax_l, tl.abs(h))
        if HAS_LORA:
            lora = down_project(h, tl.load(d_ptrs), lora, DOWN_BF16, COMPILED)  # d: [BR, BLOCK_K1]
        x_ptrs += BLOCK_K1
        d_ptrs += BLOCK_K1
    if HAS_LORA:
        out = lora_ptr + offs_m.to(tl.int64)[:, None] * R + (r0 + rr)[None, :]
        tl.store(out, lora, mask=row_ok[:, None] & (r0 + rr < R)[None, :])
    # --- pass 2: the codes ------------------------------------------------------------------------
    if ONE_CHUNK or chunk == 0:
        amax = tl.reduce(amax_l, 1, _max_nan)  # [BM]; NaN propagates, as torch's amax
        inv = tl.where(amax > 0, tl.div_rn(_FP8_MAX, tl.where(amax > 0, amax, 1.0)), 0.0)
        k2 = tl.arange(0, BLOCK_K2)
        # Backwards over K: the tiles pass 1 read last are re-read first, while L2 still holds
        # them (at K = 12288 x is 107 MB, L2 50 MB: the row's end comes from L2, its start not).
        x_ptrs = x_row[:, None] + (K - BLOCK_K2 + k2)[None, :]
        c_ptrs = codes_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + (K - BLOCK_K2 + k2)[None, :]
        for i in tl.range(0, K // BLOCK_K2, num_stages=STAGES2):
            k0 = K - (i + 1) * BLOCK_K2
            x = _widen(tl.load(x_ptrs), COMPILED)
            if MODULATE:
                x = modulate16(x, mean, rstd, ms_row[:, None] + (k0 + k2)[None, :], mh_row[:, None] + (k0 + k2)[None, :],
                             DT, COMPILED)  # fmt: skip
            if GELU:
                x = _round_to(_gelu_tanh(x, COMPILED), DT, COMPILED)
            h = smooth_divide(x, smooth_ptr + k0 + k2, rsmooth_ptr + k0 + k2, shift, True, COMPILED)
            # the clamp to +-448: the conversion's saturation (HW), or its min(|v|, 448)
            tl.store(c_ptrs, e4m3_rne(h * inv[:, None], FP8_CVT), mask=row_ok[:, None])
            x_ptrs -= BLOCK_K2
            c_ptrs -= BLOCK_K2
        if COMPILED:
            # div_correct's residual is inf - inf = NaN where x_hat is +-inf (an infinite x, a
            # quotient past fp32's range, a zero smooth). Its other results are the IEEE
            # quotients, so only a row whose amax is NaN may be wrong (not its codes: inv is 0
            # for NaN and inf alike): then, rarely, one more pass takes its amax by IEEE division.
            block_max = tl.reduce(amax, 0, _max_nan)  # NaN if any row's amax is
            if block_max != block_max:
                xmax_l = tl.zeros((BLOCK_M, BLOCK_K2), dtype=tl.float32)
                for i in range(0, K // BLOCK_K2):
                    k0 = i * BLOCK_K2
                    x = _widen(tl.load(x_row[:, None] + (k0 + k2)[None, :]), COMPILED)
                    if MODULATE:
                        x = modulate16(x, mean, rstd, ms_row[:, None] + (k0 + k2)[None, :],
                                     mh_row[:, None] + (k0 + k2)[None, :], DT, COMPILED)  # fmt: skip
                    if GELU:
                        x = _round_to(_gelu_tanh(x, COMPILED), DT, COMPILED)
                    s = tl.load(smooth_ptr + k0 + k2)  # fp32 on the GPU (the launcher's)
                    xmax_l = _max_nan(xmax_l, tl.abs(tl.div_rn(x + shift, s[None, :])))
                amax = tl.where(amax != amax, tl.reduce(xmax_l, 1, _max_nan), amax)
        ascale = tl.div_rn(amax, _FP8_MAX)  # IEEE, as the reference's tensor division
        if COMPILED:
            _store_rows(ascale_ptr + offs_m, ascale, row_ok)
        else:
            tl.store(ascale_ptr + offs_m, ascale, mask=row_ok)


def quantize_act_fp8(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    mod_scale: torch.Tensor | None = None,
    mod_shift: torch.Tensor | None = None,
    *,
    shift: float,
    gelu: bool = False,
    config: ActFp8Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """engine.quant.ops.quantize_act_fp8 in one kernel: (codes float8_e4m3fn [M, K], ascale fp32
    [M], lora_act fp32 [M, R]). K must be a multiple of 64 (the W4A8 GEMM's weight groups).
    ``config``: a launch config other than the architecture's (the models' and tests' variants)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if k % GROUP:
        raise ValueError(f"x's K must be a multiple of {GROUP} for the triton FP8 quantizer, got {k}")
    if smooth.shape != (k,):
        raise ValueError(f"smooth must be [K] = [{k}], got shape {tuple(smooth.shape)}")
    if proj_down.dim() != 2 or proj_down.shape[1] != k:
        raise ValueError(f"proj_down must be [R, K] with K = {k}, got shape {tuple(proj_down.shape)}")
    if (mod_scale is None) != (mod_shift is None):
        raise ValueError("mod_scale and mod_shift come together (both or neither)")
    for name, t in (("mod_scale", mod_scale), ("mod_shift", mod_shift)):
        if t is not None and (t.dim() != 2 or t.shape[1] != k or t.shape != mod_scale.shape):
            raise ValueError(f"{name} must be [B, K] with K = {k}, as the other, got shape {tuple(t.shape)}")
    x = row_major(x)
    r = proj_down.shape[0]
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    ascale = torch.empty(m, dtype=torch.float32, device=x.device)
    lora_act = torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, ascale, lora_act
    major = _major(x.device)
    cfg = config or act_fp8_config(major)
    down = row_major(proj_down)
    smooth = smooth.contiguous()
    # RN(1 / smooth) by IEEE division on the host (K values); on the GPU smooth goes in fp32.
    if not INTERPRET:
        smooth = smooth.float()
    rsmooth = smooth if INTERPRET else 1.0 / smooth
    modulate = mod_scale is not None
    if modulate:
        if m % mod_scale.shape[0]:
            raise ValueError(f"mod_scale's {mod_scale.shape[0]} rows (images) must divide M = {m}")
        mod_scale, mod_shift = row_major(mod_scale), row_major(mod_shift)
        if mod_scale.stride(0) != mod_shift.stride(0):
            mod_scale, mod_shift = mod_scale.contiguous(), mod_shift.contiguous()
    chunk = block_r(r, LORA_CHUNK)
    quantize_act_fp8_kernel[(triton.cdiv(m, cfg.block_m), max(1, triton.cdiv(r, chunk)))](
        x,
        smooth,
        rsmooth,
        down,
        codes.view(torch.uint8),
        ascale,
        lora_act,
        mod_scale if modulate else x,
        mod_shift if modulate else x,
        m,
        k,
        r,
        x.stride(0),
        down.stride(0),
        codes.stride(0),
        shift,
        m // mod_scale.shape[0] if modulate else 1,
        mod_scale.stride(0) if modulate else 0,
        LAYER_NORM_EPS,
        BLOCK_M=cfg.block_m,
        BLOCK_R=chunk,
        BLOCK_K1=block_k(k, cfg.block_k1),
        BLOCK_K2=block_k(k, cfg.block_k2),
        STAGES2=cfg.stages2,
        HAS_LORA=r > 0,
        COMPILED=not INTERPRET,
        FP8_CVT=not INTERPRET and major >= 9,
        DOWN_BF16=down.dtype == torch.bfloat16,
        MODULATE=modulate,
        GELU=gelu,
        HAS_SHIFT=shift != 0.0,
        ONE_CHUNK=r <= chunk,
        **cfg.launch_options(),
    )
    return codes, ascale, lora_act
