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
from engine.quant.ops import SAGE_BLOCK_K, SAGE_BLOCK_Q, sage_q_multiplier

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


# --- the same op emitting SageAttention 1.0.6's inputs: qk_norm_rope_sage --------------------------
#
# Two launches. The first, one program per (head, block of SAGE_BLOCK_Q joint tokens, image), is
# qk_norm_rope on a whole query block (rows of text and image parts mixed where a block straddles
# them), then per_block_int8's arithmetic on Q (its very ops: ``x * m``, ``max|x| / 127.``,
# ``x / scale``, ``+ 0.5 * sign``, truncation), so the compiled division is the package's own
# div.full.f32. K is written in T with its column sums per block (fp32, the tile's own reduction);
# V is not touched (the attention kernel reads it from the projection). The second, one program
# per (SAGE_K_BLOCKS key blocks, head, image), adds those sums in block order (a fixed order: no
# atomics, the same bytes every run), divides by S (IEEE, as torch's mean), rounds the mean to T,
# and quantizes T(k - mean) per SAGE_BLOCK_K tokens.

# 16 warps: a [128, D] tile at 32 fp32 values per thread and tensor, like qk_norm_rope's 32-token
# tiles at 4 warps (8 warps compile to 255 registers on sm_86; 16 to 128, no spills)
SAGE_CONFIGS: dict[int, LaunchConfig] = {9: LaunchConfig(SAGE_BLOCK_Q, 0, 16, 1), 8: LaunchConfig(SAGE_BLOCK_Q, 0, 16, 1)}
SAGE_K_CONFIGS: dict[int, LaunchConfig] = {9: LaunchConfig(4, 0, 4, 1), 8: LaunchConfig(4, 0, 4, 1)}
SAGE_INTERPRETER_K_CONFIG = LaunchConfig(2, 0, 4, 1)  # two key blocks per program: the loop is tested
SAGE_HEAD_DIMS = (64, 128)  # SageAttention's head dims that this kernel compiles (powers of two)


@triton.jit
def _sage_quant(x, mult, APPLY_MULT: tl.constexpr):
    """per_block_int8's arithmetic on one block (fp32 x): (int8 codes, fp32 scale)."""
    if APPLY_MULT:
        x = x * mult
    scale = tl.max(tl.abs(x)) / 127.0
    x = x / scale
    x += 0.5 * tl.where(x >= 0, 1, -1)
    return x.to(tl.int8), scale


@triton.jit
def qk_norm_rope_sage_kernel(
    qkv0_ptr,  # [B, S0, >= 3*H*D], last dim contiguous
    nq0_ptr,  # [D]
    nk0_ptr,
    qkv1_ptr,  # [B, S1, >= 3*H*D] (qkv0 when there is one part)
    nq1_ptr,
    nk1_ptr,
    cos_ptr,  # [S0 + S1, D]
    sin_ptr,
    q8_ptr,  # int8 [B, S, H, D]
    q_scale_ptr,  # fp32 [B, H, cdiv(S, BLOCK_Q)]
    k_ptr,  # T [B, S, H, D]: normed and rotated, for the second launch
    k_sum_ptr,  # fp32 [B, H, cdiv(S, BLOCK_Q), D]: column sums of k per query block
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
    q_mult,  # sage_q_multiplier(D), fp32
    BLOCK_Q: tl.constexpr,
    D: tl.constexpr,
    ROUND: tl.constexpr,
    TWO_PARTS: tl.constexpr,
    COMPILED: tl.constexpr,
):
    h = tl.program_id(0)  # fastest: a token block's heads run together and share cos/sin in L2
    blk = tl.program_id(1)
    b = tl.program_id(2)
    S = S0 + S1
    n_blk = tl.num_programs(1)
    d = tl.arange(0, D)
    s = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)  # joint token index
    s64 = s.to(tl.int64)
    ok = (s < S)[:, None]
    w_offs = d[None, :] + 0 * s[:, None]  # [BQ, D]: the weights in the tile's own layout
    b64 = b.to(tl.int64)
    row0 = qkv0_ptr + b64 * stride_b0 + s64 * stride_s0
    if TWO_PARTS:
        first = s < S0
        row = tl.where(first, row0, qkv1_ptr + b64 * stride_b1 + (s64 - S0) * stride_s1)
        nq = tl.where(first[:, None], nq0_ptr + w_offs, nq1_ptr + w_offs)
        nk = tl.where(first[:, None], nk0_ptr + w_offs, nk1_ptr + w_offs)
    else:
        row = row0
        nq = nq0_ptr + w_offs
        nk = nk0_ptr + w_offs
    src = row[:, None] + h * D + d[None, :]
    c = tl.load(cos_ptr + s64[:, None] * stride_cs + d[None, :], mask=ok, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + s64[:, None] * stride_ss + d[None, :], mask=ok, other=0.0).to(tl.float32)
    dst = ((b64 * S + s64[:, None]) * H + h) * D + d[None, :]  # [B, S, H, D]
    bh_blk = (b * H + h) * n_blk + blk

    x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    q = _norm_rope(x, tl.load(nq).to(tl.float32), c, sn, eps, BLOCK_Q, D, ROUND, COMPILED)
    q8, q_scale = _sage_quant(q, q_mult, True)  # rows past S are 0, as per_block_int8's masked load
    tl.store(q8_ptr + dst, q8, mask=ok)
    tl.store(q_scale_ptr + bh_blk, q_scale)

    x = tl.load(src + H * D, mask=ok, other=0.0).to(tl.float32)
    k = _norm_rope(x, tl.load(nk).to(tl.float32), c, sn, eps, BLOCK_Q, D, ROUND, COMPILED)
    tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=ok)
    tl.store(k_sum_ptr + bh_blk.to(tl.int64) * D + d, tl.sum(k, axis=0))


@triton.jit
def sage_k_quant_kernel(
    k_ptr,  # T [B, S, H, D]
    k_sum_ptr,  # fp32 [B, H, n_sums, D]
    k8_ptr,  # int8 [B, S, H, D]
    k_scale_ptr,  # fp32 [B, H, cdiv(S, BLOCK_K)]
    S,
    H,
    n_sums,
    BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr,  # key blocks per program
    D: tl.constexpr,
    ROUND: tl.constexpr,
    COMPILED: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    d = tl.arange(0, D)
    bh = b * H + h
    total = tl.zeros([D], dtype=tl.float32)
    sums = k_sum_ptr + bh.to(tl.int64) * n_sums * D + d
    for t in range(0, n_sums):  # block order: the same sum on every run
        total += tl.load(sums + t * D)
    mean = _round(tl.div_rn(total, S.to(tl.float32)), ROUND, COMPILED)  # T(k.mean(dim=1))
    n_kblk = tl.cdiv(S, BLOCK_K)
    for j in tl.static_range(K_BLOCKS):
        blk = pid * K_BLOCKS + j
        if blk < n_kblk:  # the last program's blocks past S do nothing
            s = blk * BLOCK_K + tl.arange(0, BLOCK_K)
            ok = (s < S)[:, None]
            offs = ((b.to(tl.int64) * S + s.to(tl.int64)[:, None]) * H + h) * D + d[None, :]
            k = tl.load(k_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            k = tl.where(ok, _round(k - mean[None, :], ROUND, COMPILED), 0.0)  # T(k - mean); 0 past S
            k8, k_scale = _sage_quant(k, 1.0, False)  # per_block_int8's sm_scale=1.0: x * 1.0 is x
            tl.store(k8_ptr + offs, k8, mask=ok)
            tl.store(k_scale_ptr + bh * n_kblk + blk, k_scale)


def sage_config(major: int) -> LaunchConfig:
    """The first launch's config for an architecture (block_m: the query block, fixed by sage)."""
    return SAGE_CONFIGS[9 if major >= 9 else 8]


def sage_k_config(major: int) -> LaunchConfig:
    """The second launch's config (block_m: key blocks per program)."""
    if INTERPRET:
        return SAGE_INTERPRETER_K_CONFIG
    return SAGE_K_CONFIGS[9 if major >= 9 else 8]


def launch_norm_rope_sage(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first launch: (q8, q_scale [B, H, nbq, 1], k [B, S, H, D] in T, k_sum [B, H, nbq, D])."""
    d = norm_q0.shape[0]
    if d not in SAGE_HEAD_DIMS:
        raise ValueError(f"norm_q0: the head dim D={d} must be one of {SAGE_HEAD_DIMS} for qk_norm_rope_sage")
    if qkv0.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"parts[0] qkv must be bfloat16 or float16 for qk_norm_rope_sage, got {qkv0.dtype}")
    two = qkv1 is not None
    qkv0 = _row_major(qkv0)
    qkv1 = _row_major(qkv1) if two else qkv0
    cos, sin = _row_major(cos), _row_major(sin)
    b, s0 = qkv0.shape[:2]
    s1 = qkv1.shape[1] if two else 0
    s = s0 + s1
    dev = qkv0.device
    nbq = triton.cdiv(s, SAGE_BLOCK_Q)
    q8 = torch.empty(b, s, heads, d, dtype=torch.int8, device=dev)
    q_scale = torch.empty(b, heads, nbq, 1, dtype=torch.float32, device=dev)
    k = torch.empty(b, s, heads, d, dtype=qkv0.dtype, device=dev)
    k_sum = torch.empty(b, heads, nbq, d, dtype=torch.float32, device=dev)
    if b == 0 or s == 0 or heads == 0:
        return q8, q_scale, k, k_sum
    cfg = sage_config(_major(dev))
    qk_norm_rope_sage_kernel[(heads, nbq, b)](
        qkv0,
        norm_q0.contiguous(),
        norm_k0.contiguous(),
        qkv1,
        (norm_q1 if two else norm_q0).contiguous(),
        (norm_k1 if two else norm_k0).contiguous(),
        cos,
        sin,
        q8,
        q_scale,
        k,
        k_sum,
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
        sage_q_multiplier(d),
        BLOCK_Q=SAGE_BLOCK_Q,
        D=d,
        ROUND=_ROUND[qkv0.dtype],
        TWO_PARTS=two,
        COMPILED=not INTERPRET,
        enable_fp_fusion=False,
        **cfg.launch_options(),
    )
    return q8, q_scale, k, k_sum


def launch_sage_k_quant(k: torch.Tensor, k_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second launch: k [B, S, H, D] (T) and its block sums -> k8 int8, k_scale [B, H, nbk, 1]."""
    b, s, heads, d = k.shape
    nbk = triton.cdiv(s, SAGE_BLOCK_K)
    k8 = torch.empty(b, s, heads, d, dtype=torch.int8, device=k.device)
    k_scale = torch.empty(b, heads, nbk, 1, dtype=torch.float32, device=k.device)
    if k.numel() == 0:
        return k8, k_scale
    cfg = sage_k_config(_major(k.device))
    sage_k_quant_kernel[(triton.cdiv(nbk, cfg.block_m), heads, b)](
        k,
        k_sum,
        k8,
        k_scale,
        s,
        heads,
        k_sum.shape[2],
        BLOCK_K=SAGE_BLOCK_K,
        K_BLOCKS=cfg.block_m,
        D=d,
        ROUND=_ROUND[k.dtype],
        COMPILED=not INTERPRET,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return k8, k_scale


def qk_norm_rope_sage(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See engine.kernels.contract: two launches; inputs validated by the caller."""
    q8, q_scale, k, k_sum = launch_norm_rope_sage(
        qkv0, norm_q0, norm_k0, qkv1, norm_q1, norm_k1, cos, sin, heads=heads, eps=eps
    )
    k8, k_scale = launch_sage_k_quant(k, k_sum)
    return q8, q_scale, k8, k_scale
