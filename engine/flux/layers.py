"""Which linears of diffusers' FluxTransformer2DModel are quantized, and how: one table."""

from __future__ import annotations

import enum
import re

import torch
from torch import nn


class Treatment(enum.Enum):
    W4A4 = "w4a4"  # SVDQLinear, signed activation codes
    W4A4_UNSIGNED = "w4a4_unsigned"  # SVDQLinear on a GELU-tanh output: unsigned codes + shift
    W4A16 = "w4a16"  # W4A16Linear: the input is one conditioning vector per image
    # The single block's proj_out sees concat(attention output, GELU-tanh(MLP)): two SVDQLinears
    # over the two slices, signed codes for the first and unsigned for the second.
    W4A4_SPLIT = "w4a4_split"


_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."

# Matched against the full module name. Everything else (embedders, norm_out, proj_out) stays 16-bit.
# diffusers' own layers (what calibration sees, and version-1 checkpoints hold) and the fused
# layers of engine.flux.blocks (version 2): q/k/v (+ proj_mlp) as one linear, proj_out in parts.
LAYER_TABLE: tuple[tuple[str, Treatment], ...] = (
    (_DOUBLE + r"attn\.(to_qkv|to_added_qkv)", Treatment.W4A4),
    (_SINGLE + r"to_qkv_mlp", Treatment.W4A4),
    (_SINGLE + r"proj_out\.parts\.0", Treatment.W4A4),
    (_SINGLE + r"proj_out\.parts\.1", Treatment.W4A4_UNSIGNED),
    (
        _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        Treatment.W4A4,
    ),
    (_DOUBLE + r"(ff|ff_context)\.net\.0\.proj", Treatment.W4A4),
    (_DOUBLE + r"(ff|ff_context)\.net\.2", Treatment.W4A4_UNSIGNED),
    (_SINGLE + r"(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)", Treatment.W4A4),
    (_SINGLE + r"proj_out", Treatment.W4A4_SPLIT),
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


class SplitInputLinear(nn.Module):
    """``y = sum_i parts[i](x[..., slice_i])``: one linear whose input is a concatenation.

    Keeps the parent's interface (one module, one input) while each slice gets its own
    quantization: its own smoothing, low-rank branch and code signedness.
    """

    def __init__(self, parts: list[nn.Module], sizes: list[int]) -> None:
        super().__init__()
        if len(parts) != len(sizes):
            raise ValueError("one size per part")
        self.parts = nn.ModuleList(parts)
        self.sizes = list(sizes)
        self.in_features = sum(sizes)
        self.out_features = parts[0].out_features
        if any(p.out_features != self.out_features for p in parts):
            raise ValueError("every part must have the same out_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x, self.sizes, dim=-1)
        out = self.parts[0](chunks[0])
        for part, chunk in zip(self.parts[1:], chunks[1:], strict=True):
            out = out + part(chunk)
        return out


@torch.no_grad()
def split_linear(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """``linear`` as one float linear per input slice (``sizes``): their outputs add up to its
    output; the bias goes to the first."""
    parts, start = [], 0
    for i, size in enumerate(sizes):
        part = nn.Linear(
            size,
            linear.out_features,
            bias=i == 0 and linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        part.weight.copy_(linear.weight[:, start : start + size])
        if part.bias is not None:
            part.bias.copy_(linear.bias)
        parts.append(part)
        start += size
    return parts


def split_sizes(model: nn.Module, name: str) -> list[int]:
    """Input slices of a W4A4_SPLIT layer: [attention width, MLP hidden width]."""
    block = model.get_submodule(name.rpartition(".")[0])
    mlp = block.mlp_hidden_dim
    return [model.get_submodule(name).in_features - mlp, mlp]


def calibration_source(model: nn.Module, name: str) -> tuple[str, slice | None]:
    """Which calibrated layer of diffusers' model saw the input of layer ``name`` (a fused or
    split layer of the fused model), and which of its input channels: siblings share their
    input, so a fused layer's statistics are those of its first sibling."""
    if name.endswith(".attn.to_qkv"):
        return name.removesuffix("to_qkv") + "to_q", None
    if name.endswith(".attn.to_added_qkv"):
        return name.removesuffix("to_added_qkv") + "add_q_proj", None
    if name.endswith(".to_qkv_mlp"):
        return name.removesuffix("to_qkv_mlp") + "attn.to_q", None
    m = re.fullmatch(r"(.+)\.proj_out\.parts\.(\d)", name)
    if m:
        sizes = model.get_submodule(f"{m.group(1)}.proj_out").sizes
        start = sum(sizes[: int(m.group(2))])
        return f"{m.group(1)}.proj_out", slice(start, start + sizes[int(m.group(2))])
    return name, None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
