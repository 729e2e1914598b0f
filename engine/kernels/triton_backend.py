"""Triton backend: fused activation quantization (optionally with the block's LayerNorm +
modulation or GELU before it, ``quantize_act_prologue``), the W4A4 GEMM on int8 tensor cores, and
the W4A16 GEMV. The kernels live in ``engine/kernels/triton/``; this module launches them.

Portable across sm_80, sm_86, sm_89 and sm_90: Triton has no 4-bit dot, so codes are unpacked
to int8 in registers (32-bit shift/mask, exact) and multiplied with one int8 tensor-core dot per
group of 64 channels; the group's integer sum is scaled and added to an fp32 accumulator.
Deterministic: every output element is reduced by one program in a fixed order, no atomics.

Exactness against the reference: divisions use ``tl.div_rn`` (IEEE round-to-nearest) and
rounding is half-to-even (libdevice ``rint`` on the GPU; the interpreter uses the exact
1.5 * 2^23 trick), so the activation codes match the reference bit for bit. No low-rank
product feeds raw fp32 to TF32: fp32 operands go through ``tf32x3`` (three TF32 MMAs), and
x_hat against a bf16 proj_down is split into two bf16 halves (two exact-product MMAs).

GPU-only hazards handled here: launch configs come from a fixed per-architecture table (no
autotuning, whose benchmarking would synchronize inside CUDA-graph capture; the first call per
kernel variant compiles, so warm up before capture, as ``setup()`` does); group sizes other than
powers of two >= 64 are rejected (they would only fail when compiled for a GPU); row offsets are
int64. On CPU the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported).

W4A8 (issue 27): ``quantize_act_fp8`` (triton/act_fp8.py) and ``w4a8_gemm`` (the sm_90 Gluon
kernel, triton/gemm_sm90_w4a8.py); ``w4a8_serves`` / ``w4a8_supports`` / ``W4A8_MIN_M`` tell
kernels.w4a8_route where they run. Without those kernel modules in the build no device is
served W4A8 and the two ops compute the reference's arithmetic.
"""

from __future__ import annotations

import torch
import triton
from torch.utils.weak import WeakTensorKeyDictionary

from engine.kernels.triton import act_fp8, gemm_sm90, gemm_sm90_w4a8, gemm_sm90_ws
from engine.kernels.triton.act import LORA_CHUNK as ACT_LORA_CHUNK
from engine.kernels.triton.act import act_config, quantize_act_kernel
from engine.kernels.triton.common import INTERPRET, MAX_GEMM_GROUP, LaunchConfig, block_r, check_group_size
from engine.kernels.triton.common import arch_major as _major  # a module global: the kernel models patch it
from engine.kernels.triton.common import row_major as _row_major
from engine.kernels.triton.epilogue import launch as sm90_epilogue  # a module global: the route patches it
from engine.kernels.triton.gemm import (
    GROUP_M,
    bias_mma_channels,
    gate_rows2,
    gemm_config,
    grid_size,
    partial_first,
    w4a4_gemm_kernel,
)
from engine.kernels.triton.gemm import LORA_CHUNK as GEMM_LORA_CHUNK
from engine.kernels.triton.gemv import GEMV_BLOCK_K, MAX_ROWS, gemv_config, w4a16_gemv_kernel
from engine.kernels.triton.rope import qk_norm_rope, qk_norm_rope_sage  # noqa: F401 (the backend's)
from engine.quant import ops
from engine.quant.ops import LAYER_NORM_EPS, empty_ascales

NAME = "triton"
_INTERPRET = INTERPRET


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if _INTERPRET:
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return None if major >= 8 else f"needs compute capability 8.0 or newer, this GPU is {major}.{minor}"
    if device.type == "cpu" and _INTERPRET:
        return None
    return "it runs on CUDA GPUs, or on the CPU only under TRITON_INTERPRET=1 (set before import)"


# --- quantize_act ----------------------------------------------------------------------------


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    *,
    group_size: int,
    unsigned: bool,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See engine.kernels. ``ascales`` comes back group-major (strides (1, M)): the GEMM
    reads one contiguous vector of scales per group."""
    return _launch_act(x, smooth, proj_down, None, None, group_size, unsigned, shift, False)


def quantize_act_prologue(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    *,
    group_size: int,
    unsigned: bool,
    shift: float,
    gelu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_act of LayerNorm + modulation or GELU of x, in the same kernel (see
    engine.kernels.triton.act): x is read twice (statistics, then quantization) or once."""
    return _launch_act(x, smooth, proj_down, mod_scale, mod_shift, group_size, unsigned, shift, gelu)


def _launch_act(x, smooth, proj_down, mod_scale, mod_shift, group_size, unsigned, shift, gelu):
    check_group_size(group_size)
    x = _row_major(x)
    m, k = x.shape
    r = proj_down.shape[0]
    qx = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    ascales = empty_ascales(m, k // group_size, x.device)  # [M, G], strides (1, M)
    lora_act = torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return qx, ascales, lora_act
    cfg = act_config(_major(x.device))
    down = _row_major(proj_down)
    smooth = smooth.contiguous()
    # RN(1 / smooth) by IEEE division (K values): the kernel divides by smooth in 3 FMA-class
    # instructions per element from it (engine/kernels/triton/common.py: div_correct).
    # On the GPU smooth goes in fp32 too (the conversion the reciprocal needs anyway): no
    # widening per element, and its negation folds into the division's FMA.
    if not _INTERPRET:
        smooth = smooth.float()
    rsmooth = smooth if _INTERPRET else 1.0 / smooth
    modulate = mod_scale is not None
    if modulate:
        mod_scale, mod_shift = _row_major(mod_scale), _row_major(mod_shift)
        if mod_scale.stride(0) != mod_shift.stride(0):
            mod_shift = mod_shift.contiguous()
            mod_scale = mod_scale.contiguous()
    chunk = block_r(r, ACT_LORA_CHUNK)
    quantize_act_kernel[(triton.cdiv(m, cfg.block_m), max(1, triton.cdiv(r, chunk)))](
        x,
        smooth,
        rsmooth,
        down,
        qx,
        ascales,
        lora_act,
        mod_scale if modulate else x,
        mod_shift if modulate else x,
        m,
        k,
        r,
        x.stride(0),
        down.stride(0),
        qx.stride(0),
        ascales.stride(1),
        shift,
        m // mod_scale.shape[0] if modulate else 1,
        mod_scale.stride(0) if modulate else 0,
        LAYER_NORM_EPS,
        BLOCK_M=cfg.block_m,
        BLOCK_R=chunk,
        GROUP=group_size,
        UNSIGNED=unsigned,
        HAS_LORA=r > 0,
        COMPILED=not _INTERPRET,
        DOWN_BF16=down.dtype == torch.bfloat16,
        MODULATE=modulate,
        GELU=gelu,
        HAS_SHIFT=shift != 0.0,
        ONE_CHUNK=r <= chunk,
        **cfg.launch_options(),
    )
    return qx, ascales, lora_act


# --- w4a4_gemm -------------------------------------------------------------------------------


def w4a4_gemm(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    unsigned: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """See engine.kernels.contract. Scales are read through their strides (group-major is fastest).
    Hopper (sm_90) takes the FP8 kernel of engine/kernels/triton/gemm_sm90.py where its
    integer sums check exact on the device (once; gemm_sm90.serves) and its whole-rank low-rank
    tile fits (rank <= gemm_sm90.MAX_RANK), else the int8 one, whose low-rank loop is chunked.
    Within the FP8 route, problems the warp-specialized Gluon kernel takes (gemm_sm90_ws:
    M > 1024, group-major ascales, TMA alignment) run there once it passed its self-check on
    the device (gemm_sm90_ws.serves); where its last wave is mostly idle it runs in K-slices
    (gemm_sm90_ws.split_for: planned by gemm_sm90_ws_split, checked on the device). The partial/gate/residual epilogue is the int8 kernel's
    only: on Hopper's FP8 route the GEMM writes fp32 and the epilogue runs after it as one
    elementwise kernel (triton/epilogue.py), bit for bit the reference's ops.gemm_epilogue (the
    contract's arithmetic: partial added in fp32, then diffusers' roundings), so those calls keep
    the faster GEMM at the cost of one fp32 round trip."""
    if _major(qx.device) == 9 and lora_act.shape[1] <= gemm_sm90.MAX_RANK and gemm_sm90.serves(qx.device):
        check_group_size(2 * qx.shape[1] // ascales.shape[1], MAX_GEMM_GROUP)
        weight = sm90_weight(qweight, wscales)
        args = (_row_major(qx), ascales if ascales.dtype == torch.float32 else ascales.float())
        low_rank = (_row_major(lora_act.float()), _row_major(proj_up), bias)
        epilogue = residual is not None or partial is not None
        kw = {"unsigned": unsigned, "out_dtype": torch.float32 if epilogue else out_dtype}
        n, k = weight.w8.shape
        if gemm_sm90_ws.serves_problem(args[1], n, k, lora_act.shape[1]) and gemm_sm90_ws.serves(qx.device):
            split = gemm_sm90_ws.split_for(qx.device, qx.shape[0], n, k)  # the last wave in K-slices
            y = gemm_sm90_ws.launch(*args, sm90_ws_weight(qweight, weight), *low_rank, **kw, split=split)
        else:
            y = gemm_sm90.launch(*args, weight, *low_rank, **kw)
        return sm90_epilogue(y, partial, residual, gate, out_dtype) if epilogue else y
    return launch_w4a4_gemm(
        qx,
        ascales,
        qweight,
        wscales,
        lora_act,
        proj_up,
        bias,
        partial,
        residual,
        gate,
        unsigned=unsigned,
        out_dtype=out_dtype,
    )


# The Hopper kernel's weight layout (gemm_sm90.prepare_weight), made once per weight tensor at its
# first call (setup's warm-up, before any CUDA-graph capture) and kept while the tensor lives;
# made again when the tensor is written in place (load_state_dict bumps its version).
_SM90_WEIGHTS = WeakTensorKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; None for inference tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return None


def sm90_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> gemm_sm90.Sm90Weight:
    """The load-time transform of a W4A4 weight for the sm_90 kernel, cached per tensor."""
    key = (_version(qweight), wscales.data_ptr(), _version(wscales))
    hit = _SM90_WEIGHTS.get(qweight)
    if hit is None or hit[0] != key:
        hit = (key, gemm_sm90.prepare_weight(qweight, wscales))
        _SM90_WEIGHTS[qweight] = hit
    return hit[1]


# The warp-specialized kernel's offset term (gemm_sm90_ws.prepare_weight), kept beside the FP8 one.
_SM90_WS_WEIGHTS = WeakTensorKeyDictionary()


def sm90_ws_weight(qweight: torch.Tensor, base: gemm_sm90.Sm90Weight) -> gemm_sm90_ws.WsWeight:
    """gemm_sm90_ws's weight for a W4A4 weight whose FP8 form is ``base``, cached per tensor."""
    hit = _SM90_WS_WEIGHTS.get(qweight)
    if hit is None or hit[0] is not base:
        hit = (base, gemm_sm90_ws.prepare_weight(base))
        _SM90_WS_WEIGHTS[qweight] = hit
    return hit[1]


def launch_w4a4_gemm(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    unsigned: bool,
    out_dtype: torch.dtype,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """w4a4_gemm with ``config`` overriding the architecture's launch config (benchmarks, tests)."""
    m, half_k = qx.shape
    n, k, r = qweight.shape[0], 2 * half_k, lora_act.shape[1]
    group = k // ascales.shape[1]
    check_group_size(group, MAX_GEMM_GROUP)
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0:
        return out
    cfg = config or gemm_config(_major(qx.device), m, group)
    qx, qweight = _row_major(qx), _row_major(qweight)
    lora_act, proj_up = _row_major(lora_act.float()), _row_major(proj_up)
    ascales = ascales if ascales.dtype == torch.float32 else ascales.float()
    gated = residual is not None
    # partial and residual are read through out's strides (contiguous [M, N]); gate through its own
    if gated:
        residual, gate = residual.contiguous(), _row_major(gate)
    if partial is not None:
        partial = partial.contiguous()
    w4a4_gemm_kernel[(grid_size(m, n, cfg),)](
        qx,
        ascales,
        qweight,
        wscales,
        lora_act,
        proj_up,
        bias if bias is not None else out,
        out,
        partial if partial is not None else out,
        residual if gated else out,
        gate if gated else out,
        m,
        n,
        k,
        r,
        qx.stride(0),
        qweight.stride(0),
        ascales.stride(0),
        ascales.stride(1),
        wscales.stride(0),
        wscales.stride(1),
        lora_act.stride(0),
        proj_up.stride(0),
        out.stride(0),
        gate.stride(0) if gated else 0,
        m // gate.shape[0] if gated else 1,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=block_r(r, GEMM_LORA_CHUNK),
        GROUP=group,
        GROUP_M=GROUP_M,
        UNSIGNED=unsigned,
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        EVEN_MN=m % cfg.block_m == 0 and n % cfg.block_n == 0,
        COMPILED=not _INTERPRET,
        BIAS_MMA=cfg.bias_mma,
        K_BIAS=bias_mma_channels(group, unsigned),
        GATED=gated,
        HAS_PARTIAL=partial is not None,
        GATE_ROWS2=gated and gate_rows2(cfg) and m // gate.shape[0] >= cfg.block_m,
        PARTIAL_FIRST=partial_first(cfg),
        **cfg.launch_options(),
    )
    return out


# --- W4A8 (sm_90): FP8 activations with one scale per token ---------------------------------

# The route's smallest M (kernels.w4a8_min_m): the W4A4 dispatch's own split, so the text stream
# (M <= 1024) keeps gemm_sm90's small tiles and the image stream takes the W4A8 kernel.
W4A8_MIN_M = gemm_sm90_ws.MIN_M
def w4a8_serves(device: torch.device) -> bool:
    """Whether this backend runs the W4A8 ops on ``device`` with its kernels: sm_90, the GEMM's
    self-check passed there (gemm_sm90_w4a8.serves: once per device, at
    the first call, setup's warm-up). The quantizer has no self-check of its own: its codes are
    the GEMM's inputs, and the tests execute its compiled PTX bit for bit against the reference."""
    return _major(device) == 9 and gemm_sm90_w4a8.serves(device)


def w4a8_supports(n: int, k: int, rank: int, group_size: int) -> bool:
    """Whether the W4A8 GEMM takes a weight of these sizes (its group size, rank limit, TMA
    alignment): kernels.w4a8_route sends the rest (e.g. a LoRA widening R past the limit) W4A4."""
    return gemm_sm90_w4a8.supports(1, n, k, rank, group_size)


def quantize_act_fp8(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    mod_scale: torch.Tensor | None = None,
    mod_shift: torch.Tensor | None = None,
    *,
    shift: float,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See engine.kernels.contract: the Triton kernel of engine/kernels/triton/act_fp8.py (with the
    prologues), portable; the reference where that kernel is not in the build or K is not a
    multiple of its 64-channel step."""
    if x.shape[1] % act_fp8.GROUP:
        return ops.quantize_act_fp8(x, smooth, proj_down, mod_scale, mod_shift, shift=shift, gelu=gelu)
    return act_fp8.quantize_act_fp8(x, smooth, proj_down, mod_scale, mod_shift, shift=shift, gelu=gelu)


def w4a8_gemm(
    codes: torch.Tensor,
    ascale: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """See engine.kernels.contract. On sm_90 the Gluon kernel of gemm_sm90_w4a8.py, for problems it
    takes (``supports``) once it passed its self-checks (``serves``), on the weight's layout made
    once per tensor (``sm90_w4a8_weight``), its last partial wave in K-slices where the plan takes
    them (``split_for``); the partial/gate/residual epilogue runs after it as
    the W4A4 Hopper route's does (fp32 written, triton/epilogue.py, bit for bit
    ops.gemm_epilogue). Everything else runs the reference, ops.w4a8_gemm."""
    m, k = codes.shape
    n, r = qweight.shape[0], lora_act.shape[1]
    if (
        _major(codes.device) == 9
        and gemm_sm90_w4a8.supports(m, n, k, r, k // wscales.shape[1])
        and gemm_sm90_w4a8.serves(codes.device)
    ):
        epilogue = residual is not None or partial is not None
        y = gemm_sm90_w4a8.launch(
            codes.contiguous(),
            ascale.float().contiguous(),
            sm90_w4a8_weight(qweight, wscales),
            _row_major(lora_act.float()),
            _row_major(proj_up),
            bias if bias is None else bias.contiguous(),  # the kernel reads it with unit stride
            out_dtype=torch.float32 if epilogue else out_dtype,
            split=gemm_sm90_w4a8.split_for(codes.device, m, n, k),  # the last wave in K-slices
        )
        return sm90_epilogue(y, partial, residual, gate, out_dtype) if epilogue else y
    return ops.w4a8_gemm(
        codes, ascale, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, out_dtype=out_dtype
    )


# The W4A8 kernel's weight layout (gemm_sm90_w4a8.prepare_weight), made once per weight tensor at its first call and kept while the tensor lives, as sm90_weight.
_SM90_W4A8_WEIGHTS = WeakTensorKeyDictionary()


def sm90_w4a8_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> object:
    """The load-time transform of a W4A4 weight for the W4A8 kernel, cached per
    tensor and remade when either tensor is written in place."""
    key = (_version(qweight), wscales.data_ptr(), _version(wscales))
    hit = _SM90_W4A8_WEIGHTS.get(qweight)
    if hit is None or hit[0] != key:
        hit = (key, gemm_sm90_w4a8.prepare_weight(qweight, wscales))
        _SM90_W4A8_WEIGHTS[qweight] = hit
    return hit[1]


# --- w4a16_gemv ------------------------------------------------------------------------------


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """See engine.kernels.w4a16_gemv: reads the packed weight once, dequantizes in registers."""
    m, k = x.shape
    n = qweight.shape[0]
    group = k // wscales.shape[1]
    check_group_size(group)
    if m > MAX_ROWS:
        raise ValueError(f"w4a16_gemv takes at most {MAX_ROWS} rows, got {m}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    x, qweight = _row_major(x), _row_major(qweight)
    cfg = gemv_config(_major(x.device))
    block_k = max(GEMV_BLOCK_K, group)
    w4a16_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        qweight,
        wscales,
        wzeros,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        wscales.stride(0),
        wscales.stride(1),
        wzeros.stride(0),
        wzeros.stride(1),
        y.stride(0),
        ROWS=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        GROUP=group,
        HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0,
        **cfg.launch_options(),
    )
    return y
