"""Triton backend: fused activation quantization and the W4A4 GEMM on int8 tensor cores.

Portable across sm_80, sm_86, sm_89 and sm_90: Triton has no 4-bit dot, so codes are unpacked
to int8 in registers and multiplied with ``tl.dot(..., out_dtype=int32)`` (int8 MMA), one
group of 64 channels at a time; the group's integer sum is scaled and added to an fp32
accumulator. Deterministic: every output element is reduced by one program in a fixed order,
with no atomics, so the same inputs give the same bytes on every run.

Exactness against the reference: divisions use ``tl.div_rn`` (IEEE round-to-nearest) and
rounding is half-to-even (libdevice ``rint`` on the GPU; the interpreter, which has no libdevice,
uses the exact 1.5 * 2^23 trick, valid for |v| < 2^22), so the codes match the reference bit
for bit. The low-rank products use
``tl.dot`` on fp32 inputs (TF32 on tensor cores), within the float tolerance of the tests.

The kernels run inside the dispatch's custom ops (``torch.ops.svdq.*``, engine/kernels), so
``torch.compile`` sees one opaque op per call and CUDA graphs capture the launches.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported), which is
how CI tests them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

NAME = "triton"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_RINT_MAGIC = 12582912.0  # 1.5 * 2^23: (v + m) - m rounds v half-to-even in fp32


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if _INTERPRET:
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return None if major >= 8 else f"needs compute capability 8.0 or newer, this GPU is {major}.{minor}"
    if device.type == "cpu" and _INTERPRET:
        return None
    return "it runs on CUDA GPUs, or on the CPU only under TRITON_INTERPRET=1 (set before import)"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# --- quantize_act ----------------------------------------------------------------------------


@triton.jit
def _quantize_act_kernel(
    x_ptr,
    smooth_ptr,
    down_ptr,  # [M, K], [K], [R, K]
    qx_ptr,
    ascales_ptr,
    lora_ptr,  # [M, K/2] u8, [M, G] f32, [M, R] f32
    M,
    K,
    R,
    shift,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr,
    UNSIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    LIBDEVICE_RINT: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    j = tl.arange(0, HALF)  # pair index within a group: channels 2j (low nibble) and 2j+1
    rr = tl.arange(0, BLOCK_R)
    lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_groups = K // GROUP
    for g in range(n_groups):
        k_even = g * GROUP + 2 * j
        x_e = tl.load(x_ptr + rows[:, None] * K + k_even[None, :], mask=row_ok[:, None], other=0.0)
        x_o = tl.load(x_ptr + rows[:, None] * K + k_even[None, :] + 1, mask=row_ok[:, None], other=0.0)
        s_e = tl.load(smooth_ptr + k_even).to(tl.float32)
        s_o = tl.load(smooth_ptr + k_even + 1).to(tl.float32)
        h_e = tl.div_rn(x_e.to(tl.float32) + shift, s_e[None, :])  # x_hat, even channels
        h_o = tl.div_rn(x_o.to(tl.float32) + shift, s_o[None, :])
        if UNSIGNED:
            top = tl.maximum(tl.maximum(tl.max(h_e, axis=1), tl.max(h_o, axis=1)), 0.0)
            scale = tl.div_rn(top, 15.0)
            lo, hi = 0.0, 15.0
        else:
            top = tl.maximum(tl.max(tl.abs(h_e), axis=1), tl.max(tl.abs(h_o), axis=1))
            scale = tl.div_rn(top, 7.0)
            lo, hi = -8.0, 7.0
        ok = scale > 0
        denom = tl.where(ok, scale, 1.0)[:, None]
        if LIBDEVICE_RINT:
            q_e = libdevice.rint(tl.div_rn(h_e, denom))
            q_o = libdevice.rint(tl.div_rn(h_o, denom))
        else:  # the interpreter has no libdevice
            q_e = (tl.div_rn(h_e, denom) + _RINT_MAGIC) - _RINT_MAGIC
            q_o = (tl.div_rn(h_o, denom) + _RINT_MAGIC) - _RINT_MAGIC
        q_e = tl.where(ok[:, None], tl.minimum(tl.maximum(q_e, lo), hi), 0.0).to(tl.int32)
        q_o = tl.where(ok[:, None], tl.minimum(tl.maximum(q_o, lo), hi), 0.0).to(tl.int32)
        packed = ((q_e & 0xF) | ((q_o & 0xF) << 4)).to(tl.uint8)
        tl.store(qx_ptr + rows[:, None] * (K // 2) + g * HALF + j[None, :], packed, mask=row_ok[:, None])
        tl.store(ascales_ptr + rows * n_groups + g, scale, mask=row_ok)
        if HAS_LORA:
            r_ok = rr[:, None] < R
            d_e = tl.load(down_ptr + rr[:, None] * K + k_even[None, :], mask=r_ok, other=0.0).to(tl.float32)
            d_o = tl.load(down_ptr + rr[:, None] * K + k_even[None, :] + 1, mask=r_ok, other=0.0).to(
                tl.float32
            )
            lora += tl.dot(h_e, tl.trans(d_e)) + tl.dot(h_o, tl.trans(d_o))
    if HAS_LORA:
        tl.store(lora_ptr + rows[:, None] * R + rr[None, :], lora, mask=row_ok[:, None] & (rr[None, :] < R))


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    *,
    group_size: int,
    unsigned: bool,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    m, k = x.shape
    r = proj_down.shape[0]
    qx = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    ascales = torch.empty(m, k // group_size, dtype=torch.float32, device=x.device)
    lora_act = torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return qx, ascales, lora_act
    block_m = 16 if _INTERPRET else 32
    _quantize_act_kernel[(triton.cdiv(m, block_m),)](
        x,
        smooth.contiguous(),
        proj_down.contiguous(),
        qx,
        ascales,
        lora_act,
        m,
        k,
        r,
        shift,
        BLOCK_M=block_m,
        BLOCK_R=_block_r(r),
        GROUP=group_size,
        UNSIGNED=unsigned,
        HAS_LORA=r > 0,
        LIBDEVICE_RINT=not _INTERPRET,
        num_warps=4,
    )
    return qx, ascales, lora_act


# --- w4a4_gemm -------------------------------------------------------------------------------


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (256, 128, 8, 3),
            (128, 128, 4, 4),
            (64, 128, 4, 4),
            (128, 64, 4, 4),
            (64, 64, 4, 4),
        ]
    ]


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R"], cache_results=True)
@triton.jit
def _w4a4_gemm_kernel(
    qx_ptr,
    ascales_ptr,
    qw_ptr,
    wscales_ptr,  # [M, K/2] u8, [M, G] f32, [N, K/2] u8, [N, G]
    lora_ptr,
    up_ptr,
    bias_ptr,
    out_ptr,  # [M, R] f32, [N, R], [N], [M, N]
    M,
    N,
    K,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr,
    UNSIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    j = tl.arange(0, HALF)
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(n_groups):
        px = tl.load(qx_ptr + rows[:, None] * (K // 2) + g * HALF + j[None, :], mask=row_ok[:, None], other=0)
        pw = tl.load(qw_ptr + cols[:, None] * (K // 2) + g * HALF + j[None, :], mask=col_ok[:, None], other=0)
        # Low nibbles hold the even channels, high nibbles the odd ones: a dot product does not
        # care about channel order, so each half is multiplied with its twin and summed.
        x_lo, x_hi = (px & 0xF).to(tl.int8), (px >> 4).to(tl.int8)
        if not UNSIGNED:
            x_lo, x_hi = (x_lo ^ 8) - 8, (x_hi ^ 8) - 8
        w_lo, w_hi = ((pw & 0xF).to(tl.int8) ^ 8) - 8, ((pw >> 4).to(tl.int8) ^ 8) - 8
        dot = tl.dot(x_lo, tl.trans(w_lo), out_dtype=tl.int32)
        dot += tl.dot(x_hi, tl.trans(w_hi), out_dtype=tl.int32)  # [BM, BN], exact
        sa = tl.load(ascales_ptr + rows * n_groups + g, mask=row_ok, other=0.0)
        sw = tl.load(wscales_ptr + cols * n_groups + g, mask=col_ok, other=0.0).to(tl.float32)
        acc += dot.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        la = tl.load(
            lora_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0
        )
        up = tl.load(
            up_ptr + cols[:, None] * R + rr[None, :], mask=col_ok[:, None] & (rr[None, :] < R), other=0.0
        )
        acc += tl.dot(la, tl.trans(up.to(tl.float32)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


def w4a4_gemm(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    unsigned: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    m, half_k = qx.shape
    n, k, r = qweight.shape[0], 2 * half_k, lora_act.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _w4a4_gemm_kernel[grid](
        qx.contiguous(),
        ascales.float().contiguous(),
        qweight.contiguous(),
        wscales.contiguous(),
        lora_act.float().contiguous(),
        proj_up.contiguous(),
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        r,
        BLOCK_R=_block_r(r),
        GROUP=k // ascales.shape[1],
        UNSIGNED=unsigned,
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
    )
    return out
