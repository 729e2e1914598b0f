"""Which linears of diffusers' FluxTransformer2DModel are quantized, and how: one table."""

from __future__ import annotations

import enum
import re

from torch import nn


class Treatment(enum.Enum):
    W4A4 = "w4a4"  # SVDQLinear, signed activation codes
    W4A4_UNSIGNED = "w4a4_unsigned"  # SVDQLinear on a GELU-tanh output: unsigned codes + shift
    W4A16 = "w4a16"  # W4A16Linear: the input is one conditioning vector per image


_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."

# Matched against the full module name. Everything else (embedders, norm_out, proj_out) stays 16-bit.
LAYER_TABLE: tuple[tuple[str, Treatment], ...] = (
    (
        _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        Treatment.W4A4,
    ),
    (_DOUBLE + r"(ff|ff_context)\.net\.0\.proj", Treatment.W4A4),
    (_DOUBLE + r"(ff|ff_context)\.net\.2", Treatment.W4A4_UNSIGNED),
    (_SINGLE + r"(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)", Treatment.W4A4),
    (_DOUBLE + r"(norm1|norm1_context)\.linear", Treatment.W4A16),
    (_SINGLE + r"norm\.linear", Treatment.W4A16),
)


def treatment_of(name: str) -> Treatment | None:
    for pattern, treatment in LAYER_TABLE:
        if re.fullmatch(pattern, name):
            return treatment
    return None


def target_layers(model: nn.Module) -> dict[str, Treatment]:
    """``{module name: treatment}`` for every ``nn.Linear`` of ``model`` that the table names."""
    return {
        name: t
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (t := treatment_of(name)) is not None
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
