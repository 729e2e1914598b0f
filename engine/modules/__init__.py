"""Quantized drop-in replacements for ``nn.Linear``."""

from engine.modules.svdq_linear import SVDQLinear
from engine.modules.w4a16_linear import W4A16Linear

__all__ = ["SVDQLinear", "W4A16Linear"]
