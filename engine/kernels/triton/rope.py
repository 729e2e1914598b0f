"""Fused q/k RMSNorm + RoPE + joint (text, image) concatenation: the attention prologue.

Replaces diffusers' glue between the q/k/v projections and attention in a FLUX block (per
double block: 4 RMSNorms of 6 launches, RoPE's 5 launches for q and for k, 3 cats) by one
launch. One program per (head, block of BLOCK_S tokens, image): it reads its q, k and v tiles
once from the projection output (a strided view is fine: only the last dimension must be
contiguous), writes q, k, v once in [B, S_total, H, D], and keeps every intermediate in fp32
registers, rounded where FluxAttnProcessor's ops round (see engine.kernels.rope for the arithmetic):

    r  = rsqrt(sum(x^2) / D + eps)            fp32 (D a power of two: the 1/D scaling is exact)
    n  = RN_T(RN(x * r) * w)                   T = the input dtype (torch.rms_norm's roundings)
    y  = RN_T(RN(n * cos) + RN(rot(n) * sin))  rot(n) = (-n1, n0, -n3, n2, ...)

Compiled with ``enable_fp_fusion=False``: diffusers' eager ops round every product before the
sum, and an FMA would not. ``rsqrt`` is ``tl.math.rsqrt``: on the GPU libdevice's rsqrtf (the
instruction torch's CUDA rsqrt uses), under the interpreter ``1 / sqrt`` rounded twice (what
torch's CPU rsqrt computes). The one freedom left is the order of the fp32 sum of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import INTERPRET, LaunchConfig
from engine.kernels.triton.common import arch_major as _major  # a module global: the kernel model patches it
from engine.kernels.triton.common import row_major as _row_major

# block_m = tokens per program (block_n unused); one program per (head, token block, image).
ROPE_CONFIGS: dict[int, LaunchConfig] = {9: LaunchConfig(32, 0, 4, 1), 8: LaunchConfig(32, 0, 4, 1)}
INTERPRETER_CONFIG = LaunchConfig(16, 0, 4, 1)
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rope_config(major: int) -> LaunchConfig:
    """The launch config for an architecture (compute-capability major)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    return ROPE_CONFIGS[9 if major >= 9 else 8]


def check_head_dim(d: int) -> None:
    """Head sizes the kernel compiles for: powers of two >= 16 (``tl.arange``), checked on every
    device so that a CPU test fails where a GPU compile would."""
    if d < 16 or d & (d - 1):
        raise ValueError(f"norm_q0: the head dim D={d} must be a power of two >= 16 for the triton backend")


@triton.jit
def _round(x, ROUND: tl.constexpr, COMPILED: tl.constexpr):
    """fp32 ``x`` rounded (to nearest even) to the output dtype's precision, kept in fp32."""
    if ROUND == 1:
        if COMPILED:
            return x.to(tl.bfloat16).to(tl.float32)
        # The interpreter's fp32 -> bf16 cast rounds half up and drops the mantissa carry
        # (triton 3.6): round the bits here instead.
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _norm_rope(
    x, w, c, s, eps, BLOCK_S: tl.constexpr, D: tl.constexpr, ROUND: tl.constexpr, COMPILED: tl.constexpr
):
    """torch.rms_norm then diffusers' apply_rotary_emb(use_real_unbind_dim=-1) of one [BLOCK_S, D] tile."""
    var = tl.sum(x * x, axis=1) * (1.0 / D)  # [BS] mean of squares, fp32
    r = tl.math.rsqrt(var + eps)
    n = _round((x * r[:, None]) * w, ROUND, COMPILED)
    n_re, n_im = tl.split(tl.reshape(n, (BLOCK_S, D // 2, 2)))
    rot = tl.reshape(tl.join(-n_im, n_re), (BLOCK_S, D))  # (-n1, n0, -n3, n2, ...)
    return _round(n * c + rot * s, ROUND, COMPILED)


@triton.jit
def _part_tile(
    qkv_ptr,
    nq_ptr,
    nk_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    b,
    h,
    s_loc,  # [BS] token index within the part
    s_glob,  # [BS] token index in the joint sequence
    S_part,
    S_total,
    stride_b,
    stride_s,
    stride_cs,
    stride_ss,
    H,
    eps,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    ROUND: tl.constexpr,
    COMPILED: tl.constexpr,
):
    d = tl.arange(0, D)
    ok = (s_loc < S_part)[:, None]
    hd = H * D
    src = qkv_ptr + b.to(tl.int64) * stride_b + s_loc.to(tl.int64)[:, None] * stride_s + h * D + d[None, :]
    s64 = s_glob.to(tl.int64)[:, None]
    c = tl.load(cos_ptr + s64 * stride_cs + d[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + s64 * stride_ss + d[None, :], mask=ok, other=0.0).to(tl.float32)
    dst = ((b.to(tl.int64) * S_total + s64) * H + h) * D + d[None, :]  # [B, S_total, H, D]
    ty = q_ptr.dtype.element_ty
    x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    w_offs = d[None, :] + 0 * s_loc[:, None]  # [BS, D]: the weight in the tile's own layout
    w = tl.load(nq_ptr + w_offs).to(tl.float32)  # (vector loads from L1, no shared-memory broadcast)
    tl.store(q_ptr + dst, _norm_rope(x, w, c, s, eps, BLOCK_S, D, ROUND, COMPILED).to(ty), mask=ok)
    x = tl.load(src + hd, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(nk_ptr + w_offs).to(tl.float32)
    tl.store(k_ptr + dst, _norm_rope(x, w, c, s, eps, BLOCK_S, D, ROUND, COMPILED).to(ty), mask=ok)
    tl.store(v_ptr + dst, tl.load(src + 2 * hd, mask=ok), mask=ok)


@triton.jit
def qk_norm_rope_kernel(
    qkv0_ptr,  # [B, S0, >= 3*H*D], last dim contiguous
    nq0_ptr,  # [D]
    nk0_ptr,  # [D]
    qkv1_ptr,  # [B, S1, >= 3*H*D] (qkv0 when there is one part)
    nq1_ptr,
    nk1_ptr,
    cos_ptr,  # [S0 + S1, D]
    sin_ptr,
    q_ptr,  # [B, S0 + S1, H, D] contiguous
    k_ptr,
    v_ptr,
    S0,
    S1,
    stride_b0,
    stride_s0,
    stride_b1,
    stride_s1,
    stride_cs,
    stride_ss,
    H,
    eps,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    ROUND: tl.constexpr,
    TWO_PARTS: tl.constexpr,
    COMPILED: tl.constexpr,
):
    h = tl.program_id(0)  # fastest: a token block's heads run together and share cos/sin in L2
    blk = tl.program_id(1)  # token blocks of part 0, then of part 1
    b = tl.program_id(2)
    S_total = S0 + S1
    rows = tl.arange(0, BLOCK_S)
    nb0 = tl.cdiv(S0, BLOCK_S)
    if TWO_PARTS:
        if blk >= nb0:
            s_loc = (blk - nb0) * BLOCK_S + rows
            _part_tile(
                qkv1_ptr, nq1_ptr, nk1_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, b, h, s_loc, S0 + s_loc,
                S1, S_total, stride_b1, stride_s1, stride_cs, stride_ss, H, eps, BLOCK_S, D, ROUND, COMPILED,
            )  # fmt: skip
        else:
            s_loc = blk * BLOCK_S + rows
            _part_tile(
                qkv0_ptr, nq0_ptr, nk0_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, b, h, s_loc, s_loc,
                S0, S_total, stride_b0, stride_s0, stride_cs, stride_ss, H, eps, BLOCK_S, D, ROUND, COMPILED,
            )  # fmt: skip
    else:
        s_loc = blk * BLOCK_S + rows
        _part_tile(
            qkv0_ptr, nq0_ptr, nk0_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, b, h, s_loc, s_loc,
            S0, S_total, stride_b0, stride_s0, stride_cs, stride_ss, H, eps, BLOCK_S, D, ROUND, COMPILED,
        )  # fmt: skip


def qk_norm_rope(
    qkv0: torch.Tensor,
    norm_q0: torch.Tensor,
    norm_k0: torch.Tensor,
    qkv1: torch.Tensor | None,
    norm_q1: torch.Tensor | None,
    norm_k1: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See engine.kernels.contract: one launch for both parts; inputs validated by the caller."""
    d = norm_q0.shape[0]
    check_head_dim(d)
    two = qkv1 is not None
    qkv0 = _row_major(qkv0)
    qkv1 = _row_major(qkv1) if two else qkv0
    cos, sin = _row_major(cos), _row_major(sin)
    b, s0 = qkv0.shape[:2]
    s1 = qkv1.shape[1] if two else 0
    q, k, v = (torch.empty(b, s0 + s1, heads, d, dtype=qkv0.dtype, device=qkv0.device) for _ in range(3))
    if b == 0 or s0 + s1 == 0 or heads == 0:
        return q, k, v
    cfg = rope_config(_major(qkv0.device))
    bs = cfg.block_m
    grid = (heads, triton.cdiv(s0, bs) + (triton.cdiv(s1, bs) if two else 0), b)
    qk_norm_rope_kernel[grid](
        qkv0,
        norm_q0.contiguous(),
        norm_k0.contiguous(),
        qkv1,
        (norm_q1 if two else norm_q0).contiguous(),
        (norm_k1 if two else norm_k0).contiguous(),
        cos,
        sin,
        q,
        k,
        v,
        s0,
        s1,
        qkv0.stride(0),
        qkv0.stride(1),
        qkv1.stride(0),
        qkv1.stride(1),
        cos.stride(0),
        sin.stride(0),
        heads,
        float(eps),
        BLOCK_S=bs,
        D=d,
        ROUND=_ROUND[qkv0.dtype],
        TWO_PARTS=two,
        COMPILED=not INTERPRET,
        enable_fp_fusion=False,
        **cfg.launch_options(),
    )
    return q, k, v
