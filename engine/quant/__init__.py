"""SVDQuant numerics in plain torch: the ground truth every kernel is tested against."""

from engine.quant.calib import ActivationRecorder, LayerStats
from engine.quant.int4 import (
    DEFAULT_GROUP_SIZE,
    dequantize_int4,
    dequantize_int4_asym,
    pack_int4,
    quantize_int4,
    quantize_int4_asym,
    unpack_int4,
)
from engine.quant.svdquant import (
    DEFAULT_ALPHAS,
    GELU_SHIFT,
    SVDQConfig,
    SVDQWeight,
    lowrank_split,
    quantize_svdq,
    relative_error,
    search_alpha,
    smooth_factors,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_GROUP_SIZE",
    "GELU_SHIFT",
    "ActivationRecorder",
    "LayerStats",
    "SVDQConfig",
    "SVDQWeight",
    "dequantize_int4",
    "dequantize_int4_asym",
    "lowrank_split",
    "pack_int4",
    "quantize_int4",
    "quantize_int4_asym",
    "quantize_svdq",
    "relative_error",
    "search_alpha",
    "smooth_factors",
    "unpack_int4",
]
