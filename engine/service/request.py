"""One request's steps around the denoising: its inputs checked (seed and size resolved), its
LoRAs made active, its flagged images dropped. :meth:`FluxService.predict` runs them in order."""

from __future__ import annotations

import logging
import secrets
import time
from typing import NamedTuple

import torch
from PIL import Image

from engine import inputs
from engine.lora import LoraError, LoraManager, LoraStore
from engine.safety import ALL_FLAGGED, SafetyChecker

logger = logging.getLogger(__name__)

LORA_FIELDS = ("lora_weights", "extra_lora")


class NSFWError(RuntimeError):
    """Every image of a prediction was flagged by the safety checker."""


class Request(NamedTuple):
    """A prediction's inputs, checked, with its seed and its size in pixels resolved."""

    prompt: str
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    seed: int
    output_format: str
    output_quality: int


def check_request(
    *,
    prompt: str,
    aspect_ratio: str,
    megapixels: str,
    num_outputs: int,
    num_inference_steps: int,
    seed: int | None,
    lora_scale: float,
    extra_lora_scale: float,
    output_format: str,
    output_quality: int,
    go_fast: bool,
    lora_weights: str | None = None,
    extra_lora: str | None = None,
) -> Request:
    """Every input checked before any work is done (engine.inputs owns the bounds); seed and size logged."""
    prompt = inputs.check_prompt(prompt)
    for field, source in zip(LORA_FIELDS, (lora_weights, extra_lora), strict=True):
        inputs.check_lora_source(field, source)
    num_outputs = inputs.int_in_range("num_outputs", num_outputs, inputs.NUM_OUTPUTS)
    num_inference_steps = inputs.int_in_range(
        "num_inference_steps", num_inference_steps, inputs.NUM_INFERENCE_STEPS
    )
    inputs.one_of("output_format", output_format, inputs.OUTPUT_FORMATS)
    output_quality = inputs.int_in_range("output_quality", output_quality, inputs.OUTPUT_QUALITY)
    inputs.in_range("lora_scale", lora_scale, inputs.LORA_SCALE)
    inputs.in_range("extra_lora_scale", extra_lora_scale, inputs.LORA_SCALE)
    if seed is None:
        seed = secrets.randbelow(inputs.SEED_MODULUS)
        logger.info("seed: %d (random; pass seed=%d to reproduce)", seed, seed)
    else:
        given, seed = seed, inputs.seed_from(seed)
        if seed == given:
            logger.info("seed: %d", seed)
        else:
            logger.info("seed: %d (from %r, taken mod 2^32)", seed, given)
    width, height = inputs.size_for(aspect_ratio, megapixels)
    logger.info(
        "size: %dx%d (%s, %s MP), %d image(s), %d step(s), go_fast=%s",
        width,
        height,
        aspect_ratio,
        megapixels,
        num_outputs,
        num_inference_steps,
        go_fast,
    )
    return Request(
        prompt, width, height, num_outputs, num_inference_steps, seed, output_format, output_quality
    )


def use_loras(store: LoraStore, manager: LoraManager, requested: list[tuple[str, str | None, float]]) -> None:
    """Make ``[(field, source, scale)]`` the active LoRAs (no source: none), all-or-nothing.

    ``store`` fetches and parses each source; ``manager`` applies them to the model. Every failure,
    whatever its cause, is a ValueError naming the field, and the model stays as it was.
    """
    wanted = []
    for field, source, scale in requested:
        if source is None or not source.strip():
            continue
        try:
            shown, parsed = store.load(source)
        except LoraError as e:
            raise ValueError(f"{field}: {e}") from None
        except Exception as e:  # anything unforeseen in a hostile file still names the field
            raise ValueError(f"{field}: could not be loaded ({type(e).__name__}: {e})") from None
        wanted.append((field, parsed, float(scale), shown))
    if not wanted and manager.active:
        logger.info("LoRA: none (base model restored)")
    t0 = time.perf_counter()
    try:
        manager.set([(field, parsed, scale) for field, parsed, scale, _ in wanted])
    except Exception as e:
        fields = " and ".join(w[0] for w in wanted)
        raise ValueError(f"{fields}: could not be applied ({e}); the model is unchanged") from None
    for field, _, scale, shown in wanted:
        logger.info(
            "LoRA active: %s = %s at scale %g (%.3f s)", field, shown, scale, time.perf_counter() - t0
        )


def drop_flagged(
    safety: SafetyChecker, images: torch.Tensor | list[Image.Image], seeds: list[int]
) -> tuple[torch.Tensor | list[Image.Image], list[int]]:
    """The images (``[B, H, W, 3]`` uint8 on the device, or PIL images) and their seeds that the
    safety checker does not flag; NSFWError when it flags all."""
    flags = safety.flags(images)  # the checker, confirmed by the classifier (engine.safety)
    for i, flagged in enumerate(flags):
        if flagged:
            logger.warning("NSFW content detected in image %d (seed %d); it is not returned", i, seeds[i])
    kept = [i for i, flagged in enumerate(flags) if not flagged]
    if not kept:
        raise NSFWError(ALL_FLAGGED)  # Replicate's flux models' words
    if isinstance(images, torch.Tensor):
        return images[kept], [seeds[i] for i in kept]
    return [images[i] for i in kept], [seeds[i] for i in kept]
