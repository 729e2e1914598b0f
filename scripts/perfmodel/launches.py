"""The Triton launchers' real arguments for FLUX's shapes: each launcher of the backend is called
on meta tensors with its kernel replaced by a recorder, so strides, group-major scales and
Triton's integer specialization are the ones a launch passes."""

from __future__ import annotations

import os
import sys

# The models that capture launches compile for GPU targets: refuse the interpreter, as every
# Triton model's command line did (the GEMV byte count's child runs under it on purpose).
if os.environ.get("TRITON_INTERPRET") == "1" and "--gemv-bytes-child" not in sys.argv:
    sys.exit("run without TRITON_INTERPRET=1: this script compiles the kernels for GPU targets")

import torch

import engine.kernels.triton_backend as tb
from perfmodel.shapes import RANK

# --- capturing the launcher's arguments ------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def capture(kernel_attr: str, major: int, call) -> tuple:
    """Run a launcher of ``tb`` on meta tensors and return (grid, args, kwargs) of its launch."""
    rec, saved = _Recorder(), (getattr(tb, kernel_attr), tb._major)
    setattr(tb, kernel_attr, rec)
    tb._major = lambda device: major
    try:
        call()
    finally:
        setattr(tb, kernel_attr, saved[0])
        tb._major = saved[1]
    (launch,) = rec.calls
    return launch


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def gemm_launch(
    m: int, k: int, n: int, major: int, cfg, unsigned: bool = False, rank: int = RANK, gated: bool = False
) -> tuple:
    """``gated``: with the whole epilogue (partial [M, N], residual [M, N], gate [1, N])."""
    g = k // 64
    ascales = _meta(g, m, dtype=torch.float32).t()  # group-major, as quantize_act returns them
    wscales = _meta(g, n, dtype=torch.float32).t()  # group-major, as SVDQLinear stores them
    args = (_meta(m, k // 2, dtype=torch.uint8), ascales, _meta(n, k // 2, dtype=torch.uint8), wscales)
    rest = (_meta(m, rank, dtype=torch.float32), _meta(n, rank), _meta(n))
    if gated:
        rest = (*rest, _meta(m, n), _meta(m, n), _meta(1, n))

    def call():
        tb.launch_w4a4_gemm(*args, *rest, unsigned=unsigned, out_dtype=torch.bfloat16, config=cfg)

    return capture("w4a4_gemm_kernel", major, call)


def act_launch(m: int, k: int, major: int, rank: int = RANK, prologue: str = "") -> tuple:
    """quantize_act's launch; ``prologue`` "modulation" or "gelu": quantize_act_prologue's."""

    def call():
        x, smooth, down = _meta(m, k), _meta(k), _meta(rank, k)
        if not prologue:
            tb.quantize_act(x, smooth, down, group_size=64, unsigned=False, shift=0.0)
            return
        mod = (_meta(1, k), _meta(1, k)) if prologue == "modulation" else (None, None)
        tb.quantize_act_prologue(
            x, smooth, down, *mod, group_size=64, unsigned=False, shift=0.0, gelu=prologue == "gelu"
        )

    return capture("quantize_act_kernel", major, call)


def gemv_launch(m: int, k: int, n: int, major: int) -> tuple:
    def call():
        tb.w4a16_gemv(
            _meta(m, k), _meta(n, k // 2, dtype=torch.uint8), _meta(n, k // 64), _meta(n, k // 64), _meta(n)
        )

    return capture("w4a16_gemv_kernel", major, call)


def gemm_launch_grouped(m: int, k: int, n: int, major: int, cfg, group: int) -> tuple:
    """gemm_launch for a checkpoint quantized with ``group``-channel groups on both operands."""
    g = k // group
    ascales, wscales = _meta(g, m, dtype=torch.float32).t(), _meta(g, n, dtype=torch.float32).t()
    args = (_meta(m, k // 2, dtype=torch.uint8), ascales, _meta(n, k // 2, dtype=torch.uint8), wscales)
    rest = (_meta(m, RANK, dtype=torch.float32), _meta(n, RANK), _meta(n))

    def call():
        tb.launch_w4a4_gemm(*args, *rest, unsigned=False, out_dtype=torch.bfloat16, config=cfg)

    return capture("w4a4_gemm_kernel", major, call)
