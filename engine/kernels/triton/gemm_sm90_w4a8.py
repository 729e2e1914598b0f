"""The W4A8 GEMM for Hopper (sm_90): int4 weights x FP8 (e4m3) activations with one scale per
token, warp-specialized and fed by TMA, written in Gluon. Arithmetic: ``ops.w4a8_gemm``.

Why: with one activation scale per token a 64-channel group costs the loop ONE fp32 FMA per
output element (acc += part * sw), where the W4A4 kernels need two (docs/benchmarks.md, "The
ceiling that per-64-group scales put on Hopper"); the token's scale is applied once after the
loop.

Operands swapped against gemm_sm90_ws (the output tile is [weight rows n, tokens t], stored
transposed to y[t, n]):

- weights, the wgmma A operand FROM REGISTERS: packed once at load (``prepare_weight``) in a
  sign-magnitude 4-bit layout, 0.5 byte per weight, so that a code q becomes the e4m3 byte
  (q < 0) << 7 | |q|, exactly q * 2^-9 (e4m3 subnormals). Per group a row's 64 codes are 32
  bytes: byte kk (word kk // 4, byte j = kk % 4 of it) holds channel kk's code ("lo") in bits
  0-2 and 7 (magnitude, sign) and channel 32 + kk's ("hi") magnitude in bits 4-6, whose sign
  sits in bit 3 of the word's byte (j + 1) % 4. A 32-bit word of 8 codes expands in three
  instructions: lo = w & 0x87878787, hi = rotate_right(w, 4) & 0x87878787 (``_expand``). A
  code -8 has no sign-magnitude form: it is read as -7, as the contract (ops.w4a8_gemm) says.
- activations, the B operand from shared memory: the e4m3 codes [M, K] through TMA, per group
  two [BT, 32] boxes (channels 0-31 and 32-63 of the group, matching lo and hi), K-major.

Roles (as gemm_sm90_ws): one producer warp issues, per group, eight TMA loads (the packed weight
tile [64, 32] u8 and scales times 2^9 [64] fp32 per consumer, the two activation halves) into a
STAGES-deep ring of slots guarded by ``ready`` / ``empty`` mbarriers; each consumer warpgroup
(64 weight rows; its own partition) waits on ``ready``, loads its 16 packed bytes per thread,
expands them, issues two K = 32 FP8 wgmmas into a partial (accumulate off), reads its two row
scales, waits for the MMAs, releases the slot and applies ``acc = part * sw + acc``. After the
loop: ``acc * ascale[t]`` plus the low-rank branch (lora_act [M, R] x proj_up [N, R], three bf16
wgmmas on hi/lo halves accumulated onto acc, ~2^-16 relative as gemm_sm90_ws; the factors, the
token scales and the bias staged in shared memory before the loop), the bias, and the store of
y[t, n] (fp32 for the Hopper route's epilogue, or out_dtype).

Not bit-exact with the reference on general inputs (the tensor cores' fp32 summation order and
rounding; the low-rank bf16 split): exact on inputs whose partial sums fit in 24 bits
(``exact_inputs``), which the self-check and the tests use.

Persistent: ``launch`` starts one CTA per SM (at most one per work item), each running every
programs-th item (tile, or K-slice of one) of the grouped order; the ring runs on across a CTA's tiles, so the producer
loads the next tile's first groups while the consumers finish the last one (each consumer
restages its low-rank operands, token scales and bias in its own shared memory per tile).

Tile config (``W4A8Config``): three consumer warpgroups x 64 weight rows by 128 tokens (a CTA
of 192 x 128, 512 threads): per thread 64 fp32 accumulators + 64 partials. Compiled for sm_90
(scripts/perfmodel/hopper_w4a8_static.py) it fits with the two worker consumers at 160
registers (the default-partition consumer gets 168, the producer 24): no spills, no ptxas
C7512, one wgmma wait per group, 64 FFMA + ~55 other SASS per group and consumer warp
(at 152 the epilogue spilled 16 bytes). Why this tile: per group it moves 15 KB from L2 per
384 tensor clocks, less per clock than 2 x (64 x 128) (12.5 KB per 256); 2 x (64 x 256)
spills, and 64 x 192 per warpgroup is not a power-of-two shape (Triton tensors must be).
tests/test_w4a8_gemm_static.py gates the loop.

Split-K of the last partial wave (``split``, planned by ``plan`` with gemm_sm90_ws_split.plan_split):
the persistent grid's work items are the tiles of the whole waves over all of K, then each
remaining tile as ``slices`` K-slices of consecutive groups (``_work``); a slice stores its fp32
partial [192 n, 128 t] (token scale applied: it is linear; the low-rank branch in slice 0 only;
no bias) to a workspace, and gemm_sm90_ws_split.sum_slices (transposed) adds the slices in slice
order, the bias, rounds once and writes y[t, n]: deterministic, and bit for bit the unsplit
result where every partial sum is exact (``exact_inputs``). At M = 4352 the N = 3072 shapes run
544 tiles = 4 waves and 16 tiles on 132 SMs: those 16 tiles run as 8 slices each. The split
variant's group loops are the plain kernel's (tests/test_w4a8_gemm_static.py); it keeps a few
values in local memory across the partitions' register reallocation (loaded once per partition
or work item, none in a group loop), which the plain kernel does not.

Not built: the same warpgroup's scaling under
its own next MMA (a second partial set of registers: does not fit); TMA multicast of the
activation tile across a CTA pair (halves its L2 bytes; Gluon 3.6's TMA copy has no multicast).
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

from engine.kernels.triton.gemm_sm90 import A_UNIT, passes_self_check
from engine.kernels.triton.gemm_sm90_ws import GROUP
from engine.kernels.triton.gemm_sm90_ws_split import Split, plan_split, sum_slices, workspace_shape

MAX_RANK = 64
HALF = gl.constexpr(GROUP.value // 2)  # channels per K = 32 wgmma; packed bytes per row and group
SIGN_MAGNITUDE_MASK = 0x87878787  # per byte: sign (bit 7) and magnitude (bits 0-2)


@dataclass(frozen=True)
class W4A8Config:
    """Consumer warpgroups (64 weight rows each), tokens per tile, ring depth, consumer registers."""

    consumers: int = 3
    block_t: int = 128
    stages: int = 4
    consumer_regs: int = 160  # the two worker consumers; the default partition gets the rest (168)
    producer_regs: int = 24

    num_warps = 4  # the first consumer warpgroup (the default partition); +4 per consumer, +1

    @property
    def block_w(self) -> int:
        return 64 * self.consumers

    def __post_init__(self):
        if self.consumers not in (2, 3):
            raise ValueError(f"consumers must be 2 or 3, got {self.consumers}")
        if self.block_t not in (64, 128, 256):  # Triton tensors have power-of-two shapes
            raise ValueError(f"block_t must be 64, 128 or 256, got {self.block_t}")


CONFIG = W4A8Config()


@dataclass(frozen=True)
class W4A8Weight:
    """The weight in this kernel's layout (``prepare_weight``).

    packed  uint8 [N, K/2]  per group and row 32 bytes: sign-magnitude codes, byte kk holds
                            channels kk (bits 0-2, sign 7) and 32 + kk (bits 4-6; its sign in
                            bit 3 of byte 4 (kk // 4) + (kk + 1) % 4)
    sw      fp32 [G, N]     the group scales times 2^9 (the codes' e4m3 unit undone), contiguous
    """

    packed: torch.Tensor
    sw: torch.Tensor


def pack_sign_magnitude(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in -7..7 -> the packed bytes [N, K/2] of ``W4A8Weight.packed``."""
    n, k = codes.shape
    c = codes.to(torch.int32).view(n, k // GROUP.value, 2, HALF.value)
    lo, hi = c[:, :, 0], c[:, :, 1]  # [N, G, 32]: channels kk and 32 + kk
    hsign = (hi < 0).int().view(n, -1, HALF.value // 4, 4).roll(1, dims=3).view_as(hi)  # hi j's sign -> byte j + 1
    byte = ((lo < 0).int() << 7) | lo.abs() | (hi.abs() << 4) | (hsign << 3)
    return byte.to(torch.uint8).view(n, k // 2)


def prepare_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> W4A8Weight:
    """The checkpoint weight (signed int4 codes uint8 [N, K/2], wscales [N, G]) in this kernel's
    layout, made once at load; a code -8 (no sign-magnitude form) is stored as -7, as
    ops.w4a8_gemm reads it."""
    from engine.quant import unpack_int4

    n, half = qweight.shape
    if wscales.shape[0] != n or (2 * half) % GROUP.value or wscales.shape[1] != 2 * half // GROUP.value:
        raise ValueError(f"prepare_weight: wscales {tuple(wscales.shape)} does not fit qweight {tuple(qweight.shape)}")
    packed = []
    for rows in qweight.split(4096):  # no [N, K] int32 copy of a whole large weight
        packed.append(pack_sign_magnitude(unpack_int4(rows).clamp_min_(-7)))
    sw = (wscales.float() * (1.0 / A_UNIT)).t().contiguous()  # exact (a power of two)
    return W4A8Weight(torch.cat(packed), sw)


def supports(m: int, n: int, k: int, r: int, group: int) -> bool:
    """Whether a problem meets this kernel's TMA alignment and tile rules."""
    shapes = m >= 1 and n >= 4 and k >= GROUP.value and m * n < 2**31  # int32 output offsets
    return shapes and n % 4 == 0 and k % GROUP.value == 0 and group == GROUP.value and r <= MAX_RANK


@gluon.jit
def _expand(w):
    """Packed sign-magnitude bytes -> (channels kk, channels 32 + kk) as e4m3 bytes q * 2^-9,
    three instructions per 32-bit word (8 codes)."""
    lo, hi = gl.inline_asm_elementwise(
        "{ and.b32 $0, $2, 0x87878787; shf.r.wrap.b32 $1, $2, $2, 4; and.b32 $1, $1, 0x87878787; }",
        "=r,=r,r",
        [w],
        dtype=(gl.uint8, gl.uint8),
        is_pure=True,
        pack=4,
    )
    return lo.to(gl.float8e4nv, bitcast=True), hi.to(gl.float8e4nv, bitcast=True)


@gluon.jit
def _items(M, N, FULL, SLICES: gl.constexpr, BW: gl.constexpr, BT: gl.constexpr, SPLIT: gl.constexpr):
    """The grid's work items (``_work``): the tiles, or with SPLIT the whole-K tiles and the
    remaining tiles' K-slices."""
    tiles = gl.cdiv(N, BW) * gl.cdiv(M, BT)
    if SPLIT:
        tiles = FULL + (tiles - FULL) * SLICES
    return tiles


@gluon.jit
def _tile(tile, M, N, BW: gl.constexpr, BT: gl.constexpr, GROUP_N: gl.constexpr):
    """(off_n, off_t) of a tile in grouped order: GROUP_N weight-row blocks sweep the token blocks
    together (weight and activation tiles shared in L2 by the CTAs that run at once)."""
    num_n = gl.cdiv(N, BW)
    width = GROUP_N * gl.cdiv(M, BT)
    first_n = (tile // width) * GROUP_N
    size_n = gl.minimum(num_n - first_n, GROUP_N)
    return (first_n + (tile % width) % size_n) * BW, ((tile % width) // size_n) * BT


@gluon.jit
def _work(item, G, R, FULL, SLICES: gl.constexpr, SPLIT: gl.constexpr):
    """Work item ``item`` of the grid: (tile, first group, groups, workspace slot, rank). Without
    SPLIT every item is a tile over all G groups (slot -1). With it, items [0, FULL) are such
    tiles and item FULL + q * SLICES + j is K-slice j of tile FULL + q: groups [j * SG,
    min(G, (j + 1) * SG)) with SG = ceil(G / SLICES) (as gemm_sm90_ws_split.plan_split cuts them),
    its fp32 partial to workspace slot q * SLICES + j, the low-rank branch (rank R) in slice 0
    only. SLICES is a compile-time constant (its divisions are multiplications; FLUX's plans on
    an H100 all have 8 slices, the self-check 3), and the width is derived, not an argument."""
    tile = item
    g0 = 0
    ng = G
    slot = -1
    r = R
    if SPLIT:  # noqa: SIM102 (the constexpr compiles the runtime branch in or out)
        if item >= FULL:
            slot = item - FULL
            q = slot // SLICES
            j = slot - q * SLICES
            tile = FULL + q
            sg = gl.cdiv(G, SLICES)
            g0 = j * sg
            ng = gl.minimum(G - g0, sg)
            if j > 0:
                r = 0
    return tile, g0, ng, slot, r


@gluon.jit
def _producer(w_desc, a_desc, sw_desc, w_s, alo_s, ahi_s, sw_s, ready, empty, M, N, NG, pid, nprog,
              FULL, SLICES: gl.constexpr, BT: gl.constexpr, CONSUMERS: gl.constexpr, STAGES: gl.constexpr,
              GROUP_N: gl.constexpr, SPLIT: gl.constexpr):
    """One warp: for each of this CTA's tiles and each group, wait for the slot to be free, arm
    its ready barrier with the bytes, issue the TMA loads: per consumer its 64 weight rows and
    their scales (boxes have power-of-two sizes: 192 rows are three boxes, and no L2 bytes are
    loaded past them), the two activation halves. The ring runs on across tiles, so the next
    tile's first groups load while the consumers finish the last one. With SPLIT, a K-slice item
    loads its range of groups (``_work``)."""
    nbytes: gl.constexpr = CONSUMERS * 64 * (HALF + 4) + 2 * BT * HALF
    items = _items(M, N, FULL, SLICES, 64 * CONSUMERS, BT, SPLIT)
    c = 0  # groups issued by this CTA so far (the ring's position and phase)
    for item in range(pid, items, nprog):
        tile, g0, ng, _, _ = _work(item, NG, 0, FULL, SLICES, SPLIT)
        off_n, off_t = _tile(tile, M, N, 64 * CONSUMERS, BT, GROUP_N)
        for i in range(g0, g0 + ng):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            for j in gl.static_range(CONSUMERS):
                tma.async_copy_global_to_shared(w_desc, [off_n + 64 * j, i * HALF], bar, w_s.index(s * CONSUMERS + j))
                tma.async_copy_global_to_shared(sw_desc, [i * N + off_n + 64 * j], bar,
                                                sw_s.index(s * CONSUMERS + j))
            tma.async_copy_global_to_shared(a_desc, [off_t, i * GROUP], bar, alo_s.index(s))
            tma.async_copy_global_to_shared(a_desc, [off_t, i * GROUP + HALF], bar, ahi_s.index(s))
            c += 1


@gluon.jit
def _split_bf16(x):
    """fp32 -> (hi, lo) bf16 halves, x = hi + lo to ~2^-16 relative."""
    hi = x.to(gl.bfloat16)
    return hi, (x - hi.to(gl.float32)).to(gl.bfloat16)


@gluon.jit
def _consumer(wg, w_s, alo_s, ahi_s, sw_s, ready, empty, ascale_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
              ws_ptr, M, N, R, NG, pid, nprog, FULL, SLICES: gl.constexpr,
              BT: gl.constexpr, BR: gl.constexpr, CONSUMERS: gl.constexpr, STAGES: gl.constexpr,
              GROUP_N: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
    """One consumer warpgroup (weight rows 64 wg of each tile, all BT tokens), for each of this
    CTA's work items: the low-rank operands, token scales and bias staged in its own shared
    memory, the main loop, then token scale, low-rank, bias and the store; a K-slice (SPLIT,
    slot >= 0) stores its fp32 partial (token scale applied, low-rank in slice 0, no bias) to
    the workspace instead."""
    NW: gl.constexpr = 4
    BW: gl.constexpr = 64
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BT, 32])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=4)
    LOAD: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NW, 1], [1, 0])
    UP_L: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BW, BR], gl.bfloat16)
    LA_L: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, BR], gl.bfloat16)
    VEC: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    V1: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    if HAS_LORA:
        uhi_s = gl.allocate_shared_memory(gl.bfloat16, [BW, BR], UP_L)
        ulo_s = gl.allocate_shared_memory(gl.bfloat16, [BW, BR], UP_L)
        lhi_s = gl.allocate_shared_memory(gl.bfloat16, [BT, BR], LA_L)
        llo_s = gl.allocate_shared_memory(gl.bfloat16, [BT, BR], LA_L)
    sa_s = gl.allocate_shared_memory(gl.float32, [BT], VEC)
    b_s = sa_s  # without a bias: a stand-in that _store does not read
    if HAS_BIAS:
        b_s = gl.allocate_shared_memory(gl.float32, [2 * BW], VEC)
    items = _items(M, N, FULL, SLICES, 64 * CONSUMERS, BT, SPLIT)
    c = 0  # groups consumed by this CTA so far (the ring's position and phase)
    for item in range(pid, items, nprog):
        tile, _, ng, slot, rank = _work(item, NG, R, FULL, SLICES, SPLIT)
        off_n, off_t = _tile(tile, M, N, 64 * CONSUMERS, BT, GROUP_N)
        off_n = off_n + wg * BW
        if HAS_LORA:  # both factors' bf16 halves into this warpgroup's shared memory, before the loop
            rr = gl.arange(0, BR, layout=gl.SliceLayout(0, LOAD))
            r_ok = rr[None, :] < rank  # rank 0: zero factors (a K-slice past the first adds no branch)
            un = off_n + gl.arange(0, BW, layout=gl.SliceLayout(1, LOAD))
            lt = off_t + gl.arange(0, BT, layout=gl.SliceLayout(1, LOAD))
            up = gl.load(up_ptr + gl.minimum(un, N - 1).to(gl.int64)[:, None] * R + rr[None, :],
                         mask=r_ok, other=0.0).to(gl.float32)
            la = gl.load(lora_ptr + gl.minimum(lt, M - 1).to(gl.int64)[:, None] * R + rr[None, :],
                         mask=r_ok, other=0.0)
            up_hi, up_lo = _split_bf16(up)
            la_hi, la_lo = _split_bf16(la)
            uhi_s.store(up_hi)
            ulo_s.store(up_lo)
            lhi_s.store(la_hi)
            llo_s.store(la_lo)
            fence_async_shared()
        # the token scales and the bias into shared memory now (their loads' latency under the
        # ring's fills), read after the loop; loaded in a plain 1-D layout (the accumulator-layout
        # index vectors are made after the loop, not kept live through it)
        vt = off_t + gl.arange(0, BT, layout=V1)
        sa_s.store(gl.load(ascale_ptr + vt, mask=vt < M, other=0.0))
        if HAS_BIAS:  # 64 values over 128 lanes: each stored twice, at i and 64 + i (no two lanes on one address)
            vn = off_n + gl.arange(0, 2 * BW, layout=V1) % BW
            b_s.store(gl.load(bias_ptr + vn, mask=vn < N, other=0.0).to(gl.float32))

        acc = gl.zeros([BW, BT], gl.float32, ACC)
        part = gl.zeros([BW, BT], gl.float32, ACC)  # its values are never read (accumulate off)
        for _ in range(ng):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            w_lo, w_hi = _expand(w_s.index(s * CONSUMERS + wg).load(A_OP))
            part = warpgroup_mma(w_lo, alo_s.index(s).permute((1, 0)), part, use_acc=False, is_async=True)
            part = warpgroup_mma(w_hi, ahi_s.index(s).permute((1, 0)), part, is_async=True)
            sw = sw_s.index(s * CONSUMERS + wg).load(gl.SliceLayout(1, ACC))  # read while the MMAs run
            part = warpgroup_mma_wait(0, deps=(part, alo_s.index(s), ahi_s.index(s)))[0]
            mbarrier.arrive(empty.index(s))  # the slot is free: MMAs done, weights and scales in registers
            acc = gl.fma(part, sw[:, None], acc)
            c += 1

        ot = off_t + gl.arange(0, BT, layout=gl.SliceLayout(0, ACC))
        on = off_n + gl.arange(0, BW, layout=gl.SliceLayout(1, ACC))
        acc = acc * sa_s.load(gl.SliceLayout(0, ACC))[None, :]
        if HAS_LORA:  # accumulated onto acc by the tensor cores (no second register set)
            LR: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, BT, 16])
            # hi*hi + lo*hi + hi*lo: both factors to ~2^-16 (the lo*lo term is below that)
            L_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LR, k_width=2)
            u_hi = uhi_s.load(L_OP)  # the A operand from registers (staged in shared before the loop)
            u_lo = ulo_s.load(L_OP)
            lr = gl.convert_layout(acc, LR)  # the same registers (wgmma's accumulator layout)
            lr = warpgroup_mma(u_hi, lhi_s.permute((1, 0)), lr, is_async=True)
            lr = warpgroup_mma(u_lo, lhi_s.permute((1, 0)), lr, is_async=True)
            lr = warpgroup_mma(u_hi, llo_s.permute((1, 0)), lr, is_async=True)
            acc = gl.convert_layout(warpgroup_mma_wait(0, deps=(lr, lhi_s, llo_s))[0], ACC)
        if SPLIT:
            if slot >= 0:  # a K-slice: this warpgroup's rows of the fp32 tile to its workspace slot
                wr = wg * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, ACC))
                wt = gl.arange(0, BT, layout=gl.SliceLayout(0, ACC))
                dst = ws_ptr + slot.to(gl.int64) * (CONSUMERS * BW * BT) + (wr[:, None] * BT + wt[None, :])
                gl.store(dst, acc)
            else:
                _store(acc, b_s, out_ptr, on, ot, M, N, BW, ACC, HAS_BIAS)
        else:
            _store(acc, b_s, out_ptr, on, ot, M, N, BW, ACC, HAS_BIAS)


@gluon.jit
def _store(acc, b_s, out_ptr, on, ot, M, N, BW: gl.constexpr, ACC: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Bias, one rounding to the output's dtype, the masked store of y[t, n] (contiguous)."""
    if HAS_BIAS:
        acc += b_s.slice(0, BW).load(gl.SliceLayout(1, ACC))[:, None]
    mask = (on < N)[:, None] & (ot < M)[None, :]
    # y[t, n]: int32 offsets (supports: M * N < 2^31), one base pointer
    gl.store(out_ptr + (ot[None, :] * N + on[:, None]), acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def w4a8_gemm_sm90_kernel(
    w_desc,  # TMA: packed weight u8 [N, K/2], box [64, 32]
    a_desc,  # TMA: activation codes e4m3 [M, K], box [BT, 32]
    sw_desc,  # TMA: weight scales times 2^9 as one vector [G * N] (group-major), box [64]
    ascale_ptr,  # f32 [M]
    lora_ptr,  # f32 [M, R]
    up_ptr,  # [N, R]
    bias_ptr,  # [N]
    out_ptr,  # [M, N]
    ws_ptr,  # f32 workspace of the K-slices (SPLIT): gemm_sm90_ws_split.workspace_shape, [n, t] tiles
    M,
    N,
    K,
    R,
    FULL,  # SPLIT: tiles [0, FULL) over the whole K, then SLICES CTAs per tile (``_work``)
    BT: gl.constexpr,
    BR: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP_N: gl.constexpr,
    CONSUMERS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    HAS_LORA: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    SPLIT: gl.constexpr,
    SLICES: gl.constexpr,
):
    NG = K // GROUP
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)  # persistent: CTA pid runs tiles pid, pid + nprog, ...

    w_s = gl.allocate_shared_memory(gl.uint8, [STAGES * CONSUMERS, 64, HALF], w_desc.layout)
    alo_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BT, HALF], a_desc.layout)
    ahi_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BT, HALF], a_desc.layout)
    sw_s = gl.allocate_shared_memory(gl.float32, [STAGES * CONSUMERS, 64], sw_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)  # one arrive per consumer warpgroup

    # each consumer warpgroup is its own partition (64 weight rows), as in gemm_sm90_ws
    if CONSUMERS == 3:
        gl.warp_specialize(
            [
                (_consumer, (0, w_s, alo_s, ahi_s, sw_s, ready, empty, ascale_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
                             ws_ptr, M, N, R, NG, pid, nprog, FULL, SLICES,
                             BT, BR, CONSUMERS, STAGES, GROUP_N, HAS_LORA, HAS_BIAS, SPLIT)),
                (_consumer, (1, w_s, alo_s, ahi_s, sw_s, ready, empty, ascale_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
                             ws_ptr, M, N, R, NG, pid, nprog, FULL, SLICES,
                             BT, BR, CONSUMERS, STAGES, GROUP_N, HAS_LORA, HAS_BIAS, SPLIT)),
                (_consumer, (2, w_s, alo_s, ahi_s, sw_s, ready, empty, ascale_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
                             ws_ptr, M, N, R, NG, pid, nprog, FULL, SLICES,
                             BT, BR, CONSUMERS, STAGES, GROUP_N, HAS_LORA, HAS_BIAS, SPLIT)),
                (_producer, (w_desc, a_desc, sw_desc, w_s, alo_s, ahi_s, sw_s, ready, empty, M, N, NG, pid, nprog,
                             FULL, SLICES, BT, CONSUMERS, STAGES, GROUP_N, SPLIT)),
            ],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
        )
    else:
        gl.warp_specialize(
            [
                (_consumer, (0, w_s, alo_s, ahi_s, sw_s, ready, empty, ascale_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
                             ws_ptr, M, N, R, NG, pid, nprog, FULL, SLICES,
                             BT, BR, CONSUMERS, STAGES, GROUP_N, HAS_LORA, HAS_BIAS, SPLIT)),
                (_consumer, (1, w_s, alo_s, ahi_s, sw_s, ready, empty, ascale_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
                             ws_ptr, M, N, R, NG, pid, nprog, FULL, SLICES,
                             BT, BR, CONSUMERS, STAGES, GROUP_N, HAS_LORA, HAS_BIAS, SPLIT)),
                (_producer, (w_desc, a_desc, sw_desc, w_s, alo_s, ahi_s, sw_s, ready, empty, M, N, NG, pid, nprog,
                             FULL, SLICES, BT, CONSUMERS, STAGES, GROUP_N, SPLIT)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def descriptors(codes: torch.Tensor, weight: W4A8Weight, cfg: W4A8Config) -> tuple:
    """The three TMA descriptors of a launch."""
    m, k = codes.shape
    n = weight.packed.shape[0]
    if codes.stride(1) != 1 or weight.packed.stride(1) != 1 or not weight.sw.is_contiguous():
        raise ValueError("codes, packed weight and sw must be row-major (unit inner stride)")
    w_layout = gl.NVMMASharedLayout.get_default_for([64, HALF.value], gl.uint8)
    a_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_t, HALF.value], gl.float8e4nv)
    sw_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    sw = weight.sw.reshape(-1)
    return (
        TensorDescriptor(weight.packed, [n, k // 2], [weight.packed.stride(0), 1], [64, HALF.value], w_layout),
        TensorDescriptor(codes, [m, k], [codes.stride(0), 1], [cfg.block_t, HALF.value], a_layout),
        TensorDescriptor(sw, [sw.numel()], [1], [64], sw_layout),
    )


def launch_args(
    codes: torch.Tensor,
    ascale: torch.Tensor,
    weight: W4A8Weight,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: W4A8Config = CONFIG,
    programs: int | None = None,
    split: Split | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[tuple, dict, tuple]:
    """(args, kwargs, grid) of the kernel for contract tensors (also what the static counts and
    the PTX-execution test compile); ``programs``: at most that many CTAs (persistent: each
    runs every programs-th work item; one per SM), else one per item; with ``split``, the
    whole-K tiles then the K-slices of the others (``plan``), writing ``workspace``."""
    m, k = codes.shape
    n = weight.packed.shape[0]
    r = lora_act.shape[1]
    tiles = triton.cdiv(m, cfg.block_t) * triton.cdiv(n, cfg.block_w)
    if split is not None:
        want = workspace_shape(tiles, split, cfg.block_w, cfg.block_t)
        if workspace is None or tuple(workspace.shape) != want or workspace.dtype != torch.float32:
            raise ValueError(f"split launch: workspace must be fp32 {want}")
        if split.full >= tiles or split.slice_groups != triton.cdiv(k // GROUP.value, split.slices):
            raise ValueError(f"split launch: {split} is not a plan_split cut of {tiles} tiles of {k // GROUP.value} "
                             "groups (the kernel cuts slices of ceil(groups / slices))")  # fmt: skip
    for name, t in (("lora_act", lora_act), ("proj_up", proj_up), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"w4a8 kernel: {name} must be contiguous")
    args = (
        *descriptors(codes, weight, cfg),
        ascale,
        lora_act,
        proj_up,
        bias if bias is not None else out,
        out,
        workspace if split is not None else out,
        m,
        n,
        k,
        r,
        split.full if split else tiles,
    )
    kwargs = {
        "BT": cfg.block_t,
        "BR": max(16, triton.next_power_of_2(r)),
        "STAGES": cfg.stages,
        "GROUP_N": 8,
        "CONSUMERS": cfg.consumers,
        "CONSUMER_REGS": cfg.consumer_regs,
        "PRODUCER_REGS": cfg.producer_regs,
        "HAS_LORA": r > 0,
        "HAS_BIAS": bias is not None,
        "SPLIT": split is not None,
        "SLICES": split.slices if split else 1,  # a constant: its divisions are multiplications
        "num_warps": cfg.num_warps,
    }
    items = split.full + (tiles - split.full) * split.slices if split else tiles
    grid = (min(items, programs) if programs else items,)
    return args, kwargs, grid


def launch(
    codes: torch.Tensor,
    ascale: torch.Tensor,
    weight: W4A8Weight,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    cfg: W4A8Config = CONFIG,
    programs: int | None = None,
    split: Split | None = None,
) -> torch.Tensor:
    """y = ``ops.w4a8_gemm`` without its epilogue (no partial/residual/gate: ask float32 and run
    the epilogue kernel after it, as the W4A4 Hopper route does) on a Hopper GPU; ``supports``
    must hold. ``programs``: the persistent grid's CTAs (default: the device's SM count);
    ``split`` (``split_for``): the last partial wave in K-slices and their sum as a second launch
    (gemm_sm90_ws_split.sum_slices) on the same stream."""
    m, k = codes.shape
    n = weight.packed.shape[0]
    if codes.dtype != torch.float8_e4m3fn:
        raise TypeError(f"w4a8 kernel: codes must be float8_e4m3fn, got {codes.dtype}")
    if ascale.shape != (m,) or ascale.dtype != torch.float32 or not ascale.is_contiguous():
        raise ValueError(f"w4a8 kernel: ascale must be contiguous fp32 [{m}], got {tuple(ascale.shape)}")
    if weight.packed.shape[1] * 2 != k:
        raise ValueError(f"w4a8 kernel: weight K {weight.packed.shape[1] * 2} != codes K {k}")
    if not supports(m, n, k, lora_act.shape[1], GROUP.value):
        raise ValueError(f"w4a8 kernel: unsupported shape M={m} N={n} K={k} rank={lora_act.shape[1]}")
    out = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    lora_act, proj_up = lora_act.contiguous(), proj_up.contiguous()  # (the kernel takes no strides)
    workspace = None
    if split is not None:
        tiles = triton.cdiv(m, cfg.block_t) * triton.cdiv(n, cfg.block_w)
        workspace = torch.empty(workspace_shape(tiles, split, cfg.block_w, cfg.block_t), dtype=torch.float32,
                                device=codes.device)  # fmt: skip
    args, kwargs, grid = launch_args(codes, ascale, weight, lora_act, proj_up, bias, out, cfg,
                                     programs or _sm_count(codes.device), split, workspace)  # fmt: skip
    w4a8_gemm_sm90_kernel[grid](*args, **kwargs)
    if split is not None:
        sum_slices(workspace, bias, out, split, group_m=kwargs["GROUP_N"], transposed=True)
    return out


# The split's break-even in groups removed from the last wave, for this kernel's tiles (192 x 128:
# a slice stores a 96 KB fp32 partial). perfmodel.hopper_w4a8 prices every candidate plan (its
# ``split.planned`` is plan_split at this break-even, ``split.faster`` the model's verdict;
# tests/test_hopper_w4a8_model.py holds them equal on every FLUX shape at 400-540 clocks per
# group, the compiled kernel's modelled figure ~470): at M = 4352 on 132 SMs the split is priced
# faster where it removes 42 (3072 -> 3072), 168 or 210 of the groups, slower where it removes 24
# (3072 -> 9216 and -> 12288: 48 or 64 tiles left, in two slices); the other candidate tiles of
# the model are priced faster at 32.
MIN_SAVED_GROUPS = 32
# The one slice count served. SLICES is compiled in (``_work``), so each count is a kernel of its
# own: one count (with the two output dtypes the route writes) is compiled and checked on the
# device at ``serves``' first call, setup's warm-up, and no request compiles a split grid. 8 is
# what FLUX's N = 3072 linears plan at 1024x1024 (16 tiles left on 132 SMs); a last wave of more
# than 16 tiles stays whole.
SPLIT_SLICES = 8


def plan(m: int, n: int, k: int, sms: int, cfg: W4A8Config = CONFIG) -> Split | None:
    """The split of this problem's last partial wave on a GPU of ``sms`` SMs (the persistent grid's
    CTAs), or None (gemm_sm90_ws_split.plan_split at this kernel's tiles and break-even, in
    SPLIT_SLICES slices)."""
    tiles = triton.cdiv(m, cfg.block_t) * triton.cdiv(n, cfg.block_w)
    return plan_split(tiles, k // GROUP.value, sms, min_saved=MIN_SAVED_GROUPS, slices=SPLIT_SLICES)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def exact_inputs(m: int, n: int, k: int, r: int, seed: int = 0) -> dict:
    """A problem every backend computes exactly in fp32 (CPU tensors): activation codes
    |a| <= 4 in e4m3 (every group's 64-term sum exact), weight codes -7..7 with the extremes in
    whole rows, power-of-two scales, small integer low-rank factors and bias, all in ranges where
    every partial sum (a group's, the groups', + low-rank in any K-chunking, + bias) spans fewer
    than 24 bits (granularity 2^-13, magnitude < 2^9 at K = 384 and rank 20)."""
    from engine.quant import pack_int4

    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-16, 17, (m, k), generator=g).float() / 4  # multiples of 1/4 in [-4, 4]: exact e4m3
    steps[: m // 8] = 4.0
    codes = steps.to(torch.float8_e4m3fn)
    w = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    w[: n // 8] = 7
    w[n // 8 : n // 4] = -7
    grp = k // GROUP.value
    return {
        "codes": codes,
        "ascale": 2.0 ** torch.randint(-2, 3, (m,), generator=g).float(),
        "qweight": pack_int4(w),
        "wscales": (2.0 ** torch.randint(-9, -6, (n, grp), generator=g).float()).to(torch.bfloat16),
        "lora_act": torch.randint(-4, 5, (m, r), generator=g).float(),
        "proj_up": (torch.randint(-4, 5, (n, r), generator=g).float() / 4).to(torch.bfloat16),
        "bias": torch.randint(-8, 9, (n,), generator=g).float().to(torch.bfloat16),
    }


# The split the self-check runs on its four tiles of eight groups: tiles 0 and 1 over the whole K,
# tiles 2 and 3 in the served SPLIT_SLICES slices of one group.
CHECK_SPLIT = Split(full=2, slices=SPLIT_SLICES, slice_groups=1)


def self_check(device: torch.device, split: Split | None = None) -> bool:
    """Whether the kernel (with ``split``: its split grid and the sum of the slices) computes
    ``ops.w4a8_gemm`` bit for bit on ``device`` on exact inputs (two weight tiles and two token
    tiles, the second of each partial; six groups through the four-slot ring; low-rank and bias;
    then no low-rank branch nor bias), on the full persistent grid and on one CTA for all work
    items, the reference on the CPU."""
    from engine.quant import ops

    ok = True
    k = 64 * (CHECK_SPLIT.slices * CHECK_SPLIT.slice_groups if split else 6)  # the split: a slice per group
    for r, with_bias in ((20, True), (0, False)):
        x = exact_inputs(200, CONFIG.block_w + 100, k, r)  # 2 x 2 tiles, the last of each partial
        if not with_bias:
            x["bias"] = None
        want = ops.w4a8_gemm(x["codes"], x["ascale"], x["qweight"], x["wscales"], x["lora_act"], x["proj_up"],
                             x["bias"], out_dtype=torch.float32)  # fmt: skip  (the definer, on the CPU)
        x = {key: v.to(device) if v is not None else None for key, v in x.items()}
        weight = prepare_weight(x["qweight"], x["wscales"])
        args = (x["codes"], x["ascale"], weight, x["lora_act"], x["proj_up"], x["bias"])
        for programs in (None, 1):  # one CTA per tile; one CTA running all four (the ring across tiles)
            y = launch(*args, out_dtype=torch.float32, programs=programs, split=split)
            ok &= torch.equal(y.cpu(), want)
        # bf16 out too (the route's other output dtype: each is a kernel of its own)
        ok &= torch.equal(launch(*args, out_dtype=torch.bfloat16, split=split).cpu(), want.to(torch.bfloat16))
    return ok


@functools.cache
def _serves(device: torch.device, split: bool = False) -> bool:
    what = "sm_90 W4A8 kernel's split-K grid" if split else "sm_90 W4A8 kernel"
    instead = "its plain grid is used" if split else "not used"
    check = functools.partial(self_check, device, CHECK_SPLIT if split else None)
    return passes_self_check(check, "w4a8_gemm", device, what, "ops.w4a8_gemm", instead)


def split_for(device: torch.device, m: int, n: int, k: int) -> Split | None:
    """The split of this problem's last partial wave on ``device`` (``plan`` at its SM count, the
    persistent grid ``launch`` starts), or None: none planned, or the split grid failed its own
    self-check there (checked once, at ``serves``' first call; a failure is logged and the
    plain grid serves)."""
    split = plan(m, n, k, _sm_count(device))
    return split if split is not None and _serves(device, True) else None


def serves(device: torch.device) -> bool:
    """Whether this kernel serves ``device``: checked once per device (``self_check``, a few small
    launches at the first call, i.e. setup's warm-up); a failure is logged and the W4A4 route
    serves instead. The split grid's own check (``split_for``) runs at the same first call, so
    that no check launches later (e.g. inside a CUDA-graph capture)."""
    ok = _serves(device)
    if ok:
        _serves(device, True)
    return ok
