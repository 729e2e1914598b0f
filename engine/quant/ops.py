"""The SVDQuant arithmetic in plain torch, on any device: the ground truth.

Every kernel backend is tested against these functions (engine.kernels.reference serves them
as a backend; the contract is engine/kernels/contract.py), and the quantizer scores its
candidates with them, so what it optimizes is exactly what the kernels compute.

Integer products are formed one group at a time as fp32 matmuls of the integer codes:
every partial sum is an integer below 2^24 (64 * 15 * 8 = 7680 at most), so they are exact
whatever the summation order; scales are applied per group and the groups summed in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.quant.int4 import dequantize_int4_asym, pack_int4, quantize_int4, unpack_int4

if TYPE_CHECKING:
    from engine.quant.svdquant import SVDQWeight


def quantize_act(
    x: torch.Tensor,  # [M, K] float
    smooth: torch.Tensor,  # [K]
    proj_down: torch.Tensor,  # [R, K]
    *,
    group_size: int,
    unsigned: bool,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_hat = (x.float() + shift) / smooth.float()  # [M, K]
    lora_act = x_hat @ proj_down.float().T  # [M, R]
    codes, scales = quantize_int4(x_hat, group_size, unsigned=unsigned)  # [M, K], [M, G]
    ascales = empty_ascales(*scales.shape, x.device).copy_(scales)  # [M, G] group-major
    return pack_int4(codes), ascales, lora_act


def empty_ascales(m: int, groups: int, device: torch.device | str) -> torch.Tensor:
    """An empty ``ascales`` in the one layout that every backend and every fake op returns: fp32
    [M, G] stored group-major, strides (1, M), so a GEMM reads one contiguous vector of scales
    per group. Inductor asserts each custom op's outputs against its fake's sizes and strides
    (``assert_size_stride``): one backend with another layout fails the compiled model."""
    return torch.empty(groups, m, dtype=torch.float32, device=device).t()


LAYER_NORM_EPS = 1e-6  # diffusers' AdaLayerNormZero / AdaLayerNormZeroSingle / FluxTransformerBlock.norm2


def prologue(
    x: torch.Tensor,  # [M, K] float
    mod_scale: torch.Tensor | None,  # [B, K], x's dtype
    mod_shift: torch.Tensor | None,  # [B, K], x's dtype
    *,
    gelu: bool,
) -> torch.Tensor:  # [M, K], x's dtype
    """What a block computes between its residual stream and a quantized linear, in x's dtype
    with diffusers' roundings: ``LayerNorm(x) * (1 + scale) + shift`` (rows of image b = r // S
    take row b of scale/shift) or ``gelu_tanh(x)``; these are the very torch calls diffusers
    makes, so the fused kernels are measured against the unfused path itself."""
    m, k = x.shape
    if mod_scale is not None:
        b = mod_scale.shape[0]
        x3 = x.reshape(b, m // b, k)  # [B, S, K]
        x3 = F.layer_norm(x3, (k,), eps=LAYER_NORM_EPS) * (1 + mod_scale[:, None]) + mod_shift[:, None]
        x = x3.reshape(m, k)
    if gelu:
        x = F.gelu(x, approximate="tanh")
    return x


def quantize_act_prologue(
    x: torch.Tensor,  # [M, K] float
    smooth: torch.Tensor,  # [K]
    proj_down: torch.Tensor,  # [R, K]
    mod_scale: torch.Tensor | None,  # [B, K]
    mod_shift: torch.Tensor | None,  # [B, K]
    *,
    group_size: int,
    unsigned: bool,
    shift: float,
    gelu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = prologue(x, mod_scale, mod_shift, gelu=gelu)  # [M, K], x's dtype
    return quantize_act(x, smooth, proj_down, group_size=group_size, unsigned=unsigned, shift=shift)


def w4a4_gemm(
    qx: torch.Tensor,  # uint8 [M, K/2]
    ascales: torch.Tensor,  # fp32 [M, G]
    qweight: torch.Tensor,  # uint8 [N, K/2]
    wscales: torch.Tensor,  # [N, G]
    lora_act: torch.Tensor,  # fp32 [M, R]
    proj_up: torch.Tensor,  # [N, R]
    bias: torch.Tensor | None,  # [N]
    partial: torch.Tensor | None = None,  # [M, N] out_dtype
    residual: torch.Tensor | None = None,  # [M, N] out_dtype
    gate: torch.Tensor | None = None,  # [B, N] out_dtype, B divides M
    *,
    unsigned: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    m, g = ascales.shape
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    gs = k // g
    a = unpack_int4(qx, signed=not unsigned).float().view(m, g, gs)
    w = unpack_int4(qweight).float().view(n, g, gs)
    sa = ascales.float()
    sw = wscales.float()
    acc = torch.zeros(m, n, device=qx.device)
    for i in range(g):
        acc += (a[:, i] @ w[:, i].T) * sa[:, i, None] * sw[None, :, i]
    acc += lora_act.float() @ proj_up.float().T
    if bias is not None:
        acc += bias.float()
    return gemm_epilogue(acc, partial, residual, gate, out_dtype)


def gemm_epilogue(
    acc: torch.Tensor,  # fp32 [M, N]: integer part, low-rank branch and bias, unrounded (updated in place)
    partial: torch.Tensor | None,  # [M, N] out_dtype
    residual: torch.Tensor | None,  # [M, N] out_dtype
    gate: torch.Tensor | None,  # [B, N] out_dtype
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The W4A4 GEMM's output from its fp32 sum: ``partial`` added in fp32, then one rounding to
    ``out_dtype``, or :func:`gate_residual`'s. Also what a kernel without the epilogue runs after
    writing fp32 (Hopper's FP8 route)."""
    if partial is not None:
        acc += partial.float()
    if residual is None:
        return acc.to(out_dtype)
    return gate_residual(acc, residual, gate, out_dtype)


def gate_residual(
    y: torch.Tensor,  # fp32 [M, N]: the GEMM's sum, low-rank branch and bias, unrounded
    residual: torch.Tensor,  # [M, N] out_dtype
    gate: torch.Tensor,  # [B, N] out_dtype, B divides M
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [M, N] out_dtype
    """The GEMM's gate/residual epilogue, ``residual + gate[b] * y`` (row r of image
    b = r // (M / B)), with diffusers' eager roundings: y rounded to out_dtype (the linear's
    output), the product rounded (``gate * attn_output``), the sum rounded (``h + ...``), each
    computed in fp32 as torch computes a 16-bit op. For 16-bit outputs the product of two
    16-bit values is exact in fp32, so this is bit for bit what torch's eager
    ``residual + gate.unsqueeze(1) * y.to(out_dtype)`` gives; for fp32 the three roundings are
    no-ops and a kernel may fuse product and sum into one FMA (one fp32 rounding fewer)."""
    rows = y.shape[0] // gate.shape[0]
    y16 = y.to(out_dtype).float()  # the linear's output
    g = gate.float().repeat_interleave(rows, dim=0)  # [M, N]
    prod = (g * y16).to(out_dtype).float()  # gate * y, rounded
    return (residual.float() + prod).to(out_dtype).contiguous()  # [M, N] row-major, as the fake


def w4a16_gemv(
    x: torch.Tensor,  # [M, K] float
    qweight: torch.Tensor,  # uint8 [N, K/2], unsigned codes
    wscales: torch.Tensor,  # [N, G]
    wzeros: torch.Tensor,  # [N, G]
    bias: torch.Tensor | None,  # [N]
) -> torch.Tensor:
    w = dequantize_int4_asym(unpack_int4(qweight, signed=False), wscales, wzeros)  # fp32 [N, K]
    y = x.float() @ w.T  # [M, N]
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def linear(
    x: torch.Tensor, q: SVDQWeight, *, unsigned: bool, act_shift: float, group_size: int
) -> torch.Tensor:
    """One SVDQuant linear on ``x [M, K]`` through this backend, in fp32 (for the alpha search)."""
    qx, ascales, lora_act = quantize_act(
        x, q.smooth_factor, q.proj_down, group_size=group_size, unsigned=unsigned, shift=act_shift
    )
    return w4a4_gemm(
        qx,
        ascales,
        q.qweight,
        q.wscales,
        lora_act,
        q.proj_up,
        q.bias,
        unsigned=unsigned,
        out_dtype=torch.float32,
    )



# --- W4A8 (Hopper): FP8 activations, one scale per token ------------------------------------------

FP8_MAX = 448.0  # the largest finite e4m3 (float8_e4m3fn) value
AMAX_MIN = FP8_MAX * 2.0**-126  # below, a row's scale amax / 448 is not a normal fp32 (and 448 / amax may overflow)


def quantize_act_fp8(
    x: torch.Tensor,  # [M, K] float
    smooth: torch.Tensor,  # [K]
    proj_down: torch.Tensor,  # [R, K]
    mod_scale: torch.Tensor | None = None,  # [B, K], x's dtype
    mod_shift: torch.Tensor | None = None,  # [B, K], x's dtype
    *,
    shift: float,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activations of the W4A8 GEMM: x_hat in e4m3 with one scale per token.

    Why: with one activation scale per token the GEMM applies a single scale per element and
    group (the weight's) inside its loop and the token's once after it; per-64-group scales on
    both operands cost two (docs/benchmarks.md, "The ceiling that per-64-group scales put on
    Hopper"). e4m3 keeps about 4 significant bits over the row's whole range, where 4-bit codes
    keep 3 relative to their group's largest value.

    x' = prologue(x) as in :func:`quantize_act_prologue` (none, modulation, or gelu), then
    x_hat = (x' + shift) / smooth in fp32, amax = max_k |x_hat|,
    ascale = amax / 448, codes = e4m3(clamp(x_hat * inv, -448, 448)) rounded to nearest even,
    inv = 448 / amax; a row with amax < AMAX_MIN = 448 * 2^-126 (all zero, or so small that its
    scale would be subnormal and 448 / amax could overflow to inf) gets inv = ascale = 0, so its
    codes are 0. Returns codes
    float8_e4m3fn [M, K], ascale fp32 [M], lora_act fp32 [M, R] (x_hat @ proj_down^T, as
    :func:`quantize_act`).
    """
    if mod_scale is not None or gelu:
        x = prologue(x, mod_scale, mod_shift, gelu=gelu)
    x_hat = (x.float() + shift) / smooth.float()  # [M, K]
    lora_act = x_hat @ proj_down.float().T  # [M, R]
    amax = x_hat.abs().amax(dim=1)  # [M]
    fp8_max = amax.new_tensor(FP8_MAX)  # a tensor, not a Python number: IEEE division on every device
    ok = amax >= AMAX_MIN  # False for NaN too: a NaN row keeps its NaN scale, its codes x_hat * 0
    ascale = torch.where(amax < AMAX_MIN, 0.0, amax / fp8_max)
    inv = torch.where(ok, fp8_max / torch.where(ok, amax, 1.0), 0.0)
    codes = (x_hat * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
    return codes, ascale, lora_act


def w4a8_gemm(
    codes: torch.Tensor,  # float8_e4m3fn [M, K]
    ascale: torch.Tensor,  # fp32 [M]
    qweight: torch.Tensor,  # uint8 [N, K/2], signed codes
    wscales: torch.Tensor,  # [N, G]
    lora_act: torch.Tensor,  # fp32 [M, R]
    proj_up: torch.Tensor,  # [N, R]
    bias: torch.Tensor | None,  # [N]
    partial: torch.Tensor | None = None,  # [M, N] out_dtype
    residual: torch.Tensor | None = None,  # [M, N] out_dtype
    gate: torch.Tensor | None = None,  # [B, N] out_dtype, B divides M
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The W4A8 GEMM: ``ascale[m] * sum_g wscales[n, g] * (codes_g . qweight_g^T)`` in fp32,
    then the low-rank branch, bias and :func:`gemm_epilogue` as :func:`w4a4_gemm`.

    Weight code -8 is read as -7: a kernel expands the codes from sign-magnitude nibbles, which
    have no -8 (RTN never makes -8; our GPTQ leaves a few per million, and reading them as -7
    changed no measured error: docs/benchmarks.md, "W4A8 on Hopper: accuracy"). The token's
    scale is applied once after the sum over groups (that is where a kernel applies it). Each product of an e4m3 code and a 4-bit weight is exact in fp32; a group's 64-term sum
    is exact where it stays within 24 bits (|codes| <= 4 with 2^-9 steps, the tests' exact
    inputs), else rounded in the summation order of the backend (a tensor core's own)."""
    m, k = codes.shape
    n, g = wscales.shape
    gs = k // g
    a = codes.float().view(m, g, gs)
    w = unpack_int4(qweight).float().clamp_min(-7.0).view(n, g, gs)  # -8 read as -7
    sw = wscales.float()
    acc = torch.zeros(m, n, device=codes.device)
    for i in range(g):
        acc += (a[:, i] @ w[:, i].T) * sw[None, :, i]
    acc *= ascale.float()[:, None]
    acc += lora_act.float() @ proj_up.float().T
    if bias is not None:
        acc += bias.float()
    return gemm_epilogue(acc, partial, residual, gate, out_dtype)

# --- q/k RMSNorm + RoPE + joint concatenation (FluxAttnProcessor's arithmetic) --------------------


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
    """The ground truth of kernels.qk_norm_rope (contract: engine.kernels.contract): FluxAttnProcessor's ops in its order (norm per part, cat, then RoPE)."""
    d = norm_q0.shape[0]
    hd = heads * d
    parts = [(qkv0, norm_q0, norm_k0)] + ([(qkv1, norm_q1, norm_k1)] if qkv1 is not None else [])
    qs, ks, vs = [], [], []
    for qkv, norm_q, norm_k in parts:
        qs.append(_rms_norm(qkv[..., :hd].unflatten(-1, (heads, d)), norm_q, eps))  # [B, S_i, H, D]
        ks.append(_rms_norm(qkv[..., hd : 2 * hd].unflatten(-1, (heads, d)), norm_k, eps))
        vs.append(qkv[..., 2 * hd : 3 * hd].unflatten(-1, (heads, d)))
    q, k, v = torch.cat(qs, dim=1), torch.cat(ks, dim=1), torch.cat(vs, dim=1)  # [B, S_total, H, D]
    return _rotary(q, cos, sin), _rotary(k, cos, sin), v.contiguous()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """FluxAttention's norm_q / norm_k / norm_added_q / norm_added_k: torch.nn.RMSNorm(D, eps)."""
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers.models.embeddings.apply_rotary_emb(x, (cos, sin), use_real=True,
    use_real_unbind_dim=-1, sequence_dim=1)."""
    cos, sin = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)  # [1, S, 1, D]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, S, H, D/2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


# --- the same, with SageAttention 1.0.6's preparation (its int8 Q/K format, V in fp16) ------------

# sageattention 1.0.6 (quant_per_block.per_block_int8 and attn_qk_int8_per_block.forward, which
# hard-codes the same blocks): one int8 scale per 128 query tokens and per 64 key tokens of a head.
SAGE_BLOCK_Q = 128
SAGE_BLOCK_K = 64
_LOG2E = 1.44269504  # the package's constant, as written there


def sage_q_multiplier(head_dim: int) -> float:
    """What per_block_int8 multiplies Q by before quantizing (softmax scale and log2(e), for the
    kernel's exp2), as the Python float it passes: kernels convert it to fp32 once."""
    return head_dim**-0.5 * _LOG2E


def sage_per_block_int8(
    x: torch.Tensor, block: int, multiplier: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """sageattention 1.0.6's quant_per_block_int8_kernel on x [B, S, H, D] ("NHD"), in torch.

    Per (b, h, block of ``block`` tokens): y = fp32(x) * fp32(multiplier); scale = max|y| / 127;
    code = trunc(y / scale + 0.5 * (1 if y / scale >= 0 else -1)). Tokens past S count as 0.
    Returns the codes int8 [B, S, H, D] and the scales fp32 [B, H, ceil(S / block), 1].
    """
    b, s, h, d = x.shape
    nb = -(-s // block)
    y = F.pad(x.float(), (0, 0, 0, 0, 0, nb * block - s))  # [B, nb * block, H, D], zeros past S
    y = y * torch.tensor(multiplier, dtype=torch.float32)
    y = y.view(b, nb, block, h, d).permute(0, 3, 1, 2, 4)  # [B, H, nb, block, D]
    scale = y.abs().amax(dim=(3, 4), keepdim=True) / 127.0  # [B, H, nb, 1, 1]
    codes = y / scale
    codes = codes + 0.5 * torch.where(codes >= 0, 1.0, -1.0)
    codes = codes.to(torch.int8).permute(0, 2, 3, 1, 4).reshape(b, nb * block, h, d)[:, :s]
    return codes.contiguous(), scale.reshape(b, h, nb, 1).contiguous()


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
    """The ground truth of kernels.qk_norm_rope_sage: qk_norm_rope, then sageattn's own steps
    (engine.flux.attention.sage_attention): K minus its mean over the sequence (in K's dtype, as
    ``k -= k.mean(dim=1)``), Q and K to int8 per block. V is not an output: the attention
    (kernels.sage_attention_int8) reads it from the projection.
    Returns q8 [B, S, H, D] int8, q_scale [B, H, ceil(S/128), 1] fp32, k8, k_scale
    [B, H, ceil(S/64), 1]."""
    q, k, _ = qk_norm_rope(qkv0, norm_q0, norm_k0, qkv1, norm_q1, norm_k1, cos, sin, heads=heads, eps=eps)
    k = k - k.mean(dim=1, keepdim=True)
    q8, q_scale = sage_per_block_int8(q, SAGE_BLOCK_Q, sage_q_multiplier(q.shape[-1]))
    k8, k_scale = sage_per_block_int8(k, SAGE_BLOCK_K, 1.0)
    return q8, q_scale, k8, k_scale
