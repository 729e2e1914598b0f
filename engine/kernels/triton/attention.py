"""Attention on int8 Q/K with per-block scales, V read in its source dtype: SageAttention 1.0.6's
per-block int8 kernel without its fp16 copy of V.

SageAttention's kernel (``sageattention/attn_qk_int8_per_block.py``) reads V in fp16, so its
callers write an fp16 copy of V (for FLUX: one read and one write of V per attention). This
kernel does the same arithmetic, in the same order, on V as the projection left it (bf16 or fp16,
a strided view with the last dimension contiguous, from one or two tensors joined along the
sequence) and converts each [BLOCK_N, D] tile to fp16 in registers before the PV dot (once per
CTA, the fp16 tile then staged in shared memory: see _BF16X2_TO_F16X2). The conversion is
round-to-nearest-even, what ``v.to(torch.float16)`` does, so the output is the
package's kernel's on ``v.to(float16)``, bit for bit (tests/test_int8_attention.py, against the
package's own ``forward``).

Per program: BLOCK_M = 128 queries of one (head, image); per BLOCK_N = 64 keys::

    s     = fp32(int8 q @ int8 k^T) * q_scale * k_scale      (q's scale holds D^-1/2 * log2(e))
    m_new = max(m, rowmax(s));  p = exp2(s - m_new);  alpha = exp2(m - m_new)
    l     = l * alpha + rowsum(p)
    acc   = acc * alpha + fp32(fp16(p) @ fp16(v))            (the dot accumulates in fp16)
    out   = acc / l                                          (after the last key block)

Keys past S_kv (the last block's padding where S_kv is not a multiple of 64) score -inf, so they
weigh nothing. The package's kernel loads them as 0 and scores them 0, not -inf: they count in
its ``l`` (and in its running max: where every real score of a row is below 0 its output is pulled
towards 0). That is a bug at 10 of the 22 served sizes, whose token count is not a multiple of 64
(e.g. 832x1216: 256 + 3952 = 4208 tokens), so here the result is
the package's bit for bit only where S_kv is a multiple of 64 (FLUX's 1024x1024: 4352 tokens), and
elsewhere the softmax over the real keys (tests/test_int8_attention.py). The mask is compiled in
only for those sizes (MASK_KEYS).

Two V sources (``v1`` given): rows [0, S0) come from v0, rows [S0, S_kv) from v1. Where S0 is a
multiple of BLOCK_N (FLUX's text lengths), every key block lies in one source and the kernel
runs two loops, each sage's loop with its own base pointer and stride; otherwise one loop picks
the source per row (a select per address per block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import INTERPRET
from engine.kernels.triton.common import arch_major as _major  # a module global: the kernel model patches it
from engine.quant.ops import SAGE_BLOCK_K, SAGE_BLOCK_Q

# One source; two joined at a key-block boundary (two loops); joined inside a block (row select).
ONE_SOURCE, BLOCK_JOINED, ROW_JOINED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def launch_options(head_dim: int, major: int) -> dict:
    """The package's warps (4 for D = 64, 8 for D = 128: the same MMA tiling per warp, so the same
    sums in the same order) and its stages (3 for D = 64, 4 for D = 128), except 3 for D = 128 on
    compute capability 8.x: the fp16 V tile the conversion writes to shared memory (16 KB) would
    take 4 stages past the 99 KB a block gets on sm_86/sm_89. Stages move loads, not arithmetic."""
    if head_dim == 64:
        return {"num_warps": 4, "num_stages": 3}
    return {"num_warps": 8, "num_stages": 3 if major == 8 else 4}


# bf16x2 -> fp16x2 in three instructions per pair: each half widened to fp32 exactly (a shift, a
# mask), both rounded to nearest even by one cvt.rn.f16x2.f32 (Triton's own cast extracts the high
# half with a byte permute and then shifts it: four per pair). Not pure (it has no side effect):
# Triton hoists a pure unary inline asm, like a cast, past the shared-memory load into the PV
# dot's operand layout, where every warp holds, and so converts, the whole [64, D] V tile (8x the
# work at 8 warps on sm_8x); impure, it runs once per element in the load's layout and the fp16
# tile goes through shared memory to the dot.
_BF16X2_TO_F16X2 = tl.constexpr(
    "{.reg .b32 lo, hi; shl.b32 lo, $1, 16; and.b32 hi, $1, 0xffff0000; cvt.rn.f16x2.f32 $0, hi, lo;}"
)


@triton.jit
def _to_fp16(v, PAIRS_ASM: tl.constexpr):
    """v (bf16 or fp16) in fp16, rounded to nearest even (torch's ``.to(torch.float16)``)."""
    if PAIRS_ASM:
        return tl.inline_asm_elementwise(
            _BF16X2_TO_F16X2, "=r,r", [v], dtype=tl.float16, is_pure=False, pack=2
        )
    else:
        return v.to(tl.float16)


@triton.jit
def _key_block(
    acc, l_i, m_i, q, q_scale, k8_ptr, ks_ptr, v_ptrs, v_ok, start_n, S_kv, stride_ks, offs_n, offs_d,
    PAIRS_ASM: tl.constexpr, MASK_KEYS: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_N keys: the online-softmax update of (acc, l_i, m_i)."""
    n = start_n + offs_n
    k = tl.load(
        k8_ptr + n[None, :].to(tl.int64) * stride_ks + offs_d[:, None], mask=(n < S_kv)[None, :], other=0
    )
    k_scale = tl.load(ks_ptr)
    s = tl.dot(q, k).to(tl.float32) * q_scale * k_scale  # [BM, BN]: int32 sums, then the two scales
    if MASK_KEYS:  # S_kv % BLOCK_N != 0: the padding past S_kv weighs nothing (see the module doc)
        s = tl.where((n < S_kv)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _to_fp16(tl.load(v_ptrs, mask=v_ok, other=0.0), PAIRS_ASM)  # [BN, D]: the source dtype, rounded here
    acc += tl.dot(p.to(tl.float16), v, out_dtype=tl.float16)
    return acc, l_i, m_new


@triton.jit
def int8_attention_kernel(
    q8_ptr,  # int8 [B, S_q, H, D] (any strides, last one 1)
    q_scale_ptr,  # fp32 [B, H, cdiv(S_q, BLOCK_M)] contiguous
    k8_ptr,  # int8 [B, S_kv, H, D]
    k_scale_ptr,  # fp32 [B, H, cdiv(S_kv, BLOCK_N)] contiguous
    v0_ptr,  # T [B, S0, H, D]: keys [0, S0)
    v1_ptr,  # T [B, S_kv - S0, H, D]: keys [S0, S_kv) (v0 with one source)
    out_ptr,  # [B, S_q, H, D]
    S_q,
    S_kv,
    S0,
    H,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_v0b,
    stride_v0s,
    stride_v0h,
    stride_v1b,
    stride_v1s,
    stride_v1h,
    stride_ob,
    stride_os,
    stride_oh,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_JOIN: tl.constexpr,  # ONE_SOURCE, BLOCK_JOINED or ROW_JOINED
    PAIRS_ASM: tl.constexpr,  # V is bf16 and the kernel compiled: the conversion in PTX
    MASK_KEYS: tl.constexpr,  # S_kv % BLOCK_N != 0: scores past S_kv set to -inf
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)

    q = tl.load(
        q8_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
        mask=(offs_m < S_q)[:, None],
        other=0,
    )
    q_scale = tl.load(q_scale_ptr + (b * H + h) * tl.cdiv(S_q, BLOCK_M) + pid_m)
    k8 = k8_ptr + b * stride_kb + h * stride_kh
    ks = k_scale_ptr + (b * H + h) * tl.cdiv(S_kv, BLOCK_N)
    v0 = v0_ptr + b * stride_v0b + h * stride_v0h
    v1 = v1_ptr + b * stride_v1b + h * stride_v1h

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0  # times alpha = 0 at the first block
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    if V_JOIN == ROW_JOINED:
        for start_n in range(0, S_kv, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            n = (start_n + offs_n).to(tl.int64)
            first = n < S0
            row = tl.where(first, v0 + n * stride_v0s, v1 + (n - S0) * stride_v1s)  # [BN] row pointers
            v_ptrs = row[:, None] + offs_d[None, :]
            acc, l_i, m_i = _key_block(
                acc, l_i, m_i, q, q_scale, k8, ks + start_n // BLOCK_N, v_ptrs, (n < S_kv)[:, None], start_n,
                S_kv, stride_ks, offs_n, offs_d, PAIRS_ASM, MASK_KEYS,
            )  # fmt: skip
    else:
        # keys [0, end0) from v0; with two sources then [S0, S_kv) from v1 (S0 a multiple of BLOCK_N)
        end0 = S0 if V_JOIN == BLOCK_JOINED else S_kv
        for start_n in range(0, end0, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            n = start_n + offs_n
            v_ptrs = v0 + n[:, None].to(tl.int64) * stride_v0s + offs_d[None, :]
            acc, l_i, m_i = _key_block(
                acc, l_i, m_i, q, q_scale, k8, ks + start_n // BLOCK_N, v_ptrs, (n < end0)[:, None], start_n,
                S_kv, stride_ks, offs_n, offs_d, PAIRS_ASM, MASK_KEYS,
            )  # fmt: skip
        if V_JOIN == BLOCK_JOINED:
            for start_n in range(S0, S_kv, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                n = start_n + offs_n
                v_ptrs = v1 + (n - S0)[:, None].to(tl.int64) * stride_v1s + offs_d[None, :]
                acc, l_i, m_i = _key_block(
                    acc, l_i, m_i, q, q_scale, k8, ks + start_n // BLOCK_N, v_ptrs, (n < S_kv)[:, None],
                    start_n, S_kv, stride_ks, offs_n, offs_d, PAIRS_ASM, MASK_KEYS,
                )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = (
        out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m < S_q)[:, None])


def int8_attention(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v0: torch.Tensor,
    v1: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """See engine.kernels.attention (the inputs are validated there): one launch; the output
    [B, S_q, H, D] contiguous in ``out_dtype``."""
    b, s_q, heads, d = q8.shape
    s_kv = k8.shape[1]
    s0 = v0.shape[1]
    out = torch.empty(b, s_q, heads, d, dtype=out_dtype, device=q8.device)
    if out.numel() == 0:
        return out
    if v1 is None:
        join, v1 = ONE_SOURCE.value, v0
    else:
        join = (BLOCK_JOINED if s0 % SAGE_BLOCK_K == 0 else ROW_JOINED).value
    grid = (triton.cdiv(s_q, SAGE_BLOCK_Q), heads, b)
    int8_attention_kernel[grid](
        q8,
        q_scale,
        k8,
        k_scale,
        v0,
        v1,
        out,
        s_q,
        s_kv,
        s0,
        heads,
        q8.stride(0),
        q8.stride(1),
        q8.stride(2),
        k8.stride(0),
        k8.stride(1),
        k8.stride(2),
        v0.stride(0),
        v0.stride(1),
        v0.stride(2),
        v1.stride(0),
        v1.stride(1),
        v1.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        D=d,
        BLOCK_M=SAGE_BLOCK_Q,
        BLOCK_N=SAGE_BLOCK_K,
        V_JOIN=join,
        PAIRS_ASM=v0.dtype == torch.bfloat16 and not INTERPRET,
        MASK_KEYS=s_kv % SAGE_BLOCK_K != 0,
        **launch_options(d, _major(q8.device)),
    )
    return out
