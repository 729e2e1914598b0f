"""q/k RMSNorm + RoPE + the joint (text, image) concatenation as one op: ``qk_norm_rope``.

Between a FLUX block's q/k/v projections and attention, diffusers' FluxAttnProcessor runs 37
small launches per double block in fp32 (4 RMSNorms of 6 ops, RoPE's 5 ops for q and for k, 3
cats) and 51 in bf16 (14 dtype conversions more; tests/test_qk_norm_rope.py counts them). ``qk_norm_rope`` does the same arithmetic in one op (``torch.ops.svdq.qk_norm_rope``,
with a fake implementation so torch.compile traces through it), with the arithmetic of
diffusers 0.42.1's FluxAttnProcessor, rounding for rounding: per part, that part's norms (the
modules FluxAttention builds are ``torch.nn.RMSNorm``, i.e. torch.rms_norm, which rounds once;
diffusers' own RMSNorm class would round to T before the weight too, and differs in about a
quarter of bf16 outputs), then the parts concatenated, then models/embeddings.py
apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1)::

    var = mean(fp32(x)^2)                         fp32, over the head dim D
    n   = T(fp32(x) * rsqrt(var + eps) * w)       T = x's dtype; fp32 products, one rounding
    y   = T(fp32(n) * cos + fp32(rot(n)) * sin)   rot(n) = (-n1, n0, -n3, n2, ...); each
                                                  product and the sum rounded to fp32 (no FMA)

Backends: ``reference`` (engine.quant.ops.qk_norm_rope: the very torch ops, in FluxAttnProcessor's order) and
``triton`` (one launch, engine/kernels/triton/rope.py). The CUDA extension has no such kernel:
where it serves the W4A4 ops this op runs on Triton (``kernels.op_backend_for``).

``qk_norm_rope_sage`` (``torch.ops.svdq.qk_norm_rope_sage``) is the same op for SageAttention: it
emits the int8 Q and K with their per-block scales; V is left where the projection wrote it
(``kernels.sage_attention_int8`` reads it there, bf16, converting in registers), so the 16-bit
q and v are never written and K's mean is taken from per-block sums the rope kernel already
has (one small pass over K remains: its quantization needs the mean over the whole sequence).
"""

from __future__ import annotations

import torch

from engine import kernels as _kernels
from engine.quant.ops import SAGE_BLOCK_K, SAGE_BLOCK_Q

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- the public wrapper ------------------------------------------------------------------------


def _check_tensor(name: str, t: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of parts[0]'s qkv ({dtype}), got {t.dtype}")
    return t


def _flatten(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> list[torch.Tensor | None]:
    """The op's first six arguments from ``parts``, every input checked (errors name the field)."""
    if not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2):
        raise ValueError(f"parts must be a list of 1 or 2 (qkv, norm_q, norm_k) tuples, got {parts!r:.80}")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    flat: list[torch.Tensor | None] = []
    d = b = None
    s_total = 0
    for i, part in enumerate(parts):
        if not isinstance(part, (list, tuple)) or len(part) != 3:
            raise ValueError(f"parts[{i}] must be a (qkv, norm_q, norm_k) tuple, got {type(part).__name__}")
        qkv, norm_q, norm_k = part
        dtype = _check_tensor("parts[0] qkv", parts[0][0]).dtype
        _check_tensor(f"parts[{i}] qkv", qkv, dtype)
        _check_tensor(f"parts[{i}] norm_q", norm_q, dtype)
        _check_tensor(f"parts[{i}] norm_k", norm_k, dtype)
        if norm_q.dim() != 1:
            raise ValueError(f"parts[{i}] norm_q must have shape [D], got {list(norm_q.shape)}")
        d = d or norm_q.shape[0]
        if d % 2 or norm_q.shape[0] != d:
            raise ValueError(
                f"parts[{i}] norm_q must have shape [D] with D even and one D, got {list(norm_q.shape)}"
            )
        if tuple(norm_k.shape) != (d,):
            raise ValueError(f"parts[{i}] norm_k must have shape [{d}], got {list(norm_k.shape)}")
        if qkv.dim() != 3 or qkv.shape[2] < 3 * heads * d or (b is not None and qkv.shape[0] != b):
            raise ValueError(
                f"parts[{i}] qkv must have shape [B, S_i, >= 3*heads*D = {3 * heads * d}] with one B, "
                f"got {list(qkv.shape)}"
            )
        if qkv.stride(2) != 1:
            raise ValueError(
                f"parts[{i}] qkv's last dimension must have stride 1, got strides {qkv.stride()}"
            )
        for name, t in (("qkv", qkv), ("norm_q", norm_q), ("norm_k", norm_k)):
            if t.device != parts[0][0].device:
                raise ValueError(f"parts[{i}] {name} must be on parts[0] qkv's device, got {t.device}")
        b = qkv.shape[0]
        s_total += qkv.shape[1]
        flat += [qkv, norm_q, norm_k]
    for name, t in (("cos", cos), ("sin", sin)):
        _check_tensor(name, t)
        if t.device != parts[0][0].device:
            raise ValueError(f"{name} must be on parts[0] qkv's device {parts[0][0].device}, got {t.device}")
        if tuple(t.shape) != (s_total, d):
            raise ValueError(f"{name} must have shape [S_total, D] = [{s_total}, {d}], got {list(t.shape)}")
    flat += [None] * (6 - len(flat))
    return flat


def qk_norm_rope(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k RMSNorm-ed (each part with its own weights) and rotated, v re-laid out; the parts
    joined along the sequence in list order (FLUX: text, then image).

    parts: 1 or 2 tuples ``(qkv [B, S_i, >= 3*H*D], norm_q weight [D], norm_k weight [D])``;
        q | k | v are the first 3*H*D channels of qkv's last dim (which must have stride 1:
        a column slice of a wider projection output is read in place). All in one dtype.
    cos, sin: [S_total, D], as diffusers' FluxPosEmbed returns them (fp32).
    Returns q, k, v: [B, S_total, H, D] contiguous, in qkv's dtype.
    """
    flat = _flatten(parts, cos, sin, heads)
    return torch.ops.svdq.qk_norm_rope(*flat, cos, sin, heads, float(eps))


def qk_norm_rope_sage(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope` with SageAttention 1.0.6's preparation folded in: the int8 Q and K
    its kernel reads, without the 16-bit q round trip, K's separate mean and subtraction passes
    and the two quantize launches (``kernels.sage_attention_int8`` takes them, with V read from
    the parts' qkv in place: no fp16 copy of V either).

    Same arguments as :func:`qk_norm_rope`; qkv in bfloat16 or float16. With q, k, v the plain
    op's outputs and ``k' = k - k.mean(dim=1)`` in their dtype (sageattn's smoothing), returns
    ``per_block_int8(q, k')``'s q8 [B, S, H, D] int8, q_scale [B, H, ceil(S/128), 1] fp32, k8,
    k_scale [B, H, ceil(S/64), 1]. The triton backend takes D = 64
    or 128 (a power of two that SageAttention serves); its mean sums fp32 per-block column sums
    in block order (deterministic), so a column's mean can differ from torch's by one 16-bit
    rounding where its fp32 sum lands on a rounding boundary.
    """
    flat = _flatten(parts, cos, sin, heads)
    if flat[0].dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"parts[0] qkv must be float16 or bfloat16 for SageAttention, got {flat[0].dtype}")
    return torch.ops.svdq.qk_norm_rope_sage(*flat, cos, sin, heads, float(eps))


# --- the custom op: the backend is resolved inside, out of sight of the tracer ----------------


@torch.library.custom_op("svdq::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    qkv0: torch.Tensor,
    norm_q0: torch.Tensor,
    norm_k0: torch.Tensor,
    qkv1: torch.Tensor | None,
    norm_q1: torch.Tensor | None,
    norm_k1: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _kernels.op_backend_for(qkv0.device, "qk_norm_rope")
    return backend.qk_norm_rope(qkv0, norm_q0, norm_k0, qkv1, norm_q1, norm_k1, cos, sin, heads=heads, eps=eps)


@_qk_norm_rope_op.register_fake
def _(qkv0, norm_q0, norm_k0, qkv1, norm_q1, norm_k1, cos, sin, heads, eps):
    s_total = qkv0.shape[1] + (qkv1.shape[1] if qkv1 is not None else 0)
    shape = (qkv0.shape[0], s_total, heads, norm_q0.shape[0])  # [B, S_total, H, D]
    return qkv0.new_empty(shape), qkv0.new_empty(shape), qkv0.new_empty(shape)


@torch.library.custom_op("svdq::qk_norm_rope_sage", mutates_args=())
def _qk_norm_rope_sage_op(
    qkv0: torch.Tensor,
    norm_q0: torch.Tensor,
    norm_k0: torch.Tensor,
    qkv1: torch.Tensor | None,
    norm_q1: torch.Tensor | None,
    norm_k1: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _kernels.op_backend_for(qkv0.device, "qk_norm_rope_sage")
    return backend.qk_norm_rope_sage(
        qkv0, norm_q0, norm_k0, qkv1, norm_q1, norm_k1, cos, sin, heads=heads, eps=eps
    )


@_qk_norm_rope_sage_op.register_fake
def _(qkv0, norm_q0, norm_k0, qkv1, norm_q1, norm_k1, cos, sin, heads, eps):
    b, d = qkv0.shape[0], norm_q0.shape[0]
    s = qkv0.shape[1] + (qkv1.shape[1] if qkv1 is not None else 0)
    nbq, nbk = -(-s // SAGE_BLOCK_Q), -(-s // SAGE_BLOCK_K)
    return (
        qkv0.new_empty(b, s, heads, d, dtype=torch.int8),  # q8
        qkv0.new_empty(b, heads, nbq, 1, dtype=torch.float32),  # q_scale
        qkv0.new_empty(b, s, heads, d, dtype=torch.int8),  # k8
        qkv0.new_empty(b, heads, nbk, 1, dtype=torch.float32),  # k_scale
    )
