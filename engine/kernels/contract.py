"""The kernel contract, stated once: what every backend module implements.

Op contract (every backend implements exactly this; ``reference`` is the ground truth)::

    M  tokens (all leading dimensions folded)     K  input channels, a multiple of G's size
    N  output channels                            G  K / group_size groups (64; or 128, below)
    R  low-rank width (rank + LoRA ranks, may be 0)

    quantize_act(x [..., K], smooth [K], proj_down [R, K], *, group_size, unsigned, shift)
        x_hat    = (x + shift) / smooth                            fp32
        qx       uint8 [M, K/2]    4-bit codes of x_hat, two per byte, low nibble = even k;
                                   signed: round(x_hat / s) in [-8, 7], s = max|x_hat_g| / 7
                                   unsigned: round(x_hat / s) in [0, 15], s = max(x_hat_g) / 15
        ascales  fp32 [M, G]       one scale per token per group (0 for an all-zero group, NaN
                                   where x_hat_g holds a NaN), stored GROUP-MAJOR, strides (1, M)
                                   (engine.quant.ops.empty_ascales), by every backend and fake
        lora_act fp32 [M, R]       x_hat @ proj_down^T

    quantize_act_prologue(x [M, K], smooth, proj_down, mod_scale [B, K] | None,
                          mod_shift [B, K] | None, *, group_size, unsigned, shift, gelu)
        quantize_act of x' instead of x, x' in x's dtype with diffusers' roundings after each op
        (engine.quant.ops.prologue, the definer's own torch calls); B divides M, row r is image
        r // (M / B); mod_scale/mod_shift in x's dtype; exactly one prologue:
          modulation  x' = LayerNorm(x, eps=1e-6) * (1 + mod_scale) + mod_shift  (AdaLayerNormZero)
          gelu        x' = gelu_tanh(x)                                         (FeedForward)
        One read of x (two with LayerNorm: the row statistics first) and one write of codes
        replace the 16-bit x' round trips. The LayerNorm statistics are fp32 in the backend's own
        summation order, so x' may differ from the reference's by one 16-bit ulp on rare
        elements (tests/test_prologue.py states the measured bound). Served by reference and
        triton; where the W4A4 backend has no prologue (cuda), it runs on triton (else the
        reference), like w4a16_gemv: kernels.op_backend_for.

    w4a4_gemm(qx, ascales, qweight [N, K/2], wscales [N, G], lora_act, proj_up [N, R],
              bias [N] | None, partial [M, N] | None, residual [M, N] | None, gate [B, N] | None,
              *, unsigned, out_dtype)
        y [M, N] = sum_g (qx_g . qweight_g^T) * ascales_g * wscales_g + lora_act @ proj_up^T + bias
                   + partial                 (partial: another part's output of the same linear,
                                              in out_dtype: a split-input layer's parts summed in
                                              one output, as SplitInputLinear adds them)
        integer products within a group, exact; scales per group; the sum over groups and
        the epilogue in fp32; written in out_dtype. qweight is always signed.
        Gate/residual epilogue (both or neither; in out_dtype; B divides M, row r takes gate row
        r // (M / B)): out = rnd(residual + rnd(gate * rnd(y))), rnd = round to out_dtype
        (nearest even), every op in fp32: diffusers' eager roundings of ``h + gate * linear(x)``,
        bit for bit for 16-bit outputs (engine.quant.ops.gate_residual); for fp32 outputs a
        backend may fuse the product and the sum into one FMA. The block's residual stream then
        costs one read of residual and one write, no 16-bit y round trip.

    w4a16_gemv(x [M, K], qweight [N, K/2], wscales [N, G], wzeros [N, G], bias [N] | None)
        y [M, N] = x @ (code * wscales + wzeros)^T + bias        weight-only 4-bit, M small
        codes unsigned 0..15 (low nibble = even k); any float dtype in, fp32 sums, y in x's
        dtype. For the AdaLN linears (one conditioning vector per image): the packed weight is
        read once per call and dequantized in registers. The triton backend takes M <= 4.

    quantize_act_fp8(x [M, K], smooth [K], proj_down [R, K], mod_scale [B, K] | None,
                     mod_shift [B, K] | None, *, shift, gelu)          (W4A8: Hopper's route)
        x' = x or its prologue (as quantize_act_prologue: none, modulation, or gelu; B divides M)
        x_hat    = (x' + shift) / smooth                           fp32
        codes    float8_e4m3fn [M, K]   e4m3(clamp(x_hat * 448 / amax, -448, 448)), nearest even,
                                        amax = max_k |x_hat| of the row (codes 0 and ascale 0
                                        where amax < 448 * 2^-126: a zero or tiny row)
        ascale   fp32 [M]               amax / 448, one scale per token
        lora_act fp32 [M, R]            x_hat @ proj_down^T, as quantize_act
        all three contiguous, by every backend and fake (engine.quant.ops.quantize_act_fp8).

    w4a8_gemm(codes, ascale, qweight [N, K/2], wscales [N, G], lora_act, proj_up [N, R],
              bias [N] | None, partial [M, N] | None, residual [M, N] | None, gate [B, N] | None,
              *, out_dtype)
        y [M, N] = ascale * sum_g wscales_g * (codes_g . qweight_g^T) + lora_act @ proj_up^T + bias
                   (+ partial, then the gate/residual epilogue, exactly as w4a4_gemm)
        the unchanged W4A4 weight (signed codes, code -8 read as -7: the Hopper kernel's
        sign-magnitude layout has no -8; any group size G divides K); the token's scale
        applied once after the sum over groups; the products exact in fp32, a group's sum in the
        backend's order and precision (a tensor core's own: Hopper's FP8 MMA is reported to keep
        about 14 bits while it accumulates; the device self-check's inputs pass either way, so
        scripts/gpu_hopper_w4a8.py's error bound on random data is the hardware's check).
        [M, N] contiguous in out_dtype.
        Served by the reference everywhere and by triton on sm_90 (triton/act_fp8.py,
        triton/gemm_sm90_w4a8.py) where those kernels are in the build and the GEMM passed its
        self-check (triton_backend.w4a8_serves); elsewhere the pair runs on the reference
        (kernels.w4a8_backend_for). Which calls take W4A8 instead of W4A4 is
        kernels.w4a8_route's decision.

    qk_norm_rope(qkv0 [B, S0, >= 3HD], norm_q0 [D], norm_k0 [D], qkv1 [B, S1, >= 3HD] | None,
                 norm_q1 | None, norm_k1 | None, cos [S0+S1, D], sin [S0+S1, D], *, heads, eps)
        -> q, k, v  [B, S0+S1, H, D] contiguous, in qkv's dtype (public form: kernels.qk_norm_rope)
        FluxAttnProcessor's glue as one op: per part, q | k | v = the first 3HD channels (last
        dim stride 1), q and k torch.rms_norm-ed with the part's weights; parts joined in order;
        q and k rotated (apply_rotary_emb, use_real_unbind_dim=-1); see engine.kernels.rope.
        The reference and triton backends serve it; elsewhere it runs on triton.

    qk_norm_rope_sage(the same arguments)          (public form: kernels.qk_norm_rope_sage)
        -> q8 int8 [B, S, H, D], q_scale fp32 [B, H, ceil(S/128), 1], k8 int8 [B, S, H, D],
           k_scale fp32 [B, H, ceil(S/64), 1]                          (S = S0+S1, all contiguous)
        What SageAttention 1.0.6's int8 kernel reads of Q and K, from qk_norm_rope's q, k:
        sageattn's steps (K minus T(mean over S) in T, per_block_int8's codes and scales;
        V is read in place by sage_attention_int8 below;
        reference: engine.quant.ops.qk_norm_rope_sage). D in (64, 128) and T 16-bit on triton.
        The mean's fp32 sum is in the backend's own fixed order (deterministic run to run).

    sage_attention_int8(q8, q_scale, k8, k_scale, v_parts [1 or 2 x [B, S_i, H, D]], *, out_dtype)
        -> o [B, S_q, H, D] contiguous                 (public form: kernels.sage_attention_int8)
        SageAttention 1.0.6's per-block int8 attention on qk_norm_rope_sage's outputs, with V
        read in place (bf16/fp16, strided, parts joined along S) and rounded to fp16 in
        registers: the package's kernel on cat(v_parts).to(float16), bit for bit (the definer;
        engine.kernels.attention). Not a backend op: Triton only, as the package itself.

Rounding is round-half-to-even and division is IEEE-exact, so a backend reproduces the
reference's codes bit for bit; only the order of the fp32 sums may differ (and the Triton GEMM
applies each ascale rounded to 22 significant bits, a relative change <= 2^-22, which lets one
FMA convert and scale a group's integer sum). Every op returns exactly its fake's sizes, dtypes
and strides (inductor asserts them: tests/test_inductor_kernels.py). The GEMMs accept scales of
any strides; group-major ones (strides (1, M) or (1, N)) load fastest.
Group sizes: reference, triton take 64 and 128; cuda 64 only, auto sends 128 to triton (gemm_backend_for).

A backend is a module; ``GemmBackend`` and ``GemvBackend`` below are its typed form (the
signatures are the contract: tests/test_kernel_contract.py checks every backend module, the
custom ops and the CUDA extension's C++ schema against them).
"""

from __future__ import annotations

from typing import Protocol

import torch


class GemmBackend(Protocol):
    """A backend of the W4A4 ops (reference, triton, cuda)."""

    NAME: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why it cannot run on ``device`` (None when it can): the one place deciding which
        devices (which GPU architectures) the backend serves."""
        ...

    def quantize_act(
        self,
        x: torch.Tensor,  # [M, K] float
        smooth: torch.Tensor,  # [K]
        proj_down: torch.Tensor,  # [R, K]
        *,
        group_size: int,
        unsigned: bool,
        shift: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # qx [M, K/2] u8, ascales [M, G], lora_act [M, R]
        ...

    def w4a4_gemm(
        self,
        qx: torch.Tensor,  # uint8 [M, K/2]
        ascales: torch.Tensor,  # fp32 [M, G]
        qweight: torch.Tensor,  # uint8 [N, K/2]
        wscales: torch.Tensor,  # [N, G]
        lora_act: torch.Tensor,  # fp32 [M, R]
        proj_up: torch.Tensor,  # [N, R]
        bias: torch.Tensor | None,  # [N]
        partial: torch.Tensor | None = None,  # [M, N] out_dtype
        residual: torch.Tensor | None = None,  # [M, N] out_dtype
        gate: torch.Tensor | None = None,  # [B, N] out_dtype
        *,
        unsigned: bool,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:  # [M, N] out_dtype
        ...


class GemvBackend(Protocol):
    """A backend of the weight-only op (reference, triton)."""

    def w4a16_gemv(
        self,
        x: torch.Tensor,  # [M, K] float
        qweight: torch.Tensor,  # uint8 [N, K/2], unsigned codes
        wscales: torch.Tensor,  # [N, G]
        wzeros: torch.Tensor,  # [N, G]
        bias: torch.Tensor | None,  # [N]
    ) -> torch.Tensor:  # [M, N] in x's dtype
        ...


class NormRopeBackend(Protocol):
    """A backend of the attention prologue (reference, triton): engine/kernels/rope.py."""

    def qk_norm_rope(
        self,
        qkv0: torch.Tensor,  # [B, S0, >= 3*H*D]
        norm_q0: torch.Tensor,  # [D]
        norm_k0: torch.Tensor,  # [D]
        qkv1: torch.Tensor | None,  # [B, S1, >= 3*H*D]
        norm_q1: torch.Tensor | None,
        norm_k1: torch.Tensor | None,
        cos: torch.Tensor,  # [S0 + S1, D]
        sin: torch.Tensor,
        *,
        heads: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q, k, v [B, S0 + S1, H, D]
        ...

    def qk_norm_rope_sage(
        self,
        qkv0: torch.Tensor,  # [B, S0, >= 3*H*D]
        norm_q0: torch.Tensor,  # [D]
        norm_k0: torch.Tensor,  # [D]
        qkv1: torch.Tensor | None,  # [B, S1, >= 3*H*D]
        norm_q1: torch.Tensor | None,
        norm_k1: torch.Tensor | None,
        cos: torch.Tensor,  # [S0 + S1, D]
        sin: torch.Tensor,
        *,
        heads: int,
        eps: float,
    ) -> tuple[torch.Tensor, ...]:  # q8, q_scale, k8, k_scale
        ...


class PrologueBackend(Protocol):
    """A backend of quantize_act with the block's LayerNorm/modulation or GELU folded in (reference, triton)."""

    def quantize_act_prologue(
        self,
        x: torch.Tensor,  # [M, K] float
        smooth: torch.Tensor,  # [K]
        proj_down: torch.Tensor,  # [R, K]
        mod_scale: torch.Tensor | None,  # [B, K], x's dtype
        mod_shift: torch.Tensor | None,  # [B, K], x's dtype
        *,
        group_size: int,
        unsigned: bool,
        shift: float,
        gelu: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # as quantize_act
        ...


class W4A8Backend(Protocol):
    """A backend of the W4A8 pair (reference, triton)."""

    def quantize_act_fp8(
        self,
        x: torch.Tensor,  # [M, K] float
        smooth: torch.Tensor,  # [K]
        proj_down: torch.Tensor,  # [R, K]
        mod_scale: torch.Tensor | None = None,  # [B, K], x's dtype
        mod_shift: torch.Tensor | None = None,  # [B, K], x's dtype
        *,
        shift: float,
        gelu: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # codes e4m3 [M, K], ascale [M], lora_act [M, R]
        ...

    def w4a8_gemm(
        self,
        codes: torch.Tensor,  # float8_e4m3fn [M, K]
        ascale: torch.Tensor,  # fp32 [M]
        qweight: torch.Tensor,  # uint8 [N, K/2], signed codes
        wscales: torch.Tensor,  # [N, G]
        lora_act: torch.Tensor,  # fp32 [M, R]
        proj_up: torch.Tensor,  # [N, R]
        bias: torch.Tensor | None,  # [N]
        partial: torch.Tensor | None = None,  # [M, N] out_dtype
        residual: torch.Tensor | None = None,  # [M, N] out_dtype
        gate: torch.Tensor | None = None,  # [B, N] out_dtype
        *,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:  # [M, N] out_dtype
        ...


OPS = {
    GemmBackend: ("quantize_act", "w4a4_gemm"),
    GemvBackend: ("w4a16_gemv",),
    NormRopeBackend: ("qk_norm_rope", "qk_norm_rope_sage"),
    PrologueBackend: ("quantize_act_prologue",),
    W4A8Backend: ("quantize_act_fp8", "w4a8_gemm"),
}
