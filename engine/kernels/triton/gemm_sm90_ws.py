"""The W4A4 GEMM for Hopper (sm_90), warp-specialized and fed by TMA, written in Gluon.

Same numerics as engine/kernels/triton/gemm_sm90.py (FP8 e4m3 tensor cores on the exact 4-bit
codes: weights expanded once to e4m3 bytes by ``gemm_sm90.prepare_weight``, activation nibbles
expanded in registers as e4m3 bytes u * 2^-9), a different schedule. Why: compiled by Triton's
own pipeliner that kernel's loop is one serial chain per CTA (each MMA waited on where it is
issued, cp.async waits and CTA barriers per group); here the roles are split so that nothing in
the main loop waits on the whole CTA:

- one producer warp (``_producer``) issues, per 64-channel group, five TMA loads: the packed
  activation tile [BM, 32] u8, the group's two e4m3 weight tiles [BN, 32] (even and odd
  channels), the activation scales [BM] (a row of the group-major ascales) and the weight
  scales [BN] (for signed activations interleaved with the offset terms, [2 BN]; both laid out
  so that a thread's columns are one 16-byte load), into a STAGES-deep ring of shared-memory
  slots, each guarded by a ``ready`` mbarrier (armed with the slot's byte count, completed by
  the TMA unit) and an ``empty`` one (released by the consumers);
- two consumer warpgroups, each its own partition (64 rows; the barrier Triton puts around an
  mbarrier arrive then spans one warpgroup, and the two run out of step), wait on ``ready``,
  expand the activation codes in registers, issue two K = 32 FP8 wgmmas with the weight tiles
  straight from shared memory into a partial (accumulate off: no reset), read the group's scales
  from the slot while the MMAs run, wait for the MMAs (``warpgroup_mma_wait(0)``), release the
  slot (one arrive per warpgroup), and scale the partial into the fp32 accumulator with two FMAs
  per element: ``acc += sa * (part * sw + wc)``, where wc = -8 * colsum * sw is the offset of
  signed codes (taken as c + 8), folded into the FMA that applies sw (the Triton kernel runs a
  separate correction GEMM before its loop). One warpgroup's scaling runs under the other's MMAs.

Not built: the same warpgroup's scaling under its own next MMA (two partials and
``warpgroup_mma_wait(1)``). Written in Gluon it compiles, but at 128 columns per warpgroup the
three 64-register sets do not fit the 232 registers a consumer gets, and ptxas serializes every
wgmma (its C7512 "insufficient register resources"); at 64 columns it fits, but a 128 x 64 tile
per SM is bound by the L2 (perfmodel.hopper_ws).

The low-rank branch (lora_act [M, R] fp32 x proj_up [N, R]) is three bf16 wgmmas (both factors
split into bf16 hi + lo: hi*hi + lo*hi + hi*lo, ~2^-16 relative, as the Triton kernel's offset
correction) into the accumulator before the main loop, while the producer fills the ring. Bias
and store after it.

Split-K of the last partial wave (``split``, planned by gemm_sm90_ws_split.plan_split): the
grid's first ``FULL`` CTAs are whole tiles as above; each tile after them runs as ``SLICES`` CTAs
over consecutive ranges of groups, slice 0 with the low-rank branch, and stores its fp32 partial
tile to a workspace; gemm_sm90_ws_split.sum_slices then adds the slices in order, the bias, and
writes the output (a second launch on the same stream: deterministic).

Launch requirements (``supports``): M % 4 == 0 (the group-major ascales rows are TMA rows,
16-byte aligned), K % 64 == 0, N % 16 == 0 (the scale layouts), group 64, rank <= MAX_RANK. Modelled in
scripts/perfmodel/hopper_ws.py; compiled, gated and executed (through the PTX interpreter's
sm_90 instructions) in tests/test_hopper_ws*.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from engine.kernels.triton import gemm_sm90
from engine.kernels.triton.gemm_sm90 import A_UNIT, SIGNED_OFFSET, Sm90Weight
from engine.kernels.triton.gemm_sm90_ws_split import Split, plan_split, sum_slices, workspace_shape

GROUP = gl.constexpr(64)  # channels per scale group (the kernels read it; ``.value`` is the int)
MAX_RANK = 64
MIN_M = 1025  # below, the FP8 kernel's small tiles fill the chip better (and nothing is modelled here)


@dataclass(frozen=True)
class WsConfig:
    """Tile sizes (BM rows over two consumer warpgroups), ring depth, and the overlap scheme."""

    block_m: int = 128
    block_n: int = 128
    stages: int = 4

    num_warps = 4  # the first consumer warpgroup (the default partition); +4 +1 in the workers

    def __post_init__(self):
        if self.block_m != 128:
            raise ValueError(f"block_m must be 128 (two consumer warpgroups of 64 rows), got {self.block_m}")


CONFIG = WsConfig()


@dataclass(frozen=True)
class WsWeight:
    """The e4m3 weight of ``gemm_sm90.prepare_weight`` plus this kernel's scale layout.

    w8      float8_e4m3fn [N, K]     per group the 32 even channels then the 32 odd
    wscales fp32 [G, N / 16, 4, 2, 2] the group scales times 2^9, column 16 jj + 8 j2 + 2 q + c at
                                     [g, jj, q, j2, c] (read for unsigned activations: a thread's
                                     four columns of each 16 in one 16-byte load)
    swc     fp32 [G, N / 2, 2, 2]    per group and column pair (2p, 2p + 1): the two scales (times
                                     2^9), then the two offset terms -8 * sum_k code[n, k] *
                                     wscale[n, g] (read for signed activations: one 16-byte load
                                     gives a thread both columns' scale and offset)
    """

    w8: torch.Tensor
    wscales: torch.Tensor
    swc: torch.Tensor

    @property
    def wcorr(self) -> torch.Tensor:
        """The offset terms as [G, N]."""
        g, half = self.swc.shape[:2]
        return self.swc[:, :, 1].reshape(g, 2 * half)


def prepare_weight(base: Sm90Weight) -> WsWeight:
    """This kernel's weight from the FP8 kernel's (shares w8; the scales rearranged; the offset
    terms in fp32, exact products of an integer <= 4096 and a scale, rounded once)."""
    n, k = base.w8.shape
    g = k // GROUP.value
    colsum = torch.cat(  # integers, exact; 4096 rows at a time (no [N, K] fp32 copy)
        [rows.view(-1, g, GROUP.value).float().sum(dim=2) for rows in base.w8.split(4096)]
    )
    ws = base.wscales.t() * A_UNIT  # [N, G] the plain scales (2^9 undone, exact)
    wcorr = (-SIGNED_OFFSET * colsum * ws).t()  # [G, N]
    swc = torch.stack([base.wscales.view(g, n // 2, 2), wcorr.reshape(g, n // 2, 2)], dim=2)
    sw4 = base.wscales.view(g, n // 16, 2, 4, 2).transpose(2, 3)
    return WsWeight(base.w8, sw4.contiguous(), swc.contiguous())


def supports(m: int, n: int, k: int, r: int, group: int) -> bool:
    """Whether a problem meets the TMA alignment and tile rules of this kernel."""
    return m % 4 == 0 and n % 16 == 0 and k % GROUP.value == 0 and group == GROUP.value and r <= MAX_RANK


def serves_problem(ascales: torch.Tensor, n: int, k: int, r: int) -> bool:
    """Whether the dispatch sends this problem here (group-major fp32 ascales, as quantize_act
    returns them, M large enough for 128 x 128 tiles, the TMA rules)."""
    m, g = ascales.shape
    return (
        m >= MIN_M
        and ascales.dtype == torch.float32
        and ascales.stride() == (1, m)
        and supports(m, n, k, r, k // g if g else 0)
    )


@gluon.jit
def _expand(p, UNSIGNED: gl.constexpr):
    """Packed bytes -> (even, odd) channels as e4m3 bytes u * 2^-9 (u = code, or code + 8 for
    signed codes: bit 3 flipped), four bytes per instruction."""
    if UNSIGNED:
        lo, hi = gl.inline_asm_elementwise(
            "{ and.b32 $0, $2, 0x0F0F0F0F; shr.b32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }",
            "=r,=r,r",
            [p],
            dtype=(gl.uint8, gl.uint8),
            is_pure=True,
            pack=4,
        )
    else:  # lop3 0x6a: (a & b) ^ c
        lo, hi = gl.inline_asm_elementwise(
            "{ lop3.b32 $0, $2, 0x0F0F0F0F, 0x08080808, 0x6a; shr.b32 $1, $2, 4; "
            "lop3.b32 $1, $1, 0x0F0F0F0F, 0x08080808, 0x6a; }",
            "=r,=r,r",
            [p],
            dtype=(gl.uint8, gl.uint8),
            is_pure=True,
            pack=4,
        )
    return lo.to(gl.float8e4nv, bitcast=True), hi.to(gl.float8e4nv, bitcast=True)


@gluon.jit
def _producer(x_desc, w_desc, sa_desc, sw_desc, wc_desc, x_s, wlo_s, whi_s, sa_s, sw_s, wc_s, ready, empty,
              off_m, off_n, M, N, g0, NG, STAGES: gl.constexpr, UNSIGNED: gl.constexpr):
    """One warp: per group (groups g0 .. g0 + NG - 1), wait for the slot to be free, arm its
    ready barrier with the bytes, issue the TMA loads."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    HALF: gl.constexpr = GROUP // 2
    nbytes: gl.constexpr = BM * HALF + 2 * BN * HALF + 4 * BM + 4 * BN * (1 if UNSIGNED else 2)
    for i in range(NG):
        g = g0 + i
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        bar = ready.index(s)
        mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, g * HALF], bar, x_s.index(s))
        tma.async_copy_global_to_shared(w_desc, [off_n, g * GROUP], bar, wlo_s.index(s))
        tma.async_copy_global_to_shared(w_desc, [off_n, g * GROUP + HALF], bar, whi_s.index(s))
        tma.async_copy_global_to_shared(sa_desc, [g * M + off_m], bar, sa_s.index(s))
        if UNSIGNED:
            tma.async_copy_global_to_shared(sw_desc, [g * N + off_n], bar, sw_s.index(s))
        else:  # the weight scales and offsets interleaved: one box of 2 * BN
            tma.async_copy_global_to_shared(wc_desc, [2 * (g * N + off_n)], bar, wc_s.index(s))


@gluon.jit
def _scales(wg, sa_s, sw_s, wc_s, s, ACC: gl.constexpr, UNSIGNED: gl.constexpr):
    """The group's scale vectors from its ring slot (wc: the offset term; sw again if unsigned)."""
    sa = sa_s.index(s).slice(wg * 64, 64).load(gl.SliceLayout(1, ACC))
    if UNSIGNED:
        # columns 16 jj + 8 j2 + 2 q + c, stored [jj][q][j2][c]: a thread's four in 16 bytes
        BN: gl.constexpr = sw_s.shape[1]
        QUAD4: gl.constexpr = gl.BlockedLayout([1, 1, 2, 2], [1, 4, 8, 1], [1, 1, 4, 1], [1, 3, 2, 0])
        sw = sw_s.index(s).reshape([BN // 16, 4, 2, 2]).load(QUAD4)
        sw = gl.convert_layout(gl.reshape(gl.permute(sw, (0, 2, 1, 3)), [BN]), gl.SliceLayout(0, ACC))
        wc = sw
    else:
        # (sw[2p], sw[2p+1], wc[2p], wc[2p+1]) for the column pair p a thread holds: one 16-byte load
        BN: gl.constexpr = sw_s.shape[1]
        QUAD: gl.constexpr = gl.BlockedLayout([1, 2, 2], [4, 8, 1], [1, 4, 1], [0, 2, 1])
        q = wc_s.index(s).reshape([BN // 2, 2, 2]).load(QUAD)  # [pair, (sw, wc), column in pair]
        q = gl.reshape(gl.permute(q, (0, 2, 1)), [BN, 2])
        sw, wc = gl.split(q)
        sw = gl.convert_layout(sw, gl.SliceLayout(0, ACC))
        wc = gl.convert_layout(wc, gl.SliceLayout(0, ACC))
    return sa, sw, wc


@gluon.jit
def _apply(acc, part, sa, sw, wc, UNSIGNED: gl.constexpr):
    """acc + sa * (part * sw + wc): two FMAs (FMUL + FFMA unsigned) per element."""
    t = part * sw[None, :] if UNSIGNED else gl.fma(part, sw[None, :], wc[None, :])
    return gl.fma(t, sa[:, None], acc)


@gluon.jit
def _mma_group(wg, x_s, wlo_s, whi_s, s, part, A_OP: gl.constexpr, UNSIGNED: gl.constexpr):
    """Issue group s's two K = 32 FP8 wgmmas into ``part`` (accumulate off), asynchronously."""
    a_lo, a_hi = _expand(x_s.index(s).slice(wg * 64, 64).load(A_OP), UNSIGNED)
    part = warpgroup_mma(a_lo, wlo_s.index(s).permute((1, 0)), part, use_acc=False, is_async=True)
    return warpgroup_mma(a_hi, whi_s.index(s).permute((1, 0)), part, is_async=True)


@gluon.jit
def _consumer(wg, x_s, wlo_s, whi_s, sa_s, sw_s, wc_s, ready, empty, lora_ptr, up_ptr, bias_ptr, out_ptr,
              ws_ptr, off_m, off_n, M, N, R, NG, slot, stride_lm, stride_un, stride_om,
              BN: gl.constexpr, BR: gl.constexpr, STAGES: gl.constexpr,
              UNSIGNED: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
    """One consumer warpgroup (rows wg * 64 of the tile): low-rank branch (R = 0: none), main
    loop over NG groups, then bias and store, or (a K-slice, slot >= 0) the fp32 partial into
    the workspace at ``slot``."""
    NW: gl.constexpr = 4
    BM: gl.constexpr = 64
    tile_m = off_m
    off_m = off_m + wg * BM
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 32])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=4)
    LOAD: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NW, 1], [1, 0])
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, LOAD))
    acc = gl.zeros([BM, BN], gl.float32, ACC)
    if HAS_LORA:
        LR: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 16])
        L_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LR, k_width=2)
        rr = gl.arange(0, BR, layout=gl.SliceLayout(0, LOAD))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, LOAD))
        r_ok = rr[None, :] < R
        la = gl.load(lora_ptr + gl.minimum(rows, M - 1).to(gl.int64)[:, None] * stride_lm + rr[None, :],
                     mask=r_ok, other=0.0)
        up = gl.load(up_ptr + gl.minimum(cols, N - 1).to(gl.int64)[:, None] * stride_un + rr[None, :],
                     mask=r_ok, other=0.0)
        UP_L: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BR], gl.bfloat16)
        up = up.to(gl.float32)
        up_hi = up.to(gl.bfloat16)
        hi_s = gl.allocate_shared_memory(gl.bfloat16, [BN, BR], UP_L, up_hi)
        lo_s = gl.allocate_shared_memory(gl.bfloat16, [BN, BR], UP_L, (up - up_hi.to(gl.float32)).to(gl.bfloat16))
        fence_async_shared()
        la_hi = la.to(gl.bfloat16)
        a_hi = gl.convert_layout(la_hi, L_OP)
        a_lo = gl.convert_layout((la - la_hi.to(gl.float32)).to(gl.bfloat16), L_OP)
        # hi*hi + lo*hi + hi*lo: both factors to ~2^-16 (the lo*lo term is below that)
        lr = gl.zeros([BM, BN], gl.float32, LR)
        lr = warpgroup_mma(a_hi, hi_s.permute((1, 0)), lr, use_acc=False, is_async=True)
        lr = warpgroup_mma(a_lo, hi_s.permute((1, 0)), lr, is_async=True)
        lr = warpgroup_mma(a_hi, lo_s.permute((1, 0)), lr, is_async=True)
        lr = warpgroup_mma_wait(0, deps=(lr, hi_s, lo_s))[0]
        acc = gl.convert_layout(lr, ACC)

    part = gl.zeros([BM, BN], gl.float32, ACC)  # its values are never read (accumulate off)
    for i in range(NG):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        part = _mma_group(wg, x_s, wlo_s, whi_s, s, part, A_OP, UNSIGNED)
        sa, sw, wc = _scales(wg, sa_s, sw_s, wc_s, s, ACC, UNSIGNED)  # read while the MMAs run
        part = warpgroup_mma_wait(0, deps=(part, wlo_s.index(s), whi_s.index(s)))[0]
        mbarrier.arrive(empty.index(s))  # the slot is free: MMAs done, codes and scales in registers
        acc = _apply(acc, part, sa, sw, wc, UNSIGNED)

    if SPLIT:
        if slot >= 0:  # a K-slice: the whole fp32 tile to its workspace slot (gemm_sm90_ws_split)
            lr_ = (off_m - tile_m) + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
            lc = gl.arange(0, BN, layout=gl.SliceLayout(0, ACC))
            dst = ws_ptr + slot.to(gl.int64) * (2 * BM * BN) + lr_[:, None] * BN + lc[None, :]
            gl.store(dst, acc)
        else:
            _store(acc, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, BM, BN, ACC, HAS_BIAS)
    else:
        _store(acc, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, BM, BN, ACC, HAS_BIAS)


@gluon.jit
def _store(acc, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, BM: gl.constexpr, BN: gl.constexpr,
           ACC: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Bias, one rounding to the output's dtype, masked store."""
    om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, ACC))
    if HAS_BIAS:
        acc += gl.load(bias_ptr + on, mask=on < N, other=0.0).to(gl.float32)[None, :]
    mask = (om < M)[:, None] & (on < N)[None, :]
    gl.store(out_ptr + om.to(gl.int64)[:, None] * stride_om + on[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@gluon.jit
def w4a4_gemm_sm90_ws_kernel(
    x_desc,  # TMA: qx u8 [M, K/2], box [BM, 32]
    w_desc,  # TMA: w8 e4m3 [N, K], box [BN, 32]
    sa_desc,  # TMA: ascales as one vector [G * M] (group-major), box [BM]
    sw_desc,  # TMA: wscales (times 2^9) as [G * N], box [BN]
    wc_desc,  # TMA: swc as [G * N * 2], box [2 * BN] (read for signed activations)
    lora_ptr,  # f32 [M, R]
    up_ptr,  # [N, R]
    bias_ptr,  # [N]
    out_ptr,  # [M, N]
    ws_ptr,  # f32 workspace of the K-slices (SPLIT): gemm_sm90_ws_split.workspace_shape
    M,
    N,
    K,
    R,
    stride_lm,
    stride_un,
    stride_om,
    FULL,  # SPLIT: tiles [0, FULL) over the whole K, then SLICES CTAs per tile, SLICE_G groups each
    SLICES,
    SLICE_G,
    BR: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    UNSIGNED: gl.constexpr,
    HAS_LORA: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    SPLIT: gl.constexpr,
):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    HALF: gl.constexpr = GROUP // 2
    G = K // GROUP
    pid = gl.program_id(0)
    g0 = 0
    NG = G
    slot = -1
    if SPLIT:  # noqa: SIM102 (the constexpr compiles the runtime branch in or out)
        if pid >= FULL:  # K-slice j of tile FULL + q: groups [j * SLICE_G, min(G, (j + 1) * SLICE_G))
            q = (pid - FULL) // SLICES
            j = (pid - FULL) % SLICES
            slot = pid - FULL
            pid = FULL + q
            g0 = j * SLICE_G
            NG = gl.minimum(G - g0, SLICE_G)
            if j > 0:
                R = 0  # the low-rank branch once per tile: in slice 0
    # grouped order: GROUP_M row blocks sweep the columns together (weight tiles shared in L2)
    num_m = gl.cdiv(M, BM)
    width = GROUP_M * gl.cdiv(N, BN)
    first_m = (pid // width) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    off_m = (first_m + (pid % width) % size_m) * BM
    off_n = ((pid % width) // size_m) * BN

    x_s = gl.allocate_shared_memory(gl.uint8, [STAGES, BM, HALF], x_desc.layout)
    wlo_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, HALF], w_desc.layout)
    whi_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, HALF], w_desc.layout)
    sa_s = gl.allocate_shared_memory(gl.float32, [STAGES, BM], sa_desc.layout)
    sw_s = gl.allocate_shared_memory(gl.float32, [STAGES, BN], sw_desc.layout)
    wc_s = gl.allocate_shared_memory(gl.float32, [STAGES, 2 * BN], wc_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup

    # each consumer warpgroup is its own partition (64 rows): the barrier Triton puts around an
    # mbarrier arrive then spans one warpgroup, and the two warpgroups run out of step
    gl.warp_specialize(
        [
            (_consumer, (0, x_s, wlo_s, whi_s, sa_s, sw_s, wc_s, ready, empty, lora_ptr, up_ptr, bias_ptr, out_ptr,
                          ws_ptr, off_m, off_n, M, N, R, NG, slot, stride_lm, stride_un, stride_om,
                          BN, BR, STAGES, UNSIGNED, HAS_LORA, HAS_BIAS, SPLIT)),
            (_consumer, (1, x_s, wlo_s, whi_s, sa_s, sw_s, wc_s, ready, empty, lora_ptr, up_ptr, bias_ptr, out_ptr,
                          ws_ptr, off_m, off_n, M, N, R, NG, slot, stride_lm, stride_un, stride_om,
                          BN, BR, STAGES, UNSIGNED, HAS_LORA, HAS_BIAS, SPLIT)),
            (
                _producer,
                (x_desc, w_desc, sa_desc, sw_desc, wc_desc, x_s, wlo_s, whi_s, sa_s, sw_s, wc_s, ready, empty,
                 off_m, off_n, M, N, g0, NG, STAGES, UNSIGNED),
            ),
        ],
        [4, 1],
        [232, 40],
    )


def descriptors(qx: torch.Tensor, ascales: torch.Tensor, weight: WsWeight, cfg: WsConfig) -> tuple:
    """The five TMA descriptors of a launch (ascales must be group-major: strides (1, M))."""
    m = qx.shape[0]
    n, k = weight.w8.shape
    bm, bn, half = cfg.block_m, cfg.block_n, GROUP.value // 2
    sa = ascales.t()  # [G, M] contiguous
    if sa.stride(1) != 1 or sa.stride(0) != m:
        raise ValueError(f"ascales must be group-major [M, G] with strides (1, M), got {tuple(ascales.stride())}")

    def vec(t: torch.Tensor, box: int) -> TensorDescriptor:
        flat = t.reshape(-1) if t.is_contiguous() else None
        if flat is None:
            raise ValueError("scale vectors must be contiguous")
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
        return TensorDescriptor(flat, [flat.numel()], [1], [box], layout)

    x_layout = gl.NVMMASharedLayout.get_default_for([bm, half], gl.uint8)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, half], gl.float8e4nv)
    return (
        TensorDescriptor(qx, [m, k // 2], [qx.stride(0), 1], [bm, half], x_layout),
        TensorDescriptor(weight.w8, [n, k], [k, 1], [bn, half], w_layout),
        vec(sa, bm),
        vec(weight.wscales, bn),
        vec(weight.swc, 2 * bn),
    )


def launch_args(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    weight: WsWeight,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    unsigned: bool,
    cfg: WsConfig = CONFIG,
    split: Split | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[tuple, dict, tuple]:
    """(args, kwargs, grid) of the kernel for contract tensors (also what the static model and
    the PTX-execution test compile); with ``split``, the K-sliced grid writing ``workspace``."""
    m = qx.shape[0]
    n, k = weight.w8.shape
    r = lora_act.shape[1]
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if split is not None:
        want = workspace_shape(tiles, split, cfg.block_m, cfg.block_n)
        if workspace is None or tuple(workspace.shape) != want or workspace.dtype != torch.float32:
            raise ValueError(f"split launch: workspace must be fp32 {want}")
    args = (
        *descriptors(qx, ascales, weight, cfg),
        lora_act,
        proj_up,
        bias if bias is not None else out,
        out,
        workspace if split is not None else out,
        m,
        n,
        k,
        r,
        lora_act.stride(0),
        proj_up.stride(0),
        out.stride(0),
        split.full if split else tiles,
        split.slices if split else 1,
        split.slice_groups if split else k // GROUP.value,
    )
    kwargs = {
        "BR": max(16, triton.next_power_of_2(r)),
        "STAGES": cfg.stages,
        "GROUP_M": 8,
        "UNSIGNED": unsigned,
        "HAS_LORA": r > 0,
        "HAS_BIAS": bias is not None,
        "SPLIT": split is not None,
        "num_warps": cfg.num_warps,
    }
    grid = (split.full + (tiles - split.full) * split.slices if split else tiles,)
    return args, kwargs, grid


def launch(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    weight: WsWeight,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    unsigned: bool,
    out_dtype: torch.dtype,
    cfg: WsConfig = CONFIG,
    split: Split | None = None,
) -> torch.Tensor:
    """Run the kernel on a Hopper GPU (contract tensors; ``supports`` must hold); with ``split``
    (``plan(m, n, k, sms)``), the last partial wave in K-slices and their sum as a second launch."""
    m = qx.shape[0]
    n, k = weight.w8.shape
    if not supports(m, n, k, lora_act.shape[1], k // ascales.shape[1]):
        raise ValueError(f"w4a4 ws kernel: unsupported shape M={m} N={n} K={k} rank={lora_act.shape[1]}")
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    workspace = None
    if split is not None:
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        workspace = torch.empty(
            workspace_shape(tiles, split, cfg.block_m, cfg.block_n), dtype=torch.float32, device=qx.device
        )
    args, kwargs, grid = launch_args(qx, ascales, weight, lora_act, proj_up, bias, out, unsigned=unsigned, cfg=cfg,
                                     split=split, workspace=workspace)  # fmt: skip
    w4a4_gemm_sm90_ws_kernel[grid](*args, **kwargs)
    if split is not None:
        sum_slices(workspace, bias, out, split, group_m=kwargs["GROUP_M"])
    return out


def plan(m: int, n: int, k: int, sms: int, cfg: WsConfig = CONFIG) -> Split | None:
    """The split of this problem's last partial wave on a GPU of ``sms`` SMs, or None
    (gemm_sm90_ws_split.plan_split)."""
    return plan_split(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), k // GROUP.value, sms)


# The split the self-check runs (two tiles of four groups: the second in two slices of two).
CHECK_SPLIT = Split(full=1, slices=2, slice_groups=2)


def self_check(device: torch.device, split: Split | None = None) -> bool:
    """Whether the kernel (with ``split``: its split grid and the sum of the slices) is right on
    ``device``: every group's dot at its extreme codes exact (as gemm_sm90.extreme_codes_exact),
    and a random problem with a low-rank branch and bias against the FP8 kernel (its offset
    correction and low-rank product are ~2^-16 relative; the branch and the bias counted once)."""
    from engine.quant import pack_int4

    g = torch.Generator().manual_seed(0)
    m, n, k, r = 128, 144, 256, 32  # two column tiles, the second partial; four groups
    ok = True
    for unsigned in (False, True):
        lo, hi = (0, 15) if unsigned else (-8, 7)
        x = torch.randint(lo, hi + 1, (m, k), generator=g, dtype=torch.int8)
        x[: m // 4] = hi
        x[m // 4 : m // 2] = lo
        w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        w[: n // 4] = -8
        w[n // 4 : n // 2] = 7
        ascales = torch.ones(k // 64, m, device=device).t()
        base = gemm_sm90.prepare_weight(pack_int4(w).to(device), torch.ones(n, k // 64, device=device))
        args = (pack_int4(x).to(device), ascales)
        none = (torch.zeros(m, 0, device=device), torch.zeros(n, 0, device=device), None)
        y = launch(*args, prepare_weight(base), *none, unsigned=unsigned, out_dtype=torch.float32, split=split)
        ok &= torch.equal(y.cpu().double(), x.double() @ w.double().T)
        sa = (torch.rand(k // 64, m, generator=g) + 0.5).to(device).t()
        ws = (torch.rand(n, k // 64, generator=g) / 64 + 1e-3).to(device, torch.bfloat16)
        base = gemm_sm90.prepare_weight(pack_int4(w).to(device), ws)
        la = torch.randn(m, r, generator=g).to(device)
        up = (torch.randn(n, r, generator=g) / 8).to(device, torch.bfloat16)
        bias = torch.randn(n, generator=g).to(device, torch.bfloat16)
        kw = {"unsigned": unsigned, "out_dtype": torch.float32}
        y = launch(args[0], sa, prepare_weight(base), la, up, bias, **kw, split=split)
        y_fp8 = gemm_sm90.launch(args[0], sa, base, la, up, bias, **kw)
        ok &= bool(((y - y_fp8).abs().max() <= 1e-4 * y_fp8.abs().max()).item())
    return ok


@functools.cache
def _serves(device: torch.device, split: bool = False) -> bool:
    what = "warp-specialized kernel's split-K grid" if split else "warp-specialized kernel"
    instead = "using its plain grid" if split else "using the FP8 kernel (gemm_sm90.py)"
    check = functools.partial(self_check, device, CHECK_SPLIT if split else None)
    return gemm_sm90.passes_self_check(check, "w4a4_gemm", device, what, "the FP8 kernel's", instead)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_for(device: torch.device, m: int, n: int, k: int) -> Split | None:
    """The split of this problem's last partial wave on ``device`` (``plan`` at its SM count),
    or None: none planned, or the split grid failed its own self-check there (checked once,
    after ``serves``; a failure is logged and the plain grid serves)."""
    split = plan(m, n, k, _sm_count(device))
    return split if split is not None and _serves(device, True) else None


def serves(device: torch.device) -> bool:
    """Whether this kernel serves ``device``: checked once per device (``self_check``, a few small
    launches at the first call, i.e. setup's warm-up); a failure is logged and the FP8 kernel
    serves instead. The split grid's own check (``split_for``) runs at the same first call, so
    that no check launches later (e.g. during a CUDA-graph capture at a size warm-up missed)."""
    ok = _serves(device)
    if ok:
        _serves(device, True)
    return ok
