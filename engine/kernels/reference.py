"""Reference backend: the ground truth of engine.quant.ops served as a kernel backend, on any device."""

from __future__ import annotations

import torch

from engine.quant.ops import (
    qk_norm_rope,
    qk_norm_rope_sage,
    quantize_act,
    quantize_act_fp8,
    quantize_act_prologue,
    w4a4_gemm,
    w4a8_gemm,
    w4a16_gemv,
)

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    return None


__all__ = [
    "NAME",
    "qk_norm_rope",
    "qk_norm_rope_sage",
    "quantize_act",
    "quantize_act_fp8",
    "quantize_act_prologue",
    "unavailable_reason",
    "w4a4_gemm",
    "w4a8_gemm",
    "w4a16_gemv",
]
