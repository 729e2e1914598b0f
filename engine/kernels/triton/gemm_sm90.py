"""The W4A4 GEMM for Hopper (sm_90): FP8 tensor cores on exact 4-bit codes.

Why FP8 and not int8 on Hopper: an int8 wgmma accumulates int32 in place, and turning a
group's int32 into fp32 costs the loop either a reset per element and group, an I2F, or a
second (bias) MMA as large as the data (engine/kernels/triton/gemm.py). An FP8 (e4m3) wgmma
accumulates in fp32 and starts from zero for free (scale-d = 0), at the int8 rate. Every 4-bit
code is exact in e4m3, every product of two codes is exact, and a group's dot (|sum| < 2^13)
is exact in the fp32 accumulator, so the integer part matches the reference bit for bit (two
hardware facts, checked on the device once before the kernel serves it: ``serves``). Then a group costs the loop two
fp32 instructions per output element (``acc = (part * sa) * sw + acc``), which is exactly
what the tensor cores take for the group's 64 MACs: the loop is balanced at the dot's own work.

Operands, both straight into the tensor cores without a shared-memory round trip:

- weights (B): converted ONCE at load (``prepare_weight``, a load-time transform behind the
  kernel contract; the plain checkpoint layout stays the ground truth) to e4m3 codes, one byte
  per weight, each group's 32 even channels then its 32 odd ones. They stream through Triton's
  cp.async pipeline into shared memory, which the wgmma reads directly.
- activations (A): the contract's packed nibbles, expanded in registers with one LOP3 per four
  codes (two shift/mask for the high nibbles): the byte u (0..15) IS the e4m3 number u * 2^-9
  (the subnormals and the lowest normal binade are linear in the bits). Signed codes c are
  taken as u = c + 8 (XOR of bit 3); the offset's contribution, 8 * sum_g sa * sw * colsum(w),
  is one small GEMM over the groups (ascales [M, G] x wcorr [G, N], both as bf16 hi + lo
  halves, three bf16 MMAs per 16 groups) before the loop, like the low-rank branch. A is a
  register operand of the wgmma.

Per group and 64-row tile: two K = 32 FP8 wgmmas (Triton waits on each where it is issued, so
a CTA's MMA runs under the other resident CTA's scaling, not its own), the next group's scales
already in registers (loaded one group ahead), then the two fp32 instructions per element.
Modelled with its dependency chain in scripts/kernel_model_hopper.py (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import INTERPRET, LaunchConfig, dot_bf16, grouped_tile

logger = logging.getLogger(__name__)

# Fixed configs (no autotuning: see gemm.py). 128 x 64 tiles of one warpgroup (two m64n64 MMAs
# per K step): 64 fp32 accumulators and 64 partials per thread, two CTAs per SM (225 registers),
# so that one CTA's MMA runs under the other's scaling. The L2 binds these loops
# (scripts/kernel_model_hopper.py): a group moves BM * 32 bytes of codes and BN * 64 bytes of
# e4m3 weights per CTA, 8 KB here against 10 KB for 64 x 128 tiles (modelled 40% of the fp8
# peak against 34%); 256 x 64 with 8 warps or 128 x 128 with 8 warps model the same (one CTA
# per SM, the warpgroups in step). Issuing the next group's MMAs before this group's scaling
# (a second partial in registers) spills: Triton waits on each MMA where it is issued anyway.
SM90_CONFIGS: dict[str, LaunchConfig] = {
    "large": LaunchConfig(128, 64, 4, 4),
    "small": LaunchConfig(64, 64, 4, 4),
}
INTERPRETER_CONFIG = LaunchConfig(16, 16, 4, 1)
GROUP_M = 8  # CTAs along M that walk N together (L2 reuse of the weight tiles)
BLOCK_G = 16  # groups per step of the offset-correction GEMM (one bf16 MMA K step)
# The low-rank branch is one whole-rank tile here (chunking it as the int8 kernel does costs two
# extra MMA waits per group in the main loop, compiled with Triton 3.6). Compiled for sm_90 at the
# FLUX shapes: ranks up to 64 hold 222-225 registers, no spills; rank 96 spills (104 spill
# instructions), 224 spills 821 with 128 KB of shared memory. Wider branches (LoRAs) take the
# chunked int8 kernel (triton_backend.w4a4_gemm).
MAX_RANK = 64
A_UNIT = 2.0**-9  # e4m3 byte u is u * 2^-9: the dot comes out in these units
SIGNED_OFFSET = 8  # signed codes c enter the MMA as c + 8


def sm90_config(m: int) -> LaunchConfig:
    """The launch config for M tokens ("small" below 1025: more, smaller tiles)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    return SM90_CONFIGS["large" if m > 1024 else "small"]


@dataclass(frozen=True)
class Sm90Weight:
    """A W4A4 layer's weight in the Hopper kernel's layout (derived from the plain checkpoint
    tensors by ``prepare_weight``; never stored).

    w8      float8_e4m3fn [N, K]  the signed codes, per group the even channels then the odd
    wscales fp32 [G, N]           the group scales times 2^9 (A_UNIT undone, exact), contiguous
    wcorr   bf16 [2, G, N]        -8 * sum_k code[n, k] * wscale[n, g] over each group (the offset of
                                  signed activation codes, applied by one GEMM with ascales) as
                                  two bf16 halves, hi + lo (16 significant bits)
    """

    w8: torch.Tensor
    wscales: torch.Tensor
    wcorr: torch.Tensor


def prepare_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> Sm90Weight:
    """The load-time transform: plain packed codes [N, K/2] + scales [N, G] -> ``Sm90Weight``.

    One byte per weight (+0.5 B per weight over the packed form, which the module keeps)."""
    n, half_k = qweight.shape
    g = wscales.shape[1]
    group = 2 * half_k // g
    q = qweight.to(torch.int16)
    lo, hi = q & 0xF, q >> 4
    lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)  # signed codes -8..7
    lo, hi = lo.view(n, g, group // 2), hi.view(n, g, group // 2)  # even / odd channels per group
    codes = torch.cat([lo, hi], dim=2).reshape(n, 2 * half_k)
    w8 = codes.to(torch.float32).to(torch.float8_e4m3fn)  # exact: |code| <= 8
    ws = wscales.float()
    colsum = (lo.sum(dim=2) + hi.sum(dim=2)).float()  # [N, G] integers, |sum| <= 512
    wcorr = (-SIGNED_OFFSET * colsum * ws).t()  # [G, N] fp32
    wc_hi = wcorr.to(torch.bfloat16)
    wc_lo = (wcorr - wc_hi.float()).to(torch.bfloat16)
    return Sm90Weight(
        w8.contiguous(),
        (ws * (1.0 / A_UNIT)).t().contiguous(),
        torch.stack([wc_hi, wc_lo]).contiguous(),
    )


@triton.jit
def expand_codes(p, UNSIGNED: tl.constexpr, COMPILED: tl.constexpr):
    """Packed bytes -> (low, high) nibbles as e4m3 bytes u * 2^-9: the code itself when
    unsigned, code + 8 (bit 3 flipped) when signed. On the GPU four bytes per instruction."""
    if COMPILED:
        if UNSIGNED:
            lo, hi = tl.inline_asm_elementwise(
                "{ and.b32 $0, $2, 0x0F0F0F0F; shr.b32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }",
                "=r,=r,r",
                [p],
                dtype=(tl.uint8, tl.uint8),
                is_pure=True,
                pack=4,
            )
        else:  # lop3 0x6a: (a & b) ^ c
            lo, hi = tl.inline_asm_elementwise(
                "{ lop3.b32 $0, $2, 0x0F0F0F0F, 0x08080808, 0x6a; shr.b32 $1, $2, 4; "
                "lop3.b32 $1, $1, 0x0F0F0F0F, 0x08080808, 0x6a; }",
                "=r,=r,r",
                [p],
                dtype=(tl.uint8, tl.uint8),
                is_pure=True,
                pack=4,
            )
    else:
        if UNSIGNED:
            lo = p & 0xF
            hi = p >> 4
        else:
            lo = (p & 0xF) ^ 0x8
            hi = (p >> 4) ^ 0x8
    return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _dot_fp8(a, b, acc, COMPILED: tl.constexpr):
    """acc + a @ b for e4m3 a, b: the FP8 wgmma on the GPU; in the interpreter the same exact
    products summed in fp32 (every partial sum here is exact in fp32)."""
    if COMPILED:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def w4a4_gemm_sm90_kernel(
    qx_ptr,  # u8 [M, K/2], the contract's packed codes
    ascales_ptr,  # f32 [M, G] (any strides; group-major loads as vectors)
    w8_ptr,  # e4m3 [N, K] (prepare_weight)
    wscales_ptr,  # f32 [G, N] (prepare_weight: times 2^9)
    wcorr_ptr,  # bf16 [2, G, N] hi and lo halves (prepare_weight; read for signed activations)
    lora_ptr,  # f32 [M, R]
    up_ptr,  # [N, R]
    bias_ptr,  # [N]
    out_ptr,  # [M, N]
    M,
    N,
    K,
    R,
    stride_xm,
    stride_am,
    stride_ag,
    stride_lm,
    stride_un,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_M: tl.constexpr,
    UNSIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_M: tl.constexpr,  # M % BLOCK_M == 0: activation scales load without masks
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: weight scales load without masks
    COMPILED: tl.constexpr,  # for a GPU: inline-PTX expansion and FP8 MMAs (not interpreted)
):
    HALF: tl.constexpr = GROUP // 2
    G = K // GROUP
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Rows and columns past the edge re-read the last one (no masks on the tiles); int64 offsets.
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    j = tl.arange(0, HALF)
    x_ptrs = qx_ptr + rows[:, None] * stride_xm + j[None, :]
    w_ptrs = w8_ptr + cols[:, None] * K + j[None, :]
    sa_ptrs = ascales_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am + tl.arange(0, BLOCK_M) * stride_am
    sw_ptrs = wscales_ptr + offs_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Before the loop (their operands dead by then): the low-rank product (fp32 in, tf32x3), and
    # for signed activations the offset correction sum_g ascales[m, g] * wcorr[g, n]: both
    # factors split into bf16 hi + lo, three bf16 MMAs (hi*hi + hi*lo + lo*hi, ~2^-16 relative)
    # with B straight from memory (its halves come from prepare_weight).
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr[None, :] < R
        la = tl.load(lora_ptr + rows[:, None] * stride_lm + rr[None, :], mask=r_ok, other=0.0)
        up = tl.load(up_ptr + cols[:, None] * stride_un + rr[None, :], mask=r_ok, other=0.0)
        acc = tl.dot(la, tl.trans(up.to(tl.float32)), acc, input_precision="tf32x3")
    if not UNSIGNED:
        gg = tl.arange(0, BLOCK_G)
        for g0 in range(0, G, BLOCK_G):
            g_ok = (g0 + gg) < G
            sa_ok = m_ok[:, None] & g_ok[None, :]  # rows past M: no read (group-major: the next group's)
            sa_t = tl.load(sa_ptrs[:, None] + (g0 + gg)[None, :] * stride_ag, mask=sa_ok, other=0.0)
            wc_ptrs = wcorr_ptr + (g0 + gg)[:, None] * N + offs_n[None, :]
            wc_ok = g_ok[:, None] & n_ok[None, :]
            wc_hi = tl.load(wc_ptrs, mask=wc_ok, other=0.0)  # [BG, BN] bf16
            wc_lo = tl.load(wc_ptrs + G * N, mask=wc_ok, other=0.0)
            sa_hi = sa_t.to(tl.bfloat16)
            sa_lo = (sa_t - sa_hi.to(tl.float32)).to(tl.bfloat16)
            acc = dot_bf16(sa_hi, wc_hi, acc, COMPILED)
            acc = dot_bf16(sa_hi, wc_lo, acc, COMPILED)
            acc = dot_bf16(sa_lo, wc_hi, acc, COMPILED)

    # The first group's scales; each iteration loads the next group's (the last one re-reads).
    sa = tl.load(sa_ptrs) if EVEN_M else tl.load(sa_ptrs, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptrs) if EVEN_N else tl.load(sw_ptrs, mask=n_ok, other=0.0)
    for g in range(0, G):
        px = tl.load(x_ptrs)  # [BM, HALF] u8, two codes per byte
        b_lo = tl.load(w_ptrs)  # [BN, HALF] e4m3, the group's even channels
        b_hi = tl.load(w_ptrs + HALF)  # [BN, HALF] e4m3, its odd channels
        nxt = tl.minimum(g + 1, G - 1)
        sa_next = tl.load(sa_ptrs + nxt * stride_ag, mask=m_ok | EVEN_M, other=0.0)
        sw_next = tl.load(sw_ptrs + nxt * N, mask=n_ok | EVEN_N, other=0.0)
        a_lo, a_hi = expand_codes(px, UNSIGNED, COMPILED)
        part = _dot_fp8(a_lo, tl.trans(b_lo), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), COMPILED)
        part = _dot_fp8(a_hi, tl.trans(b_hi), part, COMPILED)
        acc = tl.fma(part * sa[:, None], sw[None, :], acc)
        sa = sa_next
        sw = sw_next
        x_ptrs += HALF
        w_ptrs += GROUP

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_rows = offs_m.to(tl.int64)
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(
        out_ptr + out_rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


def launch(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    weight: Sm90Weight,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    unsigned: bool,
    out_dtype: torch.dtype,
    config: LaunchConfig | None = None,
    kernel=None,
) -> torch.Tensor:
    """Launch the kernel on contract tensors (qx row-major, ascales fp32 any strides, lora_act
    and proj_up row-major) and a prepared weight; ``kernel`` lets the static model capture the
    launch."""
    m = qx.shape[0]
    n, k = weight.w8.shape
    r = lora_act.shape[1]
    group = k // ascales.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0:
        return out
    cfg = config or sm90_config(m)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    (kernel or w4a4_gemm_sm90_kernel)[grid](
        qx,
        ascales,
        weight.w8,
        weight.wscales,
        weight.wcorr,
        lora_act,
        proj_up,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        r,
        qx.stride(0),
        ascales.stride(0),
        ascales.stride(1),
        lora_act.stride(0),
        proj_up.stride(0),
        out.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_G=BLOCK_G,
        GROUP=group,
        GROUP_M=GROUP_M,
        UNSIGNED=unsigned,
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        EVEN_M=m % cfg.block_m == 0,
        EVEN_N=n % cfg.block_n == 0,
        COMPILED=not INTERPRET,
        **cfg.launch_options(),
    )
    return out


def extreme_codes_exact(device: torch.device, group: int = 64) -> bool:
    """Whether the kernel's integer part is exact on ``device``, with every group's dot at its
    most negative and most positive and every code once, for signed and unsigned activations
    (scales 1, compared with the exact integer product). On a GPU this tests the two hardware
    facts the kernel relies on: e4m3 subnormals in the tensor cores and FP8 accumulation
    exact for sums below 2^13."""
    from engine.quant import pack_int4

    ok = True
    for unsigned in (False, True):
        lo, hi = (0, 15) if unsigned else (-8, 7)
        m, n, k = 64, 64, 4 * group
        x = torch.full((m, k), hi, dtype=torch.int8)
        x[m // 2 :] = lo
        x[:, :group] = lo
        x[:, 2 * group : 3 * group] = (torch.arange(group) % (hi - lo + 1) + lo).to(torch.int8)
        w = torch.full((n, k), -8, dtype=torch.int8)
        w[n // 2 :] = 7
        w[:, 3 * group :] = (torch.arange(n * group).view(n, group) % 16 - 8).to(torch.int8)
        weight = prepare_weight(pack_int4(w).to(device), torch.ones(n, k // group, device=device))
        y = launch(
            pack_int4(x).to(device),
            torch.ones(m, k // group, device=device),
            weight,
            torch.zeros(m, 0, device=device),
            torch.zeros(n, 0, device=device),
            None,
            unsigned=unsigned,
            out_dtype=torch.float32,
        )
        ok &= torch.equal(y.cpu().double(), x.double() @ w.double().T)
    return ok


@functools.cache
def _exact_on(device: torch.device) -> bool:
    ok = extreme_codes_exact(device)
    if not ok:
        logger.warning(
            "w4a4_gemm on %s: the FP8 kernel's integer sums are not exact on this GPU; "
            "using the int8 kernel (engine/kernels/triton/gemm.py) instead",
            device,
        )
    return ok


def serves(device: torch.device) -> bool:
    """Whether the FP8 kernel serves ``device``: checked once per device (extreme_codes_exact,
    a few small launches at the first call, i.e. setup's warm-up); a failure is logged."""
    return _exact_on(device)


def passes_self_check(
    check: Callable[[], bool], op: str, device: torch.device, what: str, against: str, instead: str
) -> bool:
    """A Gluon kernel's first-call device check (gemm_sm90_ws, gemm_sm90_w4a8): ``check()`` true,
    or a warning naming what serves ``op`` instead; any exception counts as a failure (a first
    GPU run of a kernel no GPU has run before must fall back, not stop setup)."""
    try:
        ok = check()
    except Exception as exc:
        logger.warning("%s on %s: the %s failed its self-check (%s: %s); %s",
                       op, device, what, type(exc).__name__, exc, instead)  # fmt: skip
        return False
    if not ok:
        logger.warning("%s on %s: the %s's results differ from %s; %s", op, device, what, against, instead)
    return ok
