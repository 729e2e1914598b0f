"""Calibrate a float FLUX pipeline and turn its transformer into the SVDQuant one, in place."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from engine.flux.blocks import fuse_projections
from engine.flux.layers import (
    SplitInputLinear,
    Treatment,
    calibration_source,
    set_module,
    split_linear,
    split_sizes,
    target_layers,
)
from engine.flux.prompts import CALIBRATION_PROMPTS
from engine.modules import SVDQLinear, W4A16Linear
from engine.quant import GELU_SHIFT, ActivationRecorder, LayerStats, SVDQConfig, relative_error

logger = logging.getLogger(__name__)

DEFAULT_RESOLUTIONS = ((1024, 1024), (1344, 768), (768, 1344))


@dataclasses.dataclass
class LayerReport:
    name: str
    treatment: Treatment
    alpha: float | None
    error: float  # relative output error on the layer's calibration sample
    seconds: float


@torch.no_grad()
def calibrate(
    pipe,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int = 32,
    resolutions: Sequence[tuple[int, int]] = DEFAULT_RESOLUTIONS,
    steps: int = 4,
    max_samples: int = 256,
    seed: int = 0,
    on_prompt: Callable[[int, int], None] | None = None,
) -> dict[str, LayerStats]:
    """Run the float pipeline and record what every layer to be quantized sees.

    Prompt ``i`` is rendered at ``resolutions[i % len(resolutions)]`` for ``steps`` steps (only
    the transformer's denoising matters, so the VAE is not run).
    """
    prompts = list(prompts or CALIBRATION_PROMPTS[:n_prompts])
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    names = list(target_layers(pipe.transformer))
    with ActivationRecorder(pipe.transformer, names, max_samples=max_samples, seed=seed) as rec:
        for i, prompt in enumerate(prompts):
            width, height = resolutions[i % len(resolutions)]
            pipe(
                prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                output_type="latent",
                generator=torch.Generator("cpu").manual_seed(seed + i),
            )
            if on_prompt:
                on_prompt(i + 1, len(prompts))
    missing = [n for n in names if n not in rec.stats]
    if missing:
        raise RuntimeError(f"calibration never reached these layers: {missing[:5]}")
    return rec.stats


@torch.no_grad()
def quantize_transformer(
    transformer: nn.Module,
    stats: dict[str, LayerStats],
    config: SVDQConfig,
    *,
    dtype: torch.dtype | None = None,
    on_layer: Callable[[LayerReport], None] | None = None,
    fuse: bool = True,
) -> list[LayerReport]:
    """Swap every layer of the table for its quantized module, one layer at a time.

    ``stats`` are calibrate()'s, keyed by diffusers' layer names. With ``fuse`` (the default,
    what checkpoints hold) the blocks are first made the fused ones of engine.flux.blocks: q/k/v
    (and the single blocks' proj_mlp) become one linear, quantized as one (one smoothing factor
    searched on the concatenated weight, one low-rank branch), with the statistics of the
    input the siblings share. ``fuse=False`` keeps diffusers' layers (the version-1 layout).

    Each float layer is replaced (and freed) as soon as its quantized twin exists, so peak
    memory stays near the float model plus one layer's work. ``dtype`` is the storage type of
    the 16-bit tensors (default: the layer's own if 16-bit, else bfloat16).
    """
    if fuse:
        fuse_projections(transformer)
    reports = []
    for name, treatment in target_layers(transformer).items():
        linear = transformer.get_submodule(name)
        source, cols = calibration_source(transformer, name)
        st = stats.get(source)
        if st is None:
            raise KeyError(f"no calibration statistics for layer {source}" + (f" (for {name})" if source != name else ""))
        samples, act_max = (st.samples, st.act_max) if cols is None else (st.samples[:, cols], st.act_max[cols])
        t0 = time.perf_counter()
        x = samples.to(linear.weight.device, linear.weight.dtype)
        if treatment is Treatment.W4A16:
            q, alpha = W4A16Linear.from_linear(linear, config.group_size, dtype=dtype), None
        elif treatment is Treatment.W4A4_SPLIT:
            q, alpha = _quantize_split(linear, st, split_sizes(transformer, name), config, dtype), None
        else:
            unsigned = treatment is Treatment.W4A4_UNSIGNED
            q = _svdq(linear, samples, act_max, config, dtype, unsigned=unsigned)
            alpha = q.alpha
        err = relative_error(q(x), linear(x))
        set_module(transformer, name, q)
        del linear
        report = LayerReport(name, treatment, alpha, err, time.perf_counter() - t0)
        reports.append(report)
        if on_layer:
            on_layer(report)
    return reports


def _svdq(linear: nn.Linear, samples, act_max, config, dtype, *, unsigned: bool) -> SVDQLinear:
    return SVDQLinear.from_linear(
        linear,
        samples,
        config=config,
        act_max=act_max,
        unsigned=unsigned,
        act_shift=GELU_SHIFT if unsigned else 0.0,
        dtype=dtype,
    )


def _quantize_split(linear: nn.Linear, st: LayerStats, sizes: list[int], config, dtype) -> SplitInputLinear:
    """Attention slice with signed codes and the bias; GELU slice with unsigned codes."""
    parts, start = [], 0
    for i, (size, part) in enumerate(zip(sizes, split_linear(linear, sizes), strict=True)):
        sl = slice(start, start + size)
        parts.append(_svdq(part, st.samples[:, sl], st.act_max[sl], config, dtype, unsigned=i > 0))
        start += size
    return SplitInputLinear(parts, sizes)
