"""The W4A4 GEMM on int8 tensor cores: one K = group_size dot per group, scales in fp32.

Per group of 64 channels a CTA loads its [BLOCK_M, 32] and [BLOCK_N, 32] packed bytes,
unpacks them with 32-bit shift/mask (four bytes per instruction, codes kept exact: signed
codes become 16 * code), orders the nibbles of each 4 bytes as lo0..lo3 hi0..hi3 on both
operands (a channel permutation the dot does not see, and no byte shuffles) and takes ONE int8
dot with K = 64 (one wgmma wait on Hopper). The MMA accumulates onto the bits of 1.5 * 2^23,
so its int32 result read as fp32 is 1.5 * 2^23 + sum exactly (no I2F); one FMA removes that
bias and applies the activation scale (rounded to 22 bits, which makes the bias product exact;
the factor 1/16 per signed operand folded in), one more FMA applies the weight scale into the
fp32 accumulator. Scales are read through their strides: group-major ones load as vectors.

Hopper (``BIAS_MMA``): wgmma accumulates in place, so the reset of the accumulator to the magic
bits each group is one more instruction per output element (64 per thread per group, a fifth of
the loop). There the group's first MMA runs with its accumulator off (scale-d = 0, free) on
constant -128 tiles, which leaves B = K_BIAS * 2^14 in every element; the data MMA adds the dot.
B + dot stays in [0, 2^24), whose int32 bits read as fp32 are exactly (B + dot) * 2^-149, so one
FMA with the activation scale taken times 2^80 removes the bias and scales (common.
scale_lowest_binade); the fp32 accumulator then holds the result times 2^-69, undone by one
multiply after the loop (exact: powers of two). The bias MMA adds K_BIAS channels of MMA work
per group (as many as the data for signed activations, half for unsigned ones) on tensor cores
that the scaling leaves idle most of the time.
"""

from __future__ import annotations

from dataclasses import replace

import triton
import triton.language as tl

from engine.kernels.triton.common import (
    BIAS_MMA_UNIT,
    INTERPRET,
    SUB_IN_EXP,
    SUB_OUT_EXP,
    LaunchConfig,
    grouped_tile,
    round_to,
    round_to_22_bits,
    scale_biased,
    scale_lowest_binade,
    unpack_nibbles,
)

# Fixed per-architecture configs (no autotuning: a benchmark inside CUDA-graph capture would
# synchronize). Every entry is compiled for its architecture in CI and must not spill.
# Hopper: 64 x 128 tiles of one warpgroup, the bias-MMA conversion (no accumulator resets: 261
# SASS per group, 320 with them), 190 registers: two CTAs per SM, so that one CTA's MMA runs
# under the other's scaling (wgmma accumulates in place: each warpgroup waits on its own). A cap
# of 168 registers (three CTAs) spills. 128 x 128 tiles with 8 warps count fewer SASS per group
# per thread (240) but hold one CTA per SM, whose MMA and scaling then take turns. 2 stages
# count 249 but prefetch one group only.
# Ampere: 128 x 64 tiles, two CTAs per SM. "small" (M <= 1024): more, smaller tiles.
GEMM_CONFIGS: dict[int, dict[str, LaunchConfig]] = {
    9: {
        "large": LaunchConfig(64, 128, 4, 4, bias_mma=True),
        "small": LaunchConfig(64, 64, 4, 4, bias_mma=True),
    },
    8: {"large": LaunchConfig(128, 64, 4, 3), "small": LaunchConfig(64, 64, 4, 3)},
}
INTERPRETER_CONFIG = LaunchConfig(16, 16, 4, 1)  # tests also run it with bias_mma=True
GROUP_M = 8  # CTAs along M that walk N together (L2 reuse of the weight tiles)
# Ranks of the low-rank branch per step (common.block_r). 16, not 32: on sm_86 the 128 x 64
# tiles hold 244 registers at rank 32 in one step, and a loop of 32-rank steps spills (37
# STL/LDL); 16-rank steps compile to 254 registers, no spills, two CTAs per SM.
LORA_CHUNK = 16


def gemm_config(major: int, m: int, group: int = 64) -> LaunchConfig:
    """The launch config for an architecture (compute-capability major), token count and group
    size. The bias MMA doubles the tensor work of a signed group: at 64 channels the Hopper loop
    is issue-bound without it and balanced with it (261 SASS per group against 256 tensor clocks);
    at 128 and up the magic-bits conversion, one reset per 128 channels, is the cheaper one."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    cfg = GEMM_CONFIGS[9 if major >= 9 else 8]["large" if m > 1024 else "small"]
    return replace(cfg, bias_mma=False) if group > 64 else cfg


def partial_first(cfg: LaunchConfig) -> bool:
    """Where a GEMM adds y's partial (the contract's ``partial``): as the accumulator's start on
    Ampere's 128 x 64 tiles, whose registers are full at the epilogue (after the loop it spilled
    10 instructions on sm_86), after the loop elsewhere (first, it took registers from the loop:
    sm_86's 64 x 64 tile rematerialized 7 address instructions per group, sm_90's spilled).
    tests/test_triton_static.py compiles both ways' choice for every config."""
    return not cfg.bias_mma and cfg.block_m * cfg.block_n >= 128 * 64


def gate_rows2(cfg: LaunchConfig) -> bool:
    """Whether the gate epilogue reads two gate rows per tile (a select per element) rather than
    a [BM, BN] gather: on the configs whose registers are full at the epilogue (the gather spilled
    sm_90's 64 x 128 tile 2 instructions and sm_80's 128 x 64 tile 9); on Ampere's 64 x 64 tiles
    the gather compiles to the shorter loop (204 SASS per group, 208 with the select)."""
    return cfg.bias_mma or cfg.block_m * cfg.block_n >= 128 * 64


def bias_mma_channels(group: int, unsigned: bool) -> int:
    """Channels of the bias MMA: its bias B = channels * 2^14 (-128 x -128 per channel) must
    cover the most negative dot and keep B + dot below 2^24. Signed activations (x16, like the
    weights): dot >= -group * 128 * 112, so all ``group`` channels (B = group * 2^14, the largest
    B + dot is group * 2^15 <= 2^23 for groups up to 256); unsigned ones (codes 0..15):
    dot >= -group * 15 * 128, half of them. At least 32, one int8 MMA step."""
    return max(32, group // 2 if unsigned else group)


@triton.jit
def interleave4(lo, hi, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """[ROWS, GROUP/2] low and high nibbles -> [ROWS, GROUP] operand whose K order, per 4 bytes
    b0..b3, is lo0 lo1 lo2 lo3 hi0 hi1 hi2 hi3: a permutation of the channels (a dot product does
    not care, as long as both operands share it) that keeps each unpacked 32-bit word whole."""
    lo4 = tl.reshape(lo, (ROWS, GROUP // 8, 4))
    hi4 = tl.reshape(hi, (ROWS, GROUP // 8, 4))
    both = tl.permute(tl.join(lo4, hi4), (0, 1, 3, 2))  # [ROWS, GROUP/8, 2, 4]
    return tl.reshape(both, (ROWS, GROUP))


@triton.jit
def _load_partial(partial_ptr, pid_m, offs_m, cols, M, stride_om, BLOCK_M: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile of y's partial in fp32: out's strides, a 64-bit base per CTA
    plus int32 offsets in the tile, rows and columns clamped like the codes' (no mask: rows past
    the edge are never stored)."""
    base = partial_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_om
    offs = (tl.minimum(offs_m, M - 1) - pid_m * BLOCK_M)[:, None] * stride_om + cols.to(tl.int32)[None, :]
    return tl.load(base + offs).to(tl.float32)


@triton.jit
def w4a4_gemm_kernel(
    qx_ptr,  # u8 [M, K/2]
    ascales_ptr,  # f32 [M, G] (any strides)
    qw_ptr,  # u8 [N, K/2]
    wscales_ptr,  # [N, G] (any strides)
    lora_ptr,  # f32 [M, R]
    up_ptr,  # [N, R]
    bias_ptr,  # [N]
    out_ptr,  # [M, N]
    partial_ptr,  # [M, N] out dtype, out's strides (HAS_PARTIAL)
    res_ptr,  # [M, N] out dtype, out's strides (GATED)
    gate_ptr,  # [B, N] out dtype (GATED)
    M,
    N,
    K,
    R,
    stride_xm,
    stride_wn,
    stride_am,
    stride_ag,
    stride_sn,
    stride_sg,
    stride_lm,
    stride_un,
    stride_om,
    stride_gb,
    rows_per_gate,  # M / B: row r takes gate row r // rows_per_gate
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_M: tl.constexpr,
    UNSIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_MN: tl.constexpr,  # M % BLOCK_M == N % BLOCK_N == 0: scale loads without masks
    COMPILED: tl.constexpr,  # for a GPU: inline-PTX unpacking (not interpreted)
    BIAS_MMA: tl.constexpr = False,  # Hopper: bias MMA + lowest-binade conversion (module docstring)
    K_BIAS: tl.constexpr = 32,  # the bias MMA's channels (bias_mma_channels)
    GATED: tl.constexpr = False,  # out = residual + gate * y (contract: w4a4_gemm), after the loop
    HAS_PARTIAL: tl.constexpr = False,  # y += partial (another part of a split-input linear)
    GATE_ROWS2: tl.constexpr = False,  # GATED with rows_per_gate >= BLOCK_M: two gate rows per tile
    PARTIAL_FIRST: tl.constexpr = False,  # HAS_PARTIAL: the partial starts the accumulator (partial_first)
):
    HALF: tl.constexpr = GROUP // 2
    MAGIC: tl.constexpr = 0x4B400000  # the bits of 1.5 * 2^23 (common.I2F_MAGIC_BITS)
    # 1/16 per signed operand (weights always, activations unless unsigned), exact.
    INV: tl.constexpr = 1.0 / 16.0 if UNSIGNED else 1.0 / 256.0
    SCALE_IN: tl.constexpr = INV * 2.0**SUB_IN_EXP
    NEG_BIAS_IN: tl.constexpr = -INV * K_BIAS * BIAS_MMA_UNIT * 2.0 ** (SUB_IN_EXP - 149)
    BIAS_VALUE: tl.constexpr = K_BIAS * BIAS_MMA_UNIT * 2.0**-149
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the edge re-read the last row (no masks in the loop); int64 offsets (M * K/2
    # passes 2^31 at about 139k tokens for K = 15360).
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    j = tl.arange(0, HALF)
    x_ptrs = qx_ptr + rows[:, None] * stride_xm + j[None, :]
    w_ptrs = qw_ptr + cols[:, None] * stride_wn + j[None, :]
    # Scales: a scalar 64-bit base per CTA plus small int32 offsets (few registers), masked
    # rather than clamped so that contiguous (group-major) scales load as vectors.
    m_ok = offs_m < M
    n_ok = offs_n < N
    sa_base = ascales_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am
    sw_base = wscales_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_sn
    sa_offs = tl.arange(0, BLOCK_M) * stride_am
    sw_offs = tl.arange(0, BLOCK_N) * stride_sn

    if HAS_PARTIAL and PARTIAL_FIRST:
        # y's partial starts the accumulator (an fp32 sum order of its own, as the contract allows):
        # added after the loop, its tile spilled the sm_86 128 x 64 config (10 STL/LDL)
        acc = _load_partial(partial_ptr, pid_m, offs_m, cols, M, stride_om, BLOCK_M)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The low-rank product first, so that its operands are dead before the main loop (taken
    # last, their registers pushed the Ampere configs into spilling). BLOCK_R ranks at a time
    # (at most LORA_CHUNK, not software-pipelined): registers and shared memory do not grow
    # with the rank (the base 32 plus LoRAs), so every rank compiles to the same kernel.
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        la_ptrs = lora_ptr + rows[:, None] * stride_lm + rr[None, :]
        up_ptrs = up_ptr + cols[:, None] * stride_un + rr[None, :]
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            r_ok = rr[None, :] < R - r0
            la = tl.load(la_ptrs + r0, mask=r_ok, other=0.0)
            up = tl.load(up_ptrs + r0, mask=r_ok, other=0.0).to(tl.float32)
            if BIAS_MMA:  # the main loop accumulates in units of 2^-69 (exact: a power of two)
                up = up * 2.0**-SUB_OUT_EXP
            # fp32 in, three TF32 MMAs (hi*hi + hi*lo + lo*hi): fp32-class accuracy on tensor cores.
            acc = tl.dot(la, tl.trans(up), acc, input_precision="tf32x3")
    # The bias MMA's constant operands: -128 x -128 = 2^14 per channel of K_BIAS. bias_x comes
    # from a load that never reads (K >= 0), XORed with 0x80: Triton then stages the tile in
    # shared memory once, where a literal splat was rematerialized into 8 registers every group
    # (counted on sm_90: 261 SASS per group against 267). Not ``other=0x80``: Triton 3.6
    # materializes a masked load's 8-bit ``other`` of 0x80 as the sign-extended word (PTX
    # ``mov.u32 %r, 0xffffffffffffff80``), bytes (-128, -1, -1, -1): a wrong bias on every
    # group (tests/test_triton_static.py reads the compiled PTX and SASS for it).
    kb = tl.arange(0, K_BIAS)
    never = K < 0
    zero_x = tl.load(qx_ptr + kb[None, :] + 0 * rows[:, None], mask=never, other=0)  # [BM, K_BIAS]
    bias_x = (zero_x ^ 0x80).to(tl.int8, bitcast=True)
    bias_w = tl.full((BLOCK_N, K_BIAS), -128, tl.int8)
    for g in range(0, K // GROUP):
        px = tl.load(x_ptrs)  # [BM, HALF] u8
        pw = tl.load(w_ptrs)  # [BN, HALF] u8
        if EVEN_MN:
            sa = tl.load(sa_base + g * stride_ag + sa_offs)
            sw = tl.load(sw_base + g * stride_sg + sw_offs)
        else:
            sa = tl.load(sa_base + g * stride_ag + sa_offs, mask=m_ok, other=0.0)
            sw = tl.load(sw_base + g * stride_sg + sw_offs, mask=n_ok, other=0.0)
        sw = sw.to(tl.float32)  # [BN]
        x_lo, x_hi = unpack_nibbles(px, not UNSIGNED, COMPILED)
        w_lo, w_hi = unpack_nibbles(pw, True, COMPILED)
        xa = interleave4(x_lo, x_hi, BLOCK_M, GROUP)
        wa = interleave4(w_lo, w_hi, BLOCK_N, GROUP)
        if BIAS_MMA:
            # B + dot: the bias MMA with the accumulator off, then the data MMA on top of it.
            biased = tl.dot(bias_x, tl.trans(bias_w), out_dtype=tl.int32)
            biased = tl.dot(xa, tl.trans(wa), biased, out_dtype=tl.int32)
            s = sa * SCALE_IN  # sa * INV * 2^80, exact
            neg_bias_s = sa * NEG_BIAS_IN  # -B * 2^-149 * s, exact
            part = scale_lowest_binade(biased, s[:, None], neg_bias_s[:, None], BIAS_VALUE, COMPILED)
        else:
            sa = round_to_22_bits(sa * INV)  # [BM]
            neg_bias_sa = -12582912.0 * sa  # exact
            # The MMA accumulates onto the bits of 1.5 * 2^23: its int32 result, read as fp32, is
            # 1.5 * 2^23 + dot exactly; one FMA removes the bias and applies sa, one more sw.
            biased = tl.dot(
                xa, tl.trans(wa), tl.full((BLOCK_M, BLOCK_N), MAGIC, tl.int32), out_dtype=tl.int32
            )
            part = scale_biased(biased, sa[:, None], neg_bias_sa[:, None], COMPILED)  # [BM, BN]
        acc = tl.fma(part, sw[None, :], acc)
        x_ptrs += HALF
        w_ptrs += HALF

    if BIAS_MMA:
        acc = acc * 2.0**SUB_OUT_EXP
    if HAS_PARTIAL and not PARTIAL_FIRST:  # after the loop (first, it adds to the loop's registers)
        acc += _load_partial(partial_ptr, pid_m, offs_m, cols, M, stride_om, BLOCK_M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_rows = offs_m.to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if GATED:
        # diffusers' eager roundings: y, gate * y and the sum each rounded to the output dtype
        # (no-ops for fp32, where the product and the sum may contract into one FMA)
        out_ty = out_ptr.dtype.element_ty
        img = tl.minimum(offs_m, M - 1) // rows_per_gate  # [BM] image of each row (int32 division)
        if GATE_ROWS2:
            # rows_per_gate >= BLOCK_M: the tile's rows span at most two images; two gate rows of
            # [BN] and a select per element (few registers) instead of a [BM, BN] gather, where
            # the config's registers are full (gate_rows2)
            img0 = (pid_m * BLOCK_M) // rows_per_gate
            g0 = tl.load(gate_ptr + img0.to(tl.int64) * stride_gb + cols).to(tl.float32)
            img1 = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, M - 1) // rows_per_gate
            g1 = tl.load(gate_ptr + img1.to(tl.int64) * stride_gb + cols).to(tl.float32)
            gate = tl.where((img == img0)[:, None], g0[None, :], g1[None, :])
        else:
            gate = tl.load(gate_ptr + img.to(tl.int64)[:, None] * stride_gb + cols[None, :]).to(tl.float32)
        res = tl.load(res_ptr + out_rows[:, None] * stride_om + offs_n[None, :], mask=mask, other=0.0)
        prod = round_to(gate * round_to(acc, out_ty, COMPILED), out_ty, COMPILED)
        acc = res.to(tl.float32) + prod
        if not COMPILED:  # the interpreter's store truncates to bf16: round here, half to even
            acc = round_to(acc, out_ty, COMPILED)
    tl.store(
        out_ptr + out_rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


def grid_size(m: int, n: int, cfg: LaunchConfig) -> int:
    """Number of CTAs (one per output tile, in grouped order)."""
    return triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
