"""SVDQuant numerics in plain torch: the ground truth every kernel is tested against."""

from engine.quant.calib import ActivationRecorder, LayerStats
from engine.quant.gptq import DEFAULT_DAMP, gptq_quantize, second_moment
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
    ROUNDINGS,
    SVDQConfig,
    SVDQWeight,
    lowrank_split,
    quantize_svdq,
    relative_error,
    search_alpha,
    smooth_factors,
    smoothed_second_moment,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_DAMP",
    "DEFAULT_GROUP_SIZE",
    "GELU_SHIFT",
    "ROUNDINGS",
    "ActivationRecorder",
    "LayerStats",
    "SVDQConfig",
    "SVDQWeight",
    "dequantize_int4",
    "dequantize_int4_asym",
    "gptq_quantize",
    "lowrank_split",
    "pack_int4",
    "quantize_int4",
    "quantize_int4_asym",
    "quantize_svdq",
    "relative_error",
    "search_alpha",
    "second_moment",
    "smooth_factors",
    "smoothed_second_moment",
    "unpack_int4",
]
