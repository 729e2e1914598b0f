"""Attention on int8 Q/K with per-block scales and V read in place: ``sage_attention_int8``.

SageAttention 1.0.6's per-block int8 attention (``sageattention.attn_qk_int8_per_block``: int8
QK^T, fp32 online softmax in base 2, P and V in fp16 with the PV dot accumulated in fp16 per 64
keys, fp32 across them) on what ``kernels.qk_norm_rope_sage`` emits, with V taken from where the
projection wrote it: bf16 or fp16, a strided view (last dimension contiguous), from one tensor
or from two joined along the sequence (FLUX's text and image projections), converted to fp16 in
registers. The package's kernel reads an fp16 copy of V instead; on ``v.to(torch.float16)`` it
gives this op's output bit for bit (tests/test_int8_attention.py): the package's kernel is the
definer, and the only backend is Triton (engine/kernels/triton/attention.py), the package's own
language, on CUDA or under TRITON_INTERPRET=1.

``torch.ops.svdq.sage_attention_int8`` has a fake implementation, so torch.compile traces
through it (go_fast) without a graph break.
"""

from __future__ import annotations

import importlib

import torch

from engine.quant.ops import SAGE_BLOCK_K, SAGE_BLOCK_Q

HEAD_DIMS = (64, 128)  # the package's kernel's head dims with power-of-two tiles (96 has its own kernel)
V_DTYPES = (torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(name: str, t: object, dtype: torch.dtype | tuple[torch.dtype, ...], shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {list(t.shape)}")
    return t


def sage_attention_int8(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v_parts: list[torch.Tensor],
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """softmax(q k^T) v per head, SageAttention 1.0.6's per-block int8 arithmetic.

    q8: int8 [B, S_q, H, D]; q_scale: fp32 [B, H, ceil(S_q/128), 1] contiguous (the scale holds
        the softmax scale and log2(e), as per_block_int8 writes it); k8: int8 [B, S_kv, H, D];
        k_scale: fp32 [B, H, ceil(S_kv/64), 1] contiguous. q8/k8: last dimension contiguous.
    v_parts: 1 or 2 tensors [B, S_i, H, D], bf16 or fp16 (one dtype), last dimension contiguous,
        any other strides (a column slice of a projection output); joined along the sequence in
        list order, sum(S_i) = S_kv. D in (64, 128).
    Returns [B, S_q, H, D] contiguous in ``out_dtype``: the package's ``forward(q8, k8,
    cat(v_parts).to(float16), q_scale, k_scale, tensor_layout="NHD", output_dtype=out_dtype)``.
    """
    if not isinstance(v_parts, (list, tuple)) or len(v_parts) not in (1, 2):
        raise ValueError(f"v_parts must be a list of 1 or 2 tensors, got {v_parts!r:.80}")
    _check("q8", q8, torch.int8, (None,) * 4)
    b, s_q, h, d = q8.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q8: the head dim D={d} must be one of {HEAD_DIMS}")
    _check("k8", k8, torch.int8, (b, None, h, d))
    s_kv = k8.shape[1]
    _check("q_scale", q_scale, torch.float32, (b, h, -(-s_q // SAGE_BLOCK_Q), 1))
    _check("k_scale", k_scale, torch.float32, (b, h, -(-s_kv // SAGE_BLOCK_K), 1))
    for i, v in enumerate(v_parts):
        _check(f"v_parts[{i}]", v, V_DTYPES, (b, None, h, d))
        if v.dtype != v_parts[0].dtype:
            raise TypeError(f"v_parts[{i}] must have v_parts[0]'s dtype {v_parts[0].dtype}, got {v.dtype}")
    if sum(v.shape[1] for v in v_parts) != s_kv:
        raise ValueError(
            f"v_parts' lengths {[v.shape[1] for v in v_parts]} must add up to k8's S_kv = {s_kv}"
        )
    for name, t in (("q8", q8), ("k8", k8), *((f"v_parts[{i}]", v) for i, v in enumerate(v_parts))):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must have stride 1, got strides {t.stride()}")
        if t.device != q8.device:
            raise ValueError(f"{name} must be on q8's device {q8.device}, got {t.device}")
    for name, t in (("q_scale", q_scale), ("k_scale", k_scale)):
        if not t.is_contiguous() or t.device != q8.device:
            raise ValueError(f"{name} must be contiguous and on q8's device {q8.device}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    v1 = v_parts[1] if len(v_parts) == 2 else None
    return torch.ops.svdq.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts[0], v1, out_dtype)


@torch.library.custom_op("svdq::sage_attention_int8", mutates_args=())
def _sage_attention_int8_op(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v0: torch.Tensor,
    v1: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    # Triton only (the package's own language); imported here, so that engine.kernels loads without triton
    kernel = importlib.import_module("engine.kernels.triton.attention")
    return kernel.int8_attention(q8, q_scale, k8, k_scale, v0, v1, out_dtype=out_dtype)


@_sage_attention_int8_op.register_fake
def _(q8, q_scale, k8, k_scale, v0, v1, out_dtype):
    return q8.new_empty(q8.shape, dtype=out_dtype)  # [B, S_q, H, D] contiguous
