"""CUDA backend: 4-bit integer tensor-core MMA (mma.m16n8k64 s4/u4) for sm_80, sm_86 and sm_89.

The A40 (sm_86) runs 4-bit MMA at twice its 8-bit rate; Triton has no 4-bit dot, so this small
extension of our own takes that last 2x. Hopper (sm_90) and newer have no 4-bit integer MMA:
there the dispatch uses Triton. Sources: csrc/quantize_act.cu and csrc/w4a4_gemm.cu (device code, plain
CUDA, one file per kernel family, sharing csrc/fragments.cuh) and csrc/ops.cpp (torch binding, ops
``torch.ops.svdq_cuda.*``). The container image installs them
prebuilt (the ``svdq_cuda_kernels`` package, scripts/build_kernel_sdist.py); elsewhere they are
built just in time on first use with torch.utils.cpp_extension (cached in the folder given to
``engine.kernels.configure(ext_dir=...)``, or torch's default) for the archs in ``TORCH_CUDA_ARCH_LIST`` (default: this GPU's), with
torch's own compiler flags.

The kernels read the checkpoint's plain packed layout: ``ldmatrix`` from shared memory yields the
MMA fragments directly, so no weight repacking is needed at load. w4a4_gemm: 192x128 CTA tiles,
12 warps, a 4-stage cp.async pipeline, int32 partial sums turned into fp32 by a magic-number add
folded into the MMA's accumulator input, the low-rank up-projection on bf16 tensor cores (its
operands and the bias staged through shared memory after the main loop, 16-byte loads), grouped
CTA order, one kernel instance per output dtype and epilogue; per accumulator and group two FFMA (the activation scale rounded to 22 bits so
that one FFMA removes the magic offset and scales, as the Triton kernel does). quantize_act:
coalesced 16-byte loads, group maxima by warp shuffles, the down-projection on bf16 tensor cores;
its ``ascales`` are group-major [M, G] (strides (1, M)) like every backend's (torch.compile asserts
the fake op's strides). The GEMM accepts any scale strides; group-major ones (``ascales`` (1, M),
``wscales`` (1, N)) make each group's scale loads one coalesced row. See docs/benchmarks.md for the
modelled speed and tests/test_cuda_static.py for the gates.

Precision: the low-rank branches run as two bf16 MMAs (the fp32 operand split into bf16 hi + lo,
about 16 significant bits); fp16/fp32 ``proj_down``/``proj_up`` are split the same way at call
time (bf16 weights pass through). Deterministic: one CTA owns each output tile and sums its
groups in a fixed order; quantize_act adds its warps' low-rank partials in a fixed order; no
atomics.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NAME = "cuda"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "ops.cpp", CSRC / "quantize_act.cu", CSRC / "w4a4_gemm.cu")
SUPPORTED_ARCHS = ((8, 0), (8, 6), (8, 7), (8, 9))
# One K=64 MMA step per scale: the kernels are written for group 64 only (the public format's).
# kernels.gemm_backend_for sends other group sizes to Triton under auto.
GROUP_SIZES = (64,)


def _check_group_size(group_size: int) -> None:
    """A clear refusal before the extension (whose own TORCH_CHECK says the same) is reached."""
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"the cuda backend supports group_size 64 only, got {group_size}: "
            "use the triton backend (SVDQ_KERNELS=triton or auto) for this layer"
        )


@functools.cache
def _build() -> str | None:
    """Load the prebuilt extension, or build it; once per process. The reason it failed, or None."""
    from torch.utils.cpp_extension import load

    t0 = time.perf_counter()
    try:
        import svdq_cuda_kernels  # noqa: F401  (the image's prebuilt package registers the ops)
    except ImportError as e:
        logger.info("no prebuilt SVDQuant CUDA package (%s): building just in time", e)
    except OSError as e:  # installed but will not load (e.g. built against another torch)
        logger.warning("the prebuilt SVDQuant CUDA package does not load (%s): building just in time", e)
    else:
        logger.info("SVDQuant CUDA extension: prebuilt package loaded in %.1f s", time.perf_counter() - t0)
        return None
    try:
        load(
            name="svdq_cuda",
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3"],  # torch's own -std (C++17 or newer) stays in force
            extra_cuda_cflags=["-O3"],
            build_directory=_build_dir(),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler missing, compile error, link error: reported, not raised
        return f"could not build the extension ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]})"
    logger.info("SVDQuant CUDA extension built/loaded in %.1f s", time.perf_counter() - t0)
    return None


def _build_dir() -> str | None:
    from engine import kernels

    path = kernels.config().ext_dir  # configure(ext_dir=...): setup() puts it beside the weights
    if path:
        path.mkdir(parents=True, exist_ok=True)
    return str(path) if path else None


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "it runs on CUDA GPUs of compute capability 8.x only"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    cap = torch.cuda.get_device_capability(device)
    if cap not in SUPPORTED_ARCHS:
        return (
            f"compute capability {cap[0]}.{cap[1]} has no 4-bit integer MMA (sm_80/86/87/89 only); "
            "use the triton backend"
        )
    return _build()


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    *,
    group_size: int,
    unsigned: bool,
    shift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_group_size(group_size)
    # ascales come from the kernel group-major (ops.cpp), the layout every backend returns.
    return torch.ops.svdq_cuda.quantize_act(x, smooth, proj_down, group_size, unsigned, shift)


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
    _check_group_size(2 * qx.shape[1] // max(ascales.shape[1], 1))
    return torch.ops.svdq_cuda.w4a4_gemm(
        qx, ascales, qweight, wscales, lora_act, proj_up, bias, partial, residual, gate, unsigned, out_dtype
    )
