"""diffusers' FluxPipeline around our quantized transformer: sizes, seeds, batching, progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from engine.flux import load_transformer
from engine.inputs import round_size

logger = logging.getLogger(__name__)

GENERATOR_MAX_SEED = 2**64 - 1  # what torch.Generator accepts


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FluxGenerator:
    """Text-to-image with FLUX.1 and, when given a checkpoint, the SVDQuant transformer."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        checkpoint: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FluxGenerator:
        """Load the text encoders, VAE and scheduler from ``model_dir`` (diffusers layout).

        With ``checkpoint`` the transformer is our quantized one, built on ``device`` without a
        float copy; without it, the folder's float transformer (for comparison). ``dtype``
        defaults to bfloat16 on a GPU and float32 on a CPU, where bfloat16 math is slow.
        """
        from diffusers import FluxPipeline, FluxTransformer2DModel

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        t0 = time.perf_counter()
        if checkpoint is not None:
            transformer = load_transformer(checkpoint, device)
            # Quantized buffers keep their stored types; only the 16-bit remainder follows dtype.
            for p in transformer.parameters():
                p.data = p.data.to(dtype)
        else:
            transformer = FluxTransformer2DModel.from_pretrained(
                model_dir, subfolder="transformer", dtype=dtype
            )
        pipe = FluxPipeline.from_pretrained(model_dir, transformer=transformer, dtype=dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        logger.info(
            "pipeline loaded from %s on %s (%s) in %.2f s", model_dir, device, dtype, time.perf_counter() - t0
        )
        return cls(pipe, device)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        *,
        width: int = 1024,
        height: int = 1024,
        steps: int = 4,
        seed: int = 0,
        num_outputs: int = 1,
        on_step: Callable[[int, int], None] | None = None,
        max_sequence_length: int = 512,
    ) -> list[Image.Image]:
        """Images ``i = 0..num_outputs-1`` use seed ``seed + i``, all denoised in one batch.

        The noise is drawn on the CPU from a per-image generator, so a seed gives the same
        image whatever the batch size and device. ``on_step(step, steps)`` is called after each
        denoising step (raise from it to cancel).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
        if not isinstance(seed, int) or not 0 <= seed <= GENERATOR_MAX_SEED - num_outputs:
            raise ValueError(
                f"seed must be an integer in [0, {GENERATOR_MAX_SEED - num_outputs}], got {seed!r}"
            )
        width, height = round_size(width, height)
        self._log_truncation(prompt, max_sequence_length)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_outputs)]

        def step_end(pipe, i, t, kwargs):
            if on_step:
                on_step(i + 1, steps)
            return {}

        return self.pipe(
            prompt=prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=0.0,
            num_images_per_prompt=num_outputs,
            generator=generators,
            max_sequence_length=max_sequence_length,
            callback_on_step_end=step_end,
        ).images

    def _log_truncation(self, prompt: str, max_sequence_length: int) -> None:
        """Say how much of a long prompt each text encoder reads (the pipeline drops the rest)."""
        clip_len = self.pipe.tokenizer.model_max_length
        n_clip = len(self.pipe.tokenizer(prompt, truncation=False)["input_ids"])
        n_t5 = len(self.pipe.tokenizer_2(prompt, truncation=False)["input_ids"])
        if n_t5 > max_sequence_length:
            logger.warning(
                "prompt is %d T5 tokens: T5 reads the first %d, the rest is truncated",
                n_t5,
                max_sequence_length,
            )
        if n_clip > clip_len:
            logger.info(
                "prompt is %d CLIP tokens: CLIP (pooled embedding) reads the first %d", n_clip, clip_len
            )
