"""FLUX.1 with SVDQuant layers: the layer table, calibration, quantization, checkpoints."""

from engine.flux.blocks import (
    FusedFluxSingleTransformerBlock,
    FusedFluxTransformerBlock,
    fuse_projections,
    is_fused,
)
from engine.flux.checkpoint import CheckpointError, read_metadata, save_checkpoint
from engine.flux.layers import LAYER_TABLE, Treatment, target_layers, treatment_of
from engine.flux.model import SVDQFluxTransformer2DModel, load_transformer
from engine.flux.quantize import DEFAULT_RESOLUTIONS, LayerReport, calibrate, quantize_transformer

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "LAYER_TABLE",
    "CheckpointError",
    "FusedFluxSingleTransformerBlock",
    "FusedFluxTransformerBlock",
    "LayerReport",
    "SVDQFluxTransformer2DModel",
    "Treatment",
    "calibrate",
    "fuse_projections",
    "is_fused",
    "load_transformer",
    "quantize_transformer",
    "read_metadata",
    "save_checkpoint",
    "target_layers",
    "treatment_of",
]
