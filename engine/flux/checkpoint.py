"""Our checkpoint: one .safetensors holding the whole quantized transformer, plus metadata.

Tensors: the transformer's full state dict. Quantized linears carry ``qweight``, ``wscales``,
``smooth_factor``, ``proj_down``, ``proj_up``, ``bias`` (W4A4) or ``qweight``, ``wscales``,
``wzeros``, ``bias`` (W4A16); every other parameter is stored as is. Metadata (strings):
``format`` = "svdquant-flux", ``format_version``, ``quant_config`` (JSON of SVDQConfig, incl. ``rounding``),
``transformer_config`` (JSON of the diffusers config, so no model folder is needed to load),
``unsigned_layers`` (JSON list), ``act_shift``, and ``converted_from`` for a file converted
from the public engine's. See docs/checkpoint-format.md.

``format_version`` 2 (what this engine writes): the fused blocks of ``engine.flux.blocks``,
whose q/k/v projections are one layer (``attn.to_qkv``, ``attn.to_added_qkv``; the single
block's ``to_qkv_mlp`` also holds proj_mlp) and whose single-block ``proj_out`` is stored as
``proj_out.parts.{0,1}``. Version 1 (read only): diffusers' own layers, each sibling smoothed
on its own, so they cannot be fused exactly; such files load with diffusers' block forwards.

This module owns the format: the metadata, its two versions (``format_version``, the file
layout; ``quant_config.version``, the config's schema), the atomic write, and reading the
public engine's checkpoint through the layout translation of ``engine.flux.nunchaku``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from engine.flux.blocks import fuse_projections, unfused_blocks
from engine.flux.layers import SplitInputLinear, Treatment, set_module, split_sizes, target_layers
from engine.modules import SVDQLinear, W4A16Linear
from engine.quant import GELU_SHIFT, SVDQConfig

logger = logging.getLogger(__name__)

FORMAT = "svdquant-flux"
FORMAT_VERSION = 2  # 1: diffusers' separate q/k/v layers; 2: fused (engine.flux.blocks)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a quantized FLUX transformer."""


def make_metadata(
    config: SVDQConfig,
    transformer_config: dict,
    unsigned_layers: list[str],
    act_shift: float = GELU_SHIFT,
    converted_from: str | None = None,
) -> dict[str, str]:
    """Our file's metadata: the one place that writes it."""
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "quant_config": json.dumps(dataclasses.asdict(config)),
        # The architecture only: no local path of the machine that quantized it.
        "transformer_config": json.dumps(
            {k: v for k, v in transformer_config.items() if k != "_name_or_path"}
        ),
        "unsigned_layers": json.dumps(sorted(unsigned_layers)),
        "act_shift": repr(float(act_shift)),
    }
    if converted_from:
        metadata["converted_from"] = converted_from
    return metadata


def read_config(metadata: dict[str, str], path: str | Path = "<metadata>") -> SVDQConfig:
    """The SVDQConfig a file was written with, both versions checked."""
    version = metadata.get("format_version", "0")
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}: this engine reads 1..{FORMAT_VERSION}")
    try:
        fields = json.loads(metadata["quant_config"])
        if "alphas" in fields:
            fields["alphas"] = tuple(fields["alphas"])
        fields.setdefault("rounding", "rtn")  # written before the field existed: round to nearest
        config = SVDQConfig(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable quant_config ({e})") from e
    if config.version != SVDQConfig.version:
        raise CheckpointError(
            f"{path}: quant_config version {config.version}: this engine reads {SVDQConfig.version}"
        )
    return config


def write_checkpoint(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``state`` under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    tmp.replace(path)
    return path


def save_checkpoint(transformer: nn.Module, path: str | Path, config: SVDQConfig) -> Path:
    """Write the quantized ``transformer`` to ``path`` in our format (version 2: fused blocks).

    A transformer with diffusers' separate q/k/v layers (loaded from a version-1 file) is
    refused: its siblings were smoothed separately, so they have no exact fused form.
    """
    unfused = unfused_blocks(transformer)
    if unfused:
        raise ValueError(
            "only fused transformers are written (checkpoint format version 2); blocks "
            f"{unfused[:3]} ({len(unfused)}) have diffusers' separate q/k/v layers, as a version-1 file "
            "holds them: keep using that file, or re-quantize with scripts/quantize_flux.py"
        )
    unsigned = [n for n, m in transformer.named_modules() if isinstance(m, SVDQLinear) and m.unsigned]
    shifts = {m.act_shift for m in transformer.modules() if isinstance(m, SVDQLinear) and m.unsigned}
    if len(shifts) > 1:
        raise ValueError(f"unsigned layers disagree on act_shift: {sorted(shifts)}")
    metadata = make_metadata(
        config, dict(transformer.config), unsigned, shifts.pop() if shifts else GELU_SHIFT
    )
    return write_checkpoint(transformer.state_dict(), path, metadata)


def convert_public_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The public engine's INT4 file at ``path`` as our tensors and metadata (in memory)."""
    from engine.flux import nunchaku

    metadata, shapes = read_metadata(path)
    if not nunchaku.is_nunchaku(metadata, set(shapes)):
        raise CheckpointError(
            f"{path}: not an {FORMAT} checkpoint nor the public engine's (metadata format={metadata.get('format')!r})"
        )
    if "config" not in metadata:
        raise CheckpointError(
            f"{path}: the public engine's tensors without its metadata (no 'config' entry): this loader "
            "reads its merged single file, e.g. svdq-int4_r32-flux.1-schnell.safetensors of "
            "nunchaku-tech/nunchaku-flux.1-schnell, whose metadata holds the transformer 'config' and "
            "'quantization_config'; deepcompressor's output (transformer_blocks.safetensors + "
            "unquantized_layers.safetensors) must be merged into such a file first"
        )
    try:
        config = json.loads(metadata["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its 'config' metadata is not JSON ({e})") from e
    refuse_guidance_distilled(config, path)
    try:
        c = nunchaku.convert_state_dict(load_file(str(path)), metadata)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot convert the public engine's checkpoint: {e}") from e
    logger.info("public engine's checkpoint %s: %s", path, c.describe())
    # Their file says how it is laid out, not how it was quantized: the procedure fields of the
    # config (alphas, svd_niter, rounding) are our defaults there, and converted_from says so.
    config = SVDQConfig(rank=c.rank, group_size=64)
    return c.state, make_metadata(config, c.transformer_config, c.unsigned_layers, converted_from="nunchaku")


def read_metadata(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The file's metadata and the shape of every tensor, without reading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def refuse_guidance_distilled(transformer_config: dict, path: str | Path) -> None:
    """A FLUX.1-dev transformer (``guidance_embeds``) is refused: this engine serves schnell.

    FLUX.1-dev takes a guidance value as an input of the transformer (BFL's default 3.5) and
    28-50 steps; our pipeline passes guidance 0 and serves 1-4 steps, as Replicate's
    flux-schnell does, so a dev file would load and give wrong images without a word.
    """
    if transformer_config.get("guidance_embeds"):
        raise CheckpointError(
            f"{path}: a FLUX.1-dev (guidance-distilled) transformer: its config has guidance_embeds=true. "
            "This engine serves FLUX.1-schnell (no guidance input, 1-4 steps) and would run it with "
            "guidance 0; use a FLUX.1-schnell checkpoint (e.g. svdq-int4_r32-flux.1-schnell)"
        )


def _check_dtypes(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of the file has the kind of dtype its place expects: the integer codes
    exactly (uint8), every other tensor a 16- or 32-bit float. An fp8 scale or an int8 code
    would otherwise be assigned as it is and compute numbers of another meaning."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, t in state.items():
        want = expected.get(key)
        if want is None:
            continue  # reported as unexpected by load_state_dict
        if not want.dtype.is_floating_point:
            ok = t.dtype == want.dtype
        else:
            ok = t.dtype in (torch.float32, torch.bfloat16, torch.float16)
        if not ok:
            need = want.dtype if not want.dtype.is_floating_point else "float32, bfloat16 or float16"
            raise CheckpointError(f"{path}: tensor {key} is {t.dtype}: expected {need}")


def _skeleton(
    metadata: dict[str, str], shapes: dict[str, tuple[int, ...]], path: Path, model_class: type
) -> nn.Module:
    """The transformer with quantized modules in place, every tensor on the meta device."""
    try:
        config = json.loads(metadata["transformer_config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable transformer_config in its metadata ({e!r})") from e
    refuse_guidance_distilled(config, path)
    svdq_config = read_config(metadata, path)
    unsigned = set(json.loads(metadata.get("unsigned_layers", "[]")))
    act_shift = float(metadata.get("act_shift", GELU_SHIFT))
    with torch.device("meta"):
        model = model_class.from_config(config)
    model.svdq_config = svdq_config  # what save_pretrained writes back
    if int(metadata["format_version"]) >= 2:
        fuse_projections(model)  # the fused blocks, their float layers still on the meta device

    def svdq(name: str, in_features: int, out_features: int) -> SVDQLinear:
        if f"{name}.proj_down" not in shapes:
            raise CheckpointError(f"{path}: no quantized tensors for layer {name} (missing {name}.proj_down)")
        return SVDQLinear(
            in_features,
            out_features,
            rank=shapes[f"{name}.proj_down"][0],
            bias=f"{name}.bias" in shapes,
            group_size=svdq_config.group_size,
            unsigned=name in unsigned,
            act_shift=act_shift if name in unsigned else 0.0,
            device="meta",
        )

    for name, treatment in target_layers(model).items():
        linear = model.get_submodule(name)
        n, k = linear.out_features, linear.in_features
        if treatment is Treatment.W4A16:
            if f"{name}.wzeros" not in shapes:
                raise CheckpointError(
                    f"{path}: no quantized tensors for layer {name} (missing {name}.wzeros)"
                )
            q = W4A16Linear(k, n, bias=linear.bias is not None, group_size=svdq_config.group_size, device="meta")
        elif treatment is Treatment.W4A4_SPLIT:
            sizes = split_sizes(model, name)
            q = SplitInputLinear([svdq(f"{name}.parts.{i}", size, n) for i, size in enumerate(sizes)], sizes)
        else:
            q = svdq(name, k, n)
        set_module(model, name, q)
    return model


def load_transformer(
    path: str | Path, device: torch.device | str = "cpu", *, model_class: type | None = None
) -> nn.Module:
    """Build the quantized transformer from a checkpoint, directly on ``device``.

    Reads our format, or the public engine's INT4 checkpoint (told apart by its metadata and
    keys, converted in memory). The skeleton is built on the meta device (no float weight is
    ever allocated), then each tensor of the file is read onto ``device`` and assigned in place.
    """
    path = Path(path)
    t0 = time.perf_counter()
    metadata, shapes = read_metadata(path)
    state = None
    if metadata.get("format") != FORMAT:
        state, metadata = convert_public_checkpoint(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        logger.info("converted the public engine's checkpoint %s to our layout", path)
    if model_class is None:
        from diffusers import FluxTransformer2DModel as model_class
    model = _skeleton(metadata, shapes, path, model_class)
    if state is None:
        state = load_file(str(path), device=str(device))
        if torch.device(device).type == "cpu":
            # Tensors read on the CPU sit at the file's byte offsets; CPU matmuls may round
            # differently at other alignments, so a re-saved file (other offsets) would change
            # the last bits. Fresh allocations make the output depend on the values only.
            for k in list(state):
                state[k] = state[k].clone()
    else:
        state = {k: v.to(device) for k, v in state.items()}
    _check_dtypes(model, state, path)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(f"{path}: does not match the transformer: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not match the transformer: missing {result.missing_keys[:5]}"
            f" ({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: tensors not filled from the file: {left[:5]}")
    model.eval().requires_grad_(False)
    logger.info(
        "loaded quantized transformer from %s onto %s in %.2f s", path, device, time.perf_counter() - t0
    )
    return model
