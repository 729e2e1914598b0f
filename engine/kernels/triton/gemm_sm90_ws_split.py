"""Split-K of the last partial wave of the warp-specialized sm_90 GEMM (gemm_sm90_ws.py), and the
second kernel that sums the slices in a fixed order.

Why: at M = 4352 the N = 3072 linears have 34 x 24 = 816 tiles of 128 x 128 on 132 SMs (one CTA
per SM): six full waves and 24 tiles in a seventh, which takes as long as a full one while 108
SMs idle. Here the grid is the tiles of the whole waves over the whole K (``full`` of them, as
before) followed by each remaining tile in ``slices`` K-slices of ``slice_groups`` 64-channel
groups; a slice writes its fp32 partial tile to a workspace, and ``sum_slices`` (a plain Triton
kernel, launched after it on the same stream) adds the slices of each tile in slice order, then
the bias, rounds once and writes the output. The low-rank branch is added by slice 0 only (its
accumulator starts from it, as a whole tile's does); the others start from zero.

Results: deterministic (the order of every sum is fixed by the plan, whichever CTA finishes
first); the tiles of the whole waves are computed exactly as without the split; a split tile's
sum is ``(((lr + S0) + S1) + ...) + bias`` where S_j is slice j's groups summed in the kernel's
order, against ``(lr + S0 + S1 + ...) + bias`` in one chain: the same terms, regrouped at the
slice boundaries, so equal to the unsplit kernel up to fp32 summation order, and bit for bit
where every partial sum is exact in fp32 (tests/test_hopper_ws_exec.py's exact inputs). The plan
depends on the GPU's SM count: the same GPU model gives the same bits.

The W4A8 kernel (gemm_sm90_w4a8.py) splits its last wave the same way with its own tiles and
break-even (``plan_split(..., min_saved=...)``) and the same sum, ``transposed``: its tiles are
[weight rows n, tokens t] accumulators, stored to y[t, n].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import INTERPRET, round_to

# A split costs the slices' pipeline fill and their fp32 partial stores (64 KB per tile and slice),
# the kernel boundary and the sum's reads of the partials. perfmodel.hopper_ws prices both sides:
# at 24 split tiles in 5 slices (FLUX's N = 3072 shapes) that is about 11,000 clocks, 25 groups of
# 427-440 clocks, so a split that removes fewer groups than this from the last wave is not planned
# (an approximation: the sum's share grows with the split tiles; the model prices every plan).
MIN_SAVED_GROUPS = 26


@dataclass(frozen=True)
class Split:
    """The grid of a split launch: tiles [0, full) over the whole K, then each tile t >= full in
    ``slices`` CTAs, slice j over groups [j * slice_groups, min(G, (j + 1) * slice_groups))."""

    full: int
    slices: int
    slice_groups: int

    def __post_init__(self):
        if self.full < 0 or self.slices < 1 or self.slice_groups < 1:
            raise ValueError(f"split: full >= 0, slices >= 1, slice_groups >= 1, got {self}")


def plan_split(
    tiles: int, groups: int, sms: int, *, min_saved: int | None = None, slices: int | None = None
) -> Split | None:
    """The split of the last partial wave for ``tiles`` CTAs of ``groups`` groups each on ``sms``
    SMs (one CTA per SM), or None where there is no partial wave or it would not pay.

    The remainder r = tiles mod sms is cut into s = sms // r slices (all of them then run in one
    last wave), each ceil(G / s) groups (s lowered so that no slice is empty); it pays when the
    last wave shrinks by ``min_saved`` (default MIN_SAVED_GROUPS) groups or more
    (perfmodel.hopper_ws prices every candidate with ``min_saved=0``). ``slices``: a kernel that
    compiles its slice count in takes only that count (None where that many slices do not fit
    one wave or the groups)."""
    if tiles <= 0 or groups <= 0 or sms <= 0:
        raise ValueError(f"plan_split: tiles, groups and sms must be positive, got {tiles}, {groups}, {sms}")
    rem = tiles % sms
    if rem == 0:
        return None
    s = min(sms // rem, groups)
    if slices is not None:
        s = slices if s >= slices else 0
    if s < 2:
        return None
    per = triton.cdiv(groups, s)
    s = triton.cdiv(groups, per)  # no empty slice
    if slices is not None and s != slices:
        return None
    if groups - per < (MIN_SAVED_GROUPS if min_saved is None else min_saved):
        return None
    return Split(full=tiles - rem, slices=s, slice_groups=per)


def workspace_shape(tiles: int, split: Split, block_m: int, block_n: int) -> tuple[int, int, int, int]:
    """[remaining tiles, slices, BM, BN] fp32: slice j of tile full + q at [q, j]."""
    return (tiles - split.full, split.slices, block_m, block_n)


@triton.jit
def _sum_slices_kernel(
    ws_ptr,  # f32 [T - FULL, SLICES, BM, BN]
    bias_ptr,  # [N]
    out_ptr,  # [M, N]
    M,
    N,
    FULL,
    SLICES,
    stride_om,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPILED: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
):
    q = tl.program_id(0)  # the split tile FULL + q
    rb = tl.program_id(1)  # its rows [rb * ROWS, rb * ROWS + ROWS)
    # the GEMM's grouped tile order for tile FULL + q: GROUP_M blocks of the tile's rows sweep its
    # columns; the tile's rows are y's rows (gemm_sm90_ws.w4a4_gemm_sm90_ws_kernel) or, TRANSPOSED,
    # y's columns (gemm_sm90_w4a8's [weight rows n, tokens t] tiles, stored to y[t, n])
    t = FULL + q
    rows_total = N if TRANSPOSED else M
    cols_total = M if TRANSPOSED else N
    num_r = tl.cdiv(rows_total, BM)
    width = GROUP_M * tl.cdiv(cols_total, BN)
    first_r = (t // width) * GROUP_M
    size_r = tl.minimum(num_r - first_r, GROUP_M)
    off_r = (first_r + (t % width) % size_r) * BM
    off_c = ((t % width) // size_r) * BN
    r = rb * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BN)
    src = ws_ptr + q.to(tl.int64) * SLICES * BM * BN + r[:, None] * BN + c[None, :]
    acc = tl.load(src)  # slice 0: its groups and the low-rank branch
    for j in range(1, SLICES):  # in slice order: the same sum whichever slice finished last
        acc += tl.load(src + j * BM * BN)
    if TRANSPOSED:
        on = (off_r + r)[:, None]
        om = (off_c + c)[None, :]
    else:
        om = (off_r + r)[:, None]
        on = (off_c + c)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + on, mask=on < N, other=0.0).to(tl.float32)
    if not COMPILED:  # the interpreter's store truncates to bf16: round here, half to even
        acc = round_to(acc, out_ptr.dtype.element_ty, COMPILED)
    mask = (om < M) & (on < N)
    tl.store(out_ptr + om.to(tl.int64) * stride_om + on, acc.to(out_ptr.dtype.element_ty), mask=mask)


SUM_ROWS = 32  # rows of a tile per program of the sum (128 x 128 tiles: four programs each)


def sum_slices_args(
    workspace: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    split: Split,
    *,
    group_m: int,
    transposed: bool = False,
) -> tuple[tuple, dict, tuple]:
    """(args, kwargs, grid) of the sum for a workspace of ``workspace_shape`` (also what the
    PTX-execution test compiles); ``transposed``: the tiles are [output columns, output rows]
    in the grouped order of gemm_sm90_w4a8 (its [weight rows, tokens] accumulators)."""
    rem, slices, bm, bn = workspace.shape
    if workspace.dtype != torch.float32 or not workspace.is_contiguous() or slices != split.slices:
        raise ValueError(f"workspace must be contiguous fp32 [tiles, {split.slices}, BM, BN], got "
                         f"{workspace.dtype} {tuple(workspace.shape)}")  # fmt: skip
    m, n = out.shape
    args = (workspace, bias if bias is not None else out, out, m, n, split.full, split.slices, out.stride(0))
    kwargs = {"BM": bm, "BN": bn, "ROWS": SUM_ROWS, "GROUP_M": group_m, "HAS_BIAS": bias is not None,
              "COMPILED": not INTERPRET, "TRANSPOSED": transposed, "num_warps": 4}  # fmt: skip
    return args, kwargs, (rem, bm // SUM_ROWS)


def sum_slices(
    workspace: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    split: Split,
    *,
    group_m: int,
    transposed: bool = False,
) -> torch.Tensor:
    """Write the split tiles of ``out`` from their slices' partials (see the module docstring)."""
    args, kwargs, grid = sum_slices_args(workspace, bias, out, split, group_m=group_m, transposed=transposed)
    _sum_slices_kernel[grid](*args, **kwargs)
    return out
