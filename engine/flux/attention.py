"""Attention for the FLUX blocks: SDPA, or SageAttention's 8-bit QK^T (go_fast), chosen once.

One entry point, :func:`attend`, for every attention in the transformer (our fused block
forwards call it directly; diffusers' blocks reach it through :class:`FluxAttendProcessor`):

    attend(q, k, v) -> o        q, k, v, o: [B, S, H, D] ("NHD", diffusers' layout before dispatch)

The backend is the one :func:`configure` chose (SDPA until it is called):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, bit for bit what diffusers'
  native dispatch computes;
* ``sage``: SageAttention 1.0.6 (PyPI ``sageattention``, Triton kernels): K smoothed by its mean
  over the sequence, Q and K quantized to int8 per block (128 query / 64 key tokens, one scale
  each), QK^T in int8 with int32 sums, softmax in fp32, P and V in fp16 with PV summed in fp16
  per 64-key block and across blocks in fp32. Registered as the custom op
  ``svdq::sage_attention`` with a fake implementation, so torch.compile (go_fast) traces it
  without a graph break. Measured error against fp32 SDPA: docs/benchmarks.md, tests/test_attention.py.

Our fused blocks enter through :func:`norm_rope_attend` (q/k norm + RoPE, then attention): with
sage, for head dims 64 and 128, SageAttention's preparation runs inside the rope op
(``kernels.qk_norm_rope_sage``: int8 Q/K with their block scales) and then our Triton port of
its int8 kernel (``kernels.sage_attention_int8``), which reads V where the projection wrote it
(bf16, the text and image parts of a double block as two tensors) and rounds it to fp16 in
registers: no fp16 copy of V is written or read, and the result is bit for bit what
:func:`sage_attention` gives. Both run our port, not the package's kernel, for head dims 64 and
128: the package's kernel scores the padding keys of a last partial 64-key block 0 instead of
-inf (10 of the 22 served sizes have such a block); ours gives them no weight, and equals the
package's bit for bit where the sequence is a multiple of 64 (1024x1024). Head dim 96 keeps the
package's separate passes and its own kernel, padding bug included (:func:`attend`).

diffusers 0.42.1's own "sage" dispatch backend needs ``sageattention>=2.1.1`` (its
``_REQUIRED_SAGE_VERSION``), whose CUDA kernels are not on PyPI (1.0.6 is the newest there), so
the 1.0.6 kernels are called here, not through diffusers' dispatcher.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from engine import kernels
from engine.kernels.attention import HEAD_DIMS as INT8_HEAD_DIMS  # our port's (sage's 64 and 128)

logger = logging.getLogger(__name__)

KINDS = ("auto", "sdpa", "sage")
# What SageAttention 1.0.6 takes: head dims and dtypes from sageattention/core.py's asserts (fp32
# is accepted there but V is cast to fp16 anyway). The package checks no GPU generation itself;
# compiled here for FLUX's launch (tests/test_attention.py, no GPU needed), its QK^T loop is int8
# MMA and its PV loop fp16 MMA on sm_80/86/89 (IMMA/HMMA) and sm_90 (IGMMA/HGMMA), and Triton
# cannot lower it for sm_75. Blackwell (sm_100, sm_120) compiles too but is not validated, so
# auto stays on SDPA there.
SAGE_HEAD_DIMS = (64, 96, 128)
SAGE_DTYPES = (torch.float16, torch.bfloat16)
SAGE_MIN_CAPABILITY, SAGE_MAX_CAPABILITY = (8, 0), (9, 0)

_state = {"kind": "sdpa"}  # the one setting: configure() writes it, using() sets it for a scope


def _interpreting() -> bool:
    # Triton's own switch (read by triton.jit when the kernels' module is imported): on a CPU the
    # kernels run only in its interpreter, which the tests use.
    return os.environ.get("TRITON_INTERPRET") == "1"


def sage_unavailable_reason(
    device: torch.device, dtype: torch.dtype, head_dim: int, *, interpreter: bool = False
) -> str | None:
    """Why SageAttention cannot serve this device, dtype and head dim (None: it can).

    ``interpreter``: accept a CPU when TRITON_INTERPRET=1 (tests asking for sage by name; never
    ``auto``, which would make every CPU run crawl through the interpreter).
    """
    try:
        importlib.import_module("sageattention.quant_per_block")  # imports triton too
    except ImportError as e:
        return f"sageattention is not importable ({e})"
    if dtype not in SAGE_DTYPES:
        return f"dtype {dtype} is not float16/bfloat16"
    if head_dim not in SAGE_HEAD_DIMS:
        return f"head dim {head_dim} is not one of {SAGE_HEAD_DIMS}"
    if device.type == "cpu" and interpreter and _interpreting():
        return None
    if device.type != "cuda":
        return f"device {device} is not CUDA (on a CPU its Triton kernels run only under TRITON_INTERPRET=1)"
    cc = torch.cuda.get_device_capability(device)
    if not SAGE_MIN_CAPABILITY <= cc <= SAGE_MAX_CAPABILITY:
        return f"compute capability {cc[0]}.{cc[1]} is outside sm_80..sm_90"
    return None


def choose(
    kind: str, device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128
) -> tuple[str, str]:
    """``(backend, reason)`` for a requested kind; pure (no state, no log). ``sage`` asked for
    where it cannot run raises ValueError; ``auto`` falls back to SDPA and says why."""
    if kind not in KINDS:
        raise ValueError(f"attention={kind!r}: choose one of {', '.join(KINDS)}")
    device = torch.device(device)
    if kind == "sdpa":
        return "sdpa", "asked for"
    reason = sage_unavailable_reason(device, dtype, head_dim, interpreter=kind == "sage")
    if reason is None:
        what = "asked for" if kind == "sage" else "chosen automatically"
        return "sage", f"{what}: {device}, {dtype}, head dim {head_dim}"
    if kind == "sage":
        raise ValueError(f"attention=sage cannot run here: {reason}")
    return "sdpa", f"sage unavailable: {reason}"


def configure(
    kind: str,
    device: torch.device | str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    note: str = "",
) -> str:
    """Choose the attention backend for this process, once, at setup; log it and why.

    ``kind``: ``auto`` (sage where :func:`sage_unavailable_reason` finds nothing against it, else
    SDPA), ``sdpa``, or ``sage`` (ValueError where it cannot run). ``dtype``/``head_dim``: the
    transformer's; ``note``: the caller's context, added to the log line. Returns the backend
    chosen, ``"sdpa"`` or ``"sage"``.
    """
    backend, reason = choose(kind, device, dtype=dtype, head_dim=head_dim)
    _state["kind"] = backend
    logger.info("attention: %s (%s%s)", backend, reason, f"; {note}" if note else "")
    return backend


def current() -> str:
    """The backend :func:`attend` uses now."""
    return _state["kind"]


@contextlib.contextmanager
def using(kind: str) -> Iterator[None]:
    """:func:`attend` uses ``kind`` ("sdpa" or "sage") inside, the configured one after.

    For a request that asks for the exact path (go_fast off) on a process configured for sage.
    Not thread-safe: the service runs one prediction at a time (engine.serial).
    """
    if kind not in ("sdpa", "sage"):
        raise ValueError(f"attention={kind!r}: choose sdpa or sage")
    before = _state["kind"]
    _state["kind"] = kind
    try:
        yield
    finally:
        _state["kind"] = before


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, S, H, D], as diffusers' native dispatch calls it; [B, S, H, D] contiguous."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).contiguous()  # [B, S, H, D]


@torch.library.custom_op("svdq::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention 1.0.6, non-causal, on [B, S, H, D] (its "NHD"); [B, S, H, D] contiguous, q's dtype.

    The steps of ``sageattention.core.sageattn(q, k, v, tensor_layout="NHD")``: the package's
    per-block int8 quantization, then, for head dims 64 and 128, our port of its kernel
    (``kernels.sage_attention_int8``: V read in place, and the padding keys of a last partial
    64-key block weighing nothing, where the package's kernel scores them 0 - see
    engine/kernels/triton/attention.py); a 96 head runs the package's own kernel, padding bug
    included. K's mean is subtracted out of place (``sageattn`` does ``k -= km`` on the caller's
    tensor, which a custom op may not) and CUDA is not asserted, so the same kernels run on a CPU
    under TRITON_INTERPRET=1 (tests).
    """
    from sageattention.attn_qk_int8_per_block import forward as attn_fwd
    from sageattention.attn_qk_int8_per_block_h96 import forward as attn_fwd_h96
    from sageattention.quant_per_block import per_block_int8
    from sageattention.quant_per_block_hd96 import per_block_int8_hd96

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    k = k - k.mean(dim=1, keepdim=True)  # smooth_k: softmax is invariant to it, int8 K is not
    if q.shape[-1] in INT8_HEAD_DIMS:
        q8, q_scale, k8, k_scale = per_block_int8(q, k, tensor_layout="NHD")
        v = v if v.dtype in SAGE_DTYPES else v.to(torch.float16)  # the kernel reads V in 16 bits
        return kernels.sage_attention_int8(q8, q_scale, k8, k_scale, [v], out_dtype=q.dtype)
    v16 = v.to(torch.float16)
    if q.shape[-1] == 96:
        q8, q_scale, k8, k_scale = per_block_int8_hd96(q, k, tensor_layout="NHD")
        return attn_fwd_h96(q8, k8, v16, q_scale, k_scale, tensor_layout="NHD", output_dtype=q.dtype)
    q8, q_scale, k8, k_scale = per_block_int8(q, k, tensor_layout="NHD")
    return attn_fwd(q8, k8, v16, q_scale, k_scale, tensor_layout="NHD", output_dtype=q.dtype)


@sage_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, S, H, D] contiguous


# Head dims whose preparation folds into qk_norm_rope (its Triton kernel takes powers of two):
# FLUX's 128, and 64. A 96 head keeps the separate passes.
FUSED_PREP_HEAD_DIMS = (64, 128)


def norm_rope_attend(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
) -> torch.Tensor:
    """``attend(*kernels.qk_norm_rope(parts, cos, sin, ...))`` -> [B, S, H, D] contiguous.

    With sage, for head dims in FUSED_PREP_HEAD_DIMS, the rope op emits sage's int8 Q and K
    directly (``kernels.qk_norm_rope_sage``) and the int8 attention reads V from each part's
    qkv in place (``kernels.sage_attention_int8``); the SDPA path is unchanged. The fused
    blocks (engine/flux/blocks.py) call this.
    """
    qkv, norm_q = parts[0][0], parts[0][1]
    d = norm_q.shape[-1]
    if _state["kind"] == "sage" and d in FUSED_PREP_HEAD_DIMS and qkv.dtype in SAGE_DTYPES:
        q8, q_scale, k8, k_scale = kernels.qk_norm_rope_sage(parts, cos, sin, heads=heads, eps=eps)
        hd = heads * d
        v_parts = [p[0][..., 2 * hd : 3 * hd].unflatten(-1, (heads, d)) for p in parts]  # [B, S_i, H, D] views
        return kernels.sage_attention_int8(q8, q_scale, k8, k_scale, v_parts, out_dtype=qkv.dtype)
    q, k, v = kernels.qk_norm_rope(parts, cos, sin, heads=heads, eps=eps)
    return attend(q, k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head; q [B, Sq, H, D], k/v [B, Skv, H, D] -> [B, Sq, H, D]
    contiguous, with the backend :func:`configure` chose (SDPA by default)."""
    if _state["kind"] == "sage":
        if q.shape[-1] not in SAGE_HEAD_DIMS or q.dtype not in SAGE_DTYPES:
            raise ValueError(
                f"attention=sage takes head dims {SAGE_HEAD_DIMS} in float16/bfloat16, "
                f"got D={q.shape[-1]} {q.dtype} (configure() was told another model)"
            )
        return sage_attention(q, k, v)
    return sdpa(q, k, v)


class FluxAttendProcessor:
    """diffusers' ``FluxAttnProcessor`` (0.42.1) with its attention call replaced by :func:`attend`.

    For diffusers' own FluxAttention modules (models loaded from unfused checkpoints): the same
    projections, q/k RMSNorm, joint concatenation (text first), RoPE and output projections. An
    attention mask (FluxPipeline passes none) goes to diffusers' dispatcher, as before, since
    :func:`attend` takes none.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The names diffusers' processor itself uses, from its own module.
        from diffusers.models.transformers.transformer_flux import (
            _get_qkv_projections,
            apply_rotary_emb,
            dispatch_attention_fn,
        )

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [B, S_txt + S_img, H, D]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attention_mask is None:
            hidden_states = attend(query, key, value)
        else:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # [B, S, H * D]

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def install_processor(transformer: torch.nn.Module) -> int:
    """Give every diffusers FluxAttention in ``transformer`` a :class:`FluxAttendProcessor`.

    Only modules whose processor is diffusers' plain ``FluxAttnProcessor`` are changed (an IP
    adapter's, or a block forward of ours that calls :func:`attend` itself, are left alone).
    Returns how many were changed.
    """
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    changed = 0
    for module in transformer.modules():
        if isinstance(module, FluxAttention) and type(module.processor) is FluxAttnProcessor:
            module.set_processor(FluxAttendProcessor())
            changed += 1
    return changed
