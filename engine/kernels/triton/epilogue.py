"""The W4A4 GEMM's partial/gate/residual epilogue as one elementwise pass over an fp32 sum.

Why: Hopper's FP8 GEMMs (gemm_sm90, gemm_sm90_ws) write their sum in fp32 where the call carries
the epilogue; run as the reference's torch ops (engine.quant.ops.gemm_epilogue) that is several
eager passes inside the custom op, where torch.compile cannot fuse them. This kernel reads the
fp32 sum, ``partial``, ``residual`` and ``gate`` once and writes the output once, with exactly the
reference's roundings: partial added in fp32, then one rounding to the output dtype, or the
gate/residual's three (the linear's output, ``gate * y``, ``residual + ...``), each computed in
fp32. The product is a ``mul.rn`` (common.mul_rn), never contracted into an FMA with the sum, so
product and sum stay two fp32 roundings for fp32 outputs too, as the reference's two torch ops are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import INTERPRET, mul_rn, narrow, round_to, row_major, widen

BLOCK_M = 16
BLOCK_N = 256
NUM_WARPS = 4
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def gemm_epilogue_kernel(
    acc_ptr,  # fp32 [M, N], row stride stride_m
    partial_ptr,  # out dtype [M, N] (stride_m) or unused
    residual_ptr,  # out dtype [M, N] (stride_m) or unused
    gate_ptr,  # out dtype [B, N], row stride stride_gate
    out_ptr,  # out dtype [M, N] (stride_m)
    M,
    N,
    stride_m,
    stride_gate,
    rows_per_gate,  # M // B
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    GATED: tl.constexpr,
    COMPILED: tl.constexpr,  # False in the interpreter (see common.round_to, common.mul_rn)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * stride_m + cols[None, :]
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_PARTIAL:
        y = y + widen(tl.load(partial_ptr + offs, mask=mask, other=0.0), COMPILED)
    out_ty = out_ptr.dtype.element_ty
    if GATED:
        g_offs = (rows // rows_per_gate)[:, None].to(tl.int64) * stride_gate + cols[None, :]
        g = widen(tl.load(gate_ptr + g_offs, mask=mask, other=0.0), COMPILED)
        res = widen(tl.load(residual_ptr + offs, mask=mask, other=0.0), COMPILED)
        y16 = round_to(y, out_ty, COMPILED)  # the linear's output
        prod = round_to(mul_rn(g, y16, COMPILED), out_ty, COMPILED)  # gate * y, rounded
        y = res + prod
    tl.store(out_ptr + offs, narrow(y, out_ty, COMPILED), mask=mask)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Any float dtype is read as the reference reads it (``.float()``); the contract's is out_dtype."""
    if tuple(t.shape) != shape or t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be a float tensor of shape {list(shape)}, got {t.dtype} {list(t.shape)}")


def launch(
    acc: torch.Tensor,  # fp32 [M, N]: the GEMM's sum, low-rank branch and bias, unrounded
    partial: torch.Tensor | None,  # [M, N] out_dtype
    residual: torch.Tensor | None,  # [M, N] out_dtype
    gate: torch.Tensor | None,  # [B, N] out_dtype, B divides M; needed with residual
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [M, N] out_dtype, row-major
    """engine.quant.ops.gemm_epilogue in one kernel (bit for bit; a new output tensor)."""
    if acc.dim() != 2 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be a 2-D float32 tensor, got {acc.dtype} {list(acc.shape)}")
    if out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype must be one of {_DTYPES}, got {out_dtype}")
    m, n = acc.shape
    if partial is not None:
        _check("partial", partial, (m, n))
    if residual is not None:
        if gate is None:
            raise ValueError("gate is required with residual")
        _check("residual", residual, (m, n))
        b = gate.shape[0] if gate.dim() == 2 else 0
        if gate.dim() != 2 or gate.shape[1] != n or gate.dtype not in _DTYPES or b == 0 or m % b:
            raise ValueError(f"gate must be a float [B, {n}] tensor with B dividing M={m}, got {gate.dtype} {list(gate.shape)}")
    out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return out
    acc = acc.contiguous()  # acc, partial, residual and out share one row stride (contiguous [M, N])
    gated = residual is not None
    if gated:
        residual, gate = residual.contiguous(), row_major(gate)
    if partial is not None:
        partial = partial.contiguous()
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    gemm_epilogue_kernel[grid](
        acc,
        partial if partial is not None else acc,  # unused pointers: acc's, never read
        residual if gated else acc,
        gate if gated else acc,
        out,
        m,
        n,
        n,
        gate.stride(0) if gated else 0,
        m // gate.shape[0] if gated else 1,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        HAS_PARTIAL=partial is not None,
        GATED=gated,
        COMPILED=not INTERPRET,
        num_warps=NUM_WARPS,
    )
    return out


def bytes_moved(m: int, n: int, out_dtype: torch.dtype, partial: bool, gated: bool, gate_rows: int = 1) -> int:
    """DRAM bytes of one launch: the fp32 sum, partial, residual and gate read once, the output
    written once (what the image model prices as one pass)."""
    e = torch.empty(0, dtype=out_dtype).element_size()
    return m * n * (4 + e) + (m * n * e if partial else 0) + ((m * n + gate_rows * n) * e if gated else 0)
