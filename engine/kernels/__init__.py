"""The hot ops of an SVDQuant linear, behind one dispatch.

The contract every backend implements (shapes, layouts, rounding) is stated once, in
``engine.kernels.contract``; ``reference`` is the ground truth every backend is tested against.

The ops are torch custom ops (``torch.ops.svdq.quantize_act``, ``torch.ops.svdq.quantize_act_prologue``,
``torch.ops.svdq.w4a4_gemm``, ``torch.ops.svdq.w4a16_gemv``) with fake implementations: ``torch.compile`` traces a model
through them without a graph break, and the backend is chosen inside the op, at run time, so a
compiled graph or a captured CUDA graph runs whichever kernels the device has.

Backend choice: ``configure(backend=...)``, called once by the server's setup() and the scripts
(which pass ``SVDQ_KERNELS`` from the environment): auto (default) | reference | triton | cuda.
``auto`` takes, on a CUDA tensor in the order cuda, triton, reference, the first backend whose
own ``unavailable_reason`` accepts the device (each backend decides alone which GPUs it
serves), and the reference elsewhere; a named backend that cannot run there is an error, never a silent fall-back. The CUDA
extension has no GEMV and no quantize_act prologue: where it serves the W4A4 ops, ``w4a16_gemv``
and ``quantize_act(..., modulation=... | gelu=True)`` (op ``svdq::quantize_act_prologue``) run on
Triton (or the reference). The CUDA extension also serves group_size 64 only (its
``GROUP_SIZES``): under auto, a layer with another group size (128, the Hopper option of our
quantizer) runs its W4A4 ops on Triton (or the reference); a backend named explicitly that
lacks the layer's group size is an error.

W4A8 (issue 27, Hopper): ``quantize_act_fp8`` and ``w4a8_gemm`` (``torch.ops.svdq.*``, contract:
engine.kernels.contract) run the same checkpoint weight against FP8 activations with one scale
per token. ``w4a8_route`` decides per call whether a W4A4 linear takes them: where the
configured backend serves W4A8 on the device (``w4a8_serves``: the triton backend on sm_90,
with its kernels in the build and their self-check passed), for M >= its minimum, sizes its
kernel takes (``w4a8_supports``); the contract reads weight code -8 as -7, so every weight
qualifies. ``configure(w4a8="off")`` turns the route off; ``"force"`` takes it on any
device, the W4A8 ops then running on the reference (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from pathlib import Path
from types import ModuleType

import torch

from engine.kernels.attention import sage_attention_int8  # int8 Q/K attention, V read in place
from engine.kernels.rope import qk_norm_rope, qk_norm_rope_sage  # q/k norm + RoPE (+ sage prep)
from engine.quant.ops import empty_ascales  # the one ascales layout: [M, G] group-major

logger = logging.getLogger(__name__)

ENV_VAR = "SVDQ_KERNELS"
BACKENDS = ("reference", "triton", "cuda")
# auto: fastest first; which GPUs a backend serves is its own unavailable_reason's call. Off
# CUDA, auto is the reference: the Triton interpreter is a test tool, never an automatic choice.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "other": ("reference",)}
_MODULES = {
    "reference": "engine.kernels.reference",
    "triton": "engine.kernels.triton_backend",
    "cuda": "engine.kernels.cuda",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
W4A8_MODES = ("auto", "off", "force")
# The smallest M that takes the W4A8 route where a backend states none (W4A8_MIN_M on the
# backend module): gemm_sm90_ws.MIN_M's value, below which Hopper's small-tile FP8 kernel fills
# the chip better (the text stream, 256 tokens per image, stays W4A4); tests check the two agree.
W4A8_MIN_M = 1025


class BackendUnavailableError(RuntimeError):
    """A kernel backend was asked for where it cannot run."""


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[name]), None
    except ModuleNotFoundError as e:
        if e.name and _MODULES[name].startswith(e.name):
            return None, "it is not part of this build"
        return None, f"its dependency {e.name!r} is not installed"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    module, reason = _load(name)
    return reason if module is None else module.unavailable_reason(device)


def get_backend(name: str, device: torch.device | str) -> ModuleType:
    """Backend module ``name``, checked to run on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"{name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    reason = unavailable_reason(name, torch.device(device))
    if reason:
        raise BackendUnavailableError(f"the {name} backend cannot run on {device}: {reason}")
    return _load(name)[0]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Process-wide kernel settings, set once by ``configure`` (from setup() or a script)."""

    backend: str = "auto"
    ext_dir: Path | None = None  # where the CUDA extension is built just in time
    w4a8: str = "auto"  # the W4A8 route (w4a8_route): auto | off | force (tests: any device)


# The one setting of the process: configure() replaces it (from setup() or a script), the ops
# read it. A one-slot dict rather than a rebound global.
_settings: dict[str, KernelConfig] = {"current": KernelConfig()}


def configure(
    backend: str = "auto", *, ext_dir: str | Path | None = None, w4a8: str = "auto"
) -> KernelConfig:
    """Choose the kernel backend (and the CUDA extension's build folder) for this process, and
    whether W4A4 linears may take the W4A8 route (``w4a8``: auto, off, or force, a test setting
    that takes it on any device; see w4a8_route)."""
    backend = (backend or "auto").strip().lower()
    if backend not in ("auto", *BACKENDS):
        raise ValueError(
            f"{ENV_VAR}={backend!r} is not a kernel backend; choose one of auto, {', '.join(BACKENDS)}"
        )
    if w4a8 not in W4A8_MODES:
        raise ValueError(f"w4a8={w4a8!r}: choose one of {', '.join(W4A8_MODES)}")
    _settings["current"] = KernelConfig(backend, Path(ext_dir) if ext_dir else None, w4a8)
    _resolve.cache_clear()
    return _settings["current"]


def config() -> KernelConfig:
    """The settings ``configure`` made (the defaults if it was never called)."""
    return _settings["current"]


@functools.cache
def _resolve(requested: str, device: torch.device) -> ModuleType:
    if requested != "auto":
        try:
            module = get_backend(requested, device)
        except BackendUnavailableError as e:
            raise BackendUnavailableError(f"{ENV_VAR}={requested}: {e}") from None
        logger.info("SVDQuant kernels on %s: %s (%s=%s)", device, requested, ENV_VAR, requested)
        return module
    skipped = []
    for name in _AUTO_ORDER["cuda" if device.type == "cuda" else "other"]:
        reason = unavailable_reason(name, device)
        if reason is None:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            logger.info("SVDQuant kernels on %s: %s, chosen automatically%s", device, name, why)
            return _load(name)[0]
        skipped.append(f"{name} skipped: {reason}")
    raise AssertionError("unreachable: the reference backend runs everywhere")


def backend_for(device: torch.device | str) -> ModuleType:
    """The backend module that serves tensors on ``device`` under the configured choice."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _resolve(_settings["current"].backend, device)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    *,
    group_size: int = 64,
    unsigned: bool = False,
    shift: float = 0.0,
    modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth, 4-bit-quantize and low-rank-project activations (see the module docstring).

    ``modulation=(scale [B, K], shift [B, K])`` quantizes ``LayerNorm(x) * (1 + scale) + shift``
    and ``gelu=True`` quantizes ``gelu_tanh(x)`` instead of x (x [B, S, K] or [M, K], M = B * S;
    contract: quantize_act_prologue), without writing that 16-bit tensor out.
    """
    _check_float("x", x)
    k = x.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"x: the input dimension K={k} must be a multiple of the group size {group_size}")
    _check_float("smooth", smooth)
    _check_shape("smooth", smooth, (k,))
    _check_float("proj_down", proj_down)
    if proj_down.dim() != 2 or proj_down.shape[1] != k:
        raise ValueError(f"proj_down must have shape [R, {k}], got {list(proj_down.shape)}")
    x2 = x.reshape(-1, k)  # [M, K]
    if modulation is None and not gelu:
        return torch.ops.svdq.quantize_act(x2, smooth, proj_down, group_size, unsigned, float(shift))
    mod_scale, mod_shift = _check_prologue(x, modulation, gelu)  # [B, K] each, or None
    return torch.ops.svdq.quantize_act_prologue(
        x2, smooth, proj_down, mod_scale, mod_shift, group_size, unsigned, float(shift), gelu
    )


def _check_prologue(
    x: torch.Tensor, modulation: object, gelu: object
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not isinstance(gelu, bool):
        raise TypeError(f"gelu must be a bool, got {type(gelu).__name__}")
    if modulation is None:
        return None, None
    if gelu:
        raise ValueError("quantize_act takes one prologue: modulation (LayerNorm + AdaLN) or gelu, not both")
    if not isinstance(modulation, (tuple, list)) or len(modulation) != 2:
        raise TypeError("modulation must be a pair (scale [B, K], shift [B, K]) or None")
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    for name, t in zip(("modulation scale", "modulation shift"), modulation, strict=True):
        _check_float(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype} (diffusers' arithmetic), got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != k or t.shape[0] == 0:
            raise ValueError(f"{name} must have shape [B, {k}], got {list(t.shape)}")
    b = modulation[0].shape[0]
    if modulation[1].shape[0] != b:
        raise ValueError(
            f"modulation shift must have shape [{b}, {k}] like scale, got {list(modulation[1].shape)}"
        )
    if m % b or (x.dim() > 2 and b not in (1, x.shape[0])):
        raise ValueError(
            f"modulation: x {list(x.shape)} must be [B, S, K] (or [M, K] with M a multiple of B) "
            f"for scale/shift with B={b} rows"
        )
    return modulation[0], modulation[1]


def w4a4_gemm(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None = None,
    partial: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    unsigned: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """4-bit x 4-bit GEMM with per-group scales, fp32 accumulation, low-rank and bias epilogue;
    ``partial [M, N]`` (out_dtype) is added to y (a split-input linear's other part); with
    ``residual [M, N]`` and ``gate [B, N]`` (out_dtype) it returns the block's
    ``residual + gate * y`` instead of y, with diffusers' roundings (contract: w4a4_gemm)."""
    for name, t in (("qx", qx), ("qweight", qweight)):
        if t.dtype != torch.uint8 or t.dim() != 2:
            raise TypeError(
                f"{name} must be a 2-D uint8 tensor of packed 4-bit codes, got {t.dtype} {list(t.shape)}"
            )
    m, half_k = qx.shape
    n = qweight.shape[0]
    if qweight.shape[1] != half_k:
        raise ValueError(f"qweight must have shape [N, {half_k}] to match qx, got {list(qweight.shape)}")
    if (
        ascales.dim() != 2
        or ascales.shape[0] != m
        or ascales.shape[1] == 0
        or (2 * half_k) % ascales.shape[1]
    ):
        raise ValueError(
            f"ascales must have shape [{m}, G] with G dividing K={2 * half_k}, got {list(ascales.shape)}"
        )
    g = ascales.shape[1]
    _check_float("ascales", ascales)
    _check_float("wscales", wscales)
    _check_shape("wscales", wscales, (n, g))
    _check_gemm_rest(lora_act, proj_up, bias, partial, residual, gate, m, n, out_dtype)
    return torch.ops.svdq.w4a4_gemm(
        qx, ascales, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, unsigned, out_dtype
    )


def _check_gemm_rest(
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    residual: torch.Tensor | None,
    gate: torch.Tensor | None,
    m: int,
    n: int,
    out_dtype: torch.dtype,
) -> None:
    """The arguments w4a4_gemm and w4a8_gemm share after their codes and scales: the low-rank
    factors, bias, output dtype, partial and the gate/residual epilogue."""
    _check_float("lora_act", lora_act)
    _check_float("proj_up", proj_up)
    if lora_act.dim() != 2 or lora_act.shape[0] != m:
        raise ValueError(f"lora_act must have shape [{m}, R], got {list(lora_act.shape)}")
    _check_shape("proj_up", proj_up, (n, lora_act.shape[1]))
    if bias is not None:
        _check_float("bias", bias)
        _check_shape("bias", bias, (n,))
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if partial is not None:
        _check_float("partial", partial)
        if partial.dtype != out_dtype:
            raise TypeError(f"partial must have out_dtype {out_dtype}, got {partial.dtype}")
        _check_shape("partial", partial, (m, n))
    _check_epilogue(residual, gate, m, n, out_dtype)


def _check_epilogue(
    residual: torch.Tensor | None, gate: torch.Tensor | None, m: int, n: int, out_dtype: torch.dtype
) -> None:
    """The gate/residual epilogue's operands: both or neither, in out_dtype, residual [M, N] and
    gate [B, N] with B dividing M (row r is image r // (M / B))."""
    if residual is None and gate is None:
        return
    if residual is None or gate is None:
        raise ValueError("residual and gate come together (out = residual + gate * y): pass both or neither")
    for name, t in (("residual", residual), ("gate", gate)):
        _check_float(name, t)
        if t.dtype != out_dtype:
            raise TypeError(f"{name} must have out_dtype {out_dtype} (diffusers' arithmetic), got {t.dtype}")
    _check_shape("residual", residual, (m, n))
    if gate.dim() != 2 or gate.shape[1] != n or gate.shape[0] == 0 or m % gate.shape[0]:
        raise ValueError(f"gate must have shape [B, {n}] with B dividing M={m}, got {list(gate.shape)}")


def quantize_act_fp8(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    *,
    shift: float = 0.0,
    modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W4A8's activations: smooth, quantize to e4m3 with one scale per token, low-rank-project
    (contract: quantize_act_fp8); ``modulation``/``gelu`` as in :func:`quantize_act`. Returns
    codes float8_e4m3fn [M, K], ascale fp32 [M], lora_act fp32 [M, R] (M = x's rows folded)."""
    _check_float("x", x)
    k = x.shape[-1]
    _check_float("smooth", smooth)
    _check_shape("smooth", smooth, (k,))
    _check_float("proj_down", proj_down)
    if proj_down.dim() != 2 or proj_down.shape[1] != k:
        raise ValueError(f"proj_down must have shape [R, {k}], got {list(proj_down.shape)}")
    mod_scale, mod_shift = _check_prologue(x, modulation, gelu)  # [B, K] each, or None
    return torch.ops.svdq.quantize_act_fp8(
        x.reshape(-1, k), smooth, proj_down, mod_scale, mod_shift, float(shift), gelu
    )


def w4a8_gemm(
    codes: torch.Tensor,
    ascale: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None = None,
    partial: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """e4m3 activations (one scale per token) x the W4A4 weight's signed 4-bit codes (per-group
    scales), fp32 accumulation, the low-rank/bias/partial/gate/residual epilogue of
    :func:`w4a4_gemm` (contract: w4a8_gemm). Returns [M, N] in out_dtype."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
        got = _describe(codes)
        raise TypeError(f"codes must be a 2-D float8_e4m3fn tensor [M, K] (quantize_act_fp8's), got {got}")
    m, k = codes.shape
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be a 2-D uint8 tensor of packed 4-bit codes, got {_describe(qweight)}")
    n = qweight.shape[0]
    if 2 * qweight.shape[1] != k:
        raise ValueError(
            f"qweight must have shape [N, {k // 2}] to match codes' K={k}, got {list(qweight.shape)}"
        )
    _check_float("ascale", ascale)
    _check_shape("ascale", ascale, (m,))
    _check_float("wscales", wscales)
    if wscales.dim() != 2 or wscales.shape[0] != n or wscales.shape[1] == 0 or k % wscales.shape[1]:
        raise ValueError(f"wscales must have shape [{n}, G] with G dividing K={k}, got {list(wscales.shape)}")
    _check_gemm_rest(lora_act, proj_up, bias, partial, residual, gate, m, n, out_dtype)
    return torch.ops.svdq.w4a8_gemm(
        codes, ascale, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, out_dtype
    )


def _describe(t: object) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# --- the W4A8 route: which W4A4 linears run as W4A8 (decided per call, traced by torch.compile) ---


def _serves_w4a8(module: ModuleType, device: torch.device) -> bool:
    serves = getattr(module, "w4a8_serves", None)  # a backend with W4A8 kernels states where they run
    return serves is not None and serves(device)


def w4a8_backend_for(device: torch.device | str) -> ModuleType:
    """The backend that serves the W4A8 ops on ``device``: the configured one where it serves
    them there (its ``w4a8_serves``: e.g. sm_90 with its kernels' self-checks passed), else the
    reference, which serves them everywhere (as op_backend_for for an op a backend lacks)."""
    device = torch.device(device)
    module = backend_for(device)
    return module if _serves_w4a8(module, device) else get_backend("reference", device)


@torch.compiler.assume_constant_result  # a compiled graph bakes it in: configure() precedes compiles
def w4a8_served(device: torch.device) -> bool:
    """Whether calls on ``device`` may take the W4A8 route: w4a8="force" everywhere, "off"
    nowhere, "auto" where the configured backend's kernels serve W4A8 there (never the
    reference: W4A8 is the Hopper kernels' route, not a CPU one)."""
    mode = config().w4a8
    if mode != "auto":
        return mode == "force"
    return _serves_w4a8(backend_for(device), device)


@torch.compiler.assume_constant_result
def w4a8_min_m(device: torch.device) -> int:
    """The smallest M that takes the W4A8 route on ``device``: the serving backend's
    ``W4A8_MIN_M`` (its kernel's), else :data:`W4A8_MIN_M`."""
    return int(getattr(w4a8_backend_for(device), "W4A8_MIN_M", W4A8_MIN_M))


@torch.compiler.assume_constant_result  # its arguments are static sizes, which the graph guards
def w4a8_supports(device: torch.device, n: int, k: int, rank: int, group_size: int) -> bool:
    """Whether the backend serving W4A8 on ``device`` takes a weight of these sizes (its
    ``w4a8_supports``: the kernel's rank limit, group size, alignment; the reference takes all)."""
    check = getattr(w4a8_backend_for(device), "w4a8_supports", None)
    return check is None or bool(check(n, k, rank, group_size))


def w4a8_route(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, proj_up: torch.Tensor) -> bool:
    """Whether this call of a W4A4 linear (x [..., K], its weight ``qweight`` [N, K/2] and
    ``wscales`` [N, G], its low-rank factor ``proj_up`` [N, R] with any LoRAs) runs as W4A8
    (quantize_act_fp8 + w4a8_gemm) instead of W4A4: on a device where W4A8 is served
    (:func:`w4a8_served`), with M = x's rows >= :func:`w4a8_min_m`, sizes the serving kernel
    takes (:func:`w4a8_supports`: a LoRA can widen R past its limit). Under torch.compile the
    device's answers are constants and M's comparison a guard on the symbolic size."""
    device = x.device
    if not w4a8_served(device) or x.numel() // x.shape[-1] < w4a8_min_m(device):
        return False
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    return w4a8_supports(device, n, k, proj_up.shape[1], k // wscales.shape[1])


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only 4-bit linear on a few rows (see the module docstring)."""
    _check_float("x", x)
    k = x.shape[-1]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or 2 * qweight.shape[1] != k:
        raise TypeError(
            f"qweight must be a uint8 tensor of shape [N, {k // 2}], got {qweight.dtype} "
            f"{list(qweight.shape)}"
        )
    n = qweight.shape[0]
    if wscales.dim() != 2 or wscales.shape[0] != n or wscales.shape[1] == 0 or k % wscales.shape[1]:
        raise ValueError(f"wscales must have shape [{n}, G] with G dividing K={k}, got {list(wscales.shape)}")
    _check_float("wscales", wscales)
    _check_float("wzeros", wzeros)
    _check_shape("wzeros", wzeros, tuple(wscales.shape))
    if bias is not None:
        _check_float("bias", bias)
        _check_shape("bias", bias, (n,))
    x2 = x.reshape(-1, k)  # [M, K]
    y = torch.ops.svdq.w4a16_gemv(x2, qweight, wscales, wzeros, bias)  # [M, N]
    return y.reshape(*x.shape[:-1], n)


def _fallback(device: torch.device | str) -> ModuleType:
    """Where an op the chosen backend lacks runs: triton if it runs on ``device``, else the reference."""
    device = torch.device(device)
    return get_backend("triton" if unavailable_reason("triton", device) is None else "reference", device)


def gemm_backend_for(device: torch.device | str, group_size: int) -> ModuleType:
    """The backend that serves the W4A4 ops (quantize_act, w4a4_gemm) of a layer with
    ``group_size`` on ``device``: the configured one when it takes that group size (a backend
    without ``GROUP_SIZES`` takes any), else under auto the first of triton, reference that runs
    there. A backend named explicitly that lacks it raises (never a silent fall-back)."""
    module = backend_for(device)
    sizes = getattr(module, "GROUP_SIZES", None)
    if sizes is None or group_size in sizes:
        return module
    requested = _settings["current"].backend
    if requested != "auto":
        raise BackendUnavailableError(
            f"{ENV_VAR}={requested}: the {module.NAME} backend supports group_size "
            f"{', '.join(map(str, sizes))} only, this layer has {group_size}; use {ENV_VAR}=triton or auto"
        )
    return _fallback(device)


def op_backend_for(device: torch.device | str, op: str) -> ModuleType:
    """The backend that serves ``op`` on ``device``: the configured one when it has the op, else
    the first of triton, reference that runs there (the CUDA extension has no w4a16_gemv,
    quantize_act_prologue or qk_norm_rope(_sage); its w4a4_gemm takes the contract's qx/ascales/lora_act,
    whatever their producer)."""
    module = backend_for(device)
    return module if hasattr(module, op) else _fallback(device)


# --- the custom ops: the backend is resolved inside, out of sight of the tracer ----------------


@torch.library.custom_op("svdq::quantize_act", mutates_args=())
def _quantize_act_op(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    group_size: int,
    unsigned: bool,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gemm_backend_for(x.device, group_size).quantize_act(
        x, smooth, proj_down, group_size=group_size, unsigned=unsigned, shift=shift
    )


@_quantize_act_op.register_fake
def _quantize_act_fake(x, smooth, proj_down, group_size, unsigned, shift):
    m, k = x.shape
    return (
        x.new_empty(m, k // 2, dtype=torch.uint8),  # qx
        empty_ascales(m, k // group_size, x.device),  # ascales [M, G], strides (1, M)
        x.new_empty(m, proj_down.shape[0], dtype=torch.float32),  # lora_act
    )


@torch.library.custom_op("svdq::quantize_act_prologue", mutates_args=())
def _quantize_act_prologue_op(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    group_size: int,
    unsigned: bool,
    shift: float,
    gelu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return op_backend_for(x.device, "quantize_act_prologue").quantize_act_prologue(
        x,
        smooth,
        proj_down,
        mod_scale,
        mod_shift,
        group_size=group_size,
        unsigned=unsigned,
        shift=shift,
        gelu=gelu,
    )


@_quantize_act_prologue_op.register_fake
def _(x, smooth, proj_down, mod_scale, mod_shift, group_size, unsigned, shift, gelu):
    return _quantize_act_fake(x, smooth, proj_down, group_size, unsigned, shift)


@torch.library.custom_op("svdq::w4a4_gemm", mutates_args=())
def _w4a4_gemm_op(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    residual: torch.Tensor | None,
    gate: torch.Tensor | None,
    unsigned: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    group_size = 2 * qx.shape[1] // max(ascales.shape[1], 1)  # w4a4_gemm checked that G divides K
    return gemm_backend_for(qx.device, group_size).w4a4_gemm(
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


@_w4a4_gemm_op.register_fake
def _(qx, ascales, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, unsigned, out_dtype):
    return qx.new_empty(qx.shape[0], qweight.shape[0], dtype=out_dtype)  # [M, N] contiguous


@torch.library.custom_op("svdq::w4a16_gemv", mutates_args=())
def _w4a16_gemv_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return op_backend_for(x.device, "w4a16_gemv").w4a16_gemv(x, qweight, wscales, wzeros, bias)


@_w4a16_gemv_op.register_fake
def _(x, qweight, wscales, wzeros, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("svdq::quantize_act_fp8", mutates_args=())
def _quantize_act_fp8_op(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    shift: float,
    gelu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return w4a8_backend_for(x.device).quantize_act_fp8(
        x, smooth, proj_down, mod_scale, mod_shift, shift=shift, gelu=gelu
    )


@_quantize_act_fp8_op.register_fake
def _(x, smooth, proj_down, mod_scale, mod_shift, shift, gelu):
    m, k = x.shape
    return (
        x.new_empty(m, k, dtype=torch.float8_e4m3fn),  # codes [M, K] contiguous
        x.new_empty(m, dtype=torch.float32),  # ascale [M]
        x.new_empty(m, proj_down.shape[0], dtype=torch.float32),  # lora_act [M, R] contiguous
    )


@torch.library.custom_op("svdq::w4a8_gemm", mutates_args=())
def _w4a8_gemm_op(
    codes: torch.Tensor,
    ascale: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    residual: torch.Tensor | None,
    gate: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return w4a8_backend_for(codes.device).w4a8_gemm(
        codes, ascale, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, out_dtype=out_dtype
    )


@_w4a8_gemm_op.register_fake
def _(codes, ascale, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, out_dtype):
    return codes.new_empty(codes.shape[0], qweight.shape[0], dtype=out_dtype)  # [M, N] contiguous


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "W4A8_MIN_M",
    "W4A8_MODES",
    "BackendUnavailableError",
    "KernelConfig",
    "backend_for",
    "config",
    "configure",
    "gemm_backend_for",
    "get_backend",
    "op_backend_for",
    "qk_norm_rope",
    "qk_norm_rope_sage",
    "quantize_act",
    "quantize_act_fp8",
    "sage_attention_int8",
    "unavailable_reason",
    "w4a4_gemm",
    "w4a8_backend_for",
    "w4a8_gemm",
    "w4a8_min_m",
    "w4a8_route",
    "w4a8_served",
    "w4a8_supports",
    "w4a16_gemv",
]
