"""diffusers' FluxPipeline around our quantized transformer: sizes, seeds, batching, progress."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from engine.flux import load_transformer
from engine.inputs import round_size
from engine.memory import Mode
from engine.text_encoder import quantize_t5
from engine.vae_upsample import use_subpixel_upsampling

logger = logging.getLogger(__name__)

GENERATOR_MAX_SEED = 2**64 - 1  # what torch.Generator accepts
# T5 tokens the prompt is encoded to. BFL's reference sampling uses 256 for FLUX.1-schnell (the
# timestep-distilled model, no guidance embedding) and 512 for FLUX.1-dev; diffusers' FluxPipeline
# defaults to 512 for both. 256 halves the T5 encoder's work and shortens the joint attention
# sequence of every block (4096 + 256 instead of 4096 + 512 tokens at 1 megapixel).
SCHNELL_TEXT_TOKENS, DEV_TEXT_TOKENS = 256, 512


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FluxGenerator:
    """Text-to-image with FLUX.1 and, when given a checkpoint, the SVDQuant transformer."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device
        self.text_tokens = text_tokens_for(pipe.transformer)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        checkpoint: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        memory: Mode = Mode.FAST,
        vae_subpixel: bool = True,
    ) -> FluxGenerator:
        """Load the text encoders, VAE and scheduler from ``model_dir`` (diffusers layout).

        With ``checkpoint`` the transformer is our quantized one, built on ``device`` without a
        float copy; without it, the folder's float transformer (for comparison). ``dtype``
        defaults to bfloat16 on a GPU and float32 on a CPU, where bfloat16 math is slow.
        ``memory``: the memory mode (engine.memory; see :func:`configure_memory`).
        ``vae_subpixel``: the VAE decoder's nearest x2 + 3x3 upsamplers as 2x2 sub-pixel
        convolutions at the low resolution (engine.vae_upsample: the same function, 4/9 of
        their FLOPs); False keeps diffusers' own.
        """
        from diffusers import FluxPipeline, FluxTransformer2DModel

        from engine.flux.model import SVDQFluxTransformer2DModel

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
        pipeline_cls = (
            svdq_pipeline_class() if isinstance(transformer, SVDQFluxTransformer2DModel) else FluxPipeline
        )
        pipe = pipeline_cls.from_pretrained(model_dir, transformer=transformer, dtype=dtype)
        if vae_subpixel:  # merged weights from the loaded ones, in dtype, before the move
            n = use_subpixel_upsampling(pipe.vae.decoder)
            logger.info("VAE decoder: %d upsampler(s) as sub-pixel convolutions", n)
        configure_memory(pipe, memory, device)
        pipe.to(device)
        if device.type == "cuda":
            # NHWC convolutions on tensor cores (flux-fast's decoder setting); same arithmetic per pixel
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        logger.info(
            "pipeline loaded from %s on %s (%s) in %.2f s", model_dir, device, dtype, time.perf_counter() - t0
        )
        return cls(pipe, device)

    @torch.inference_mode()
    def generate(self, prompt: str, **kwargs) -> list[Image.Image]:
        """:meth:`generate_pixels`' images as PIL images (same arguments)."""
        return pil_images(self.generate_pixels(prompt, **kwargs))

    @torch.inference_mode()
    def generate_pixels(
        self,
        prompt: str,
        *,
        width: int = 1024,
        height: int = 1024,
        steps: int = 4,
        seed: int = 0,
        num_outputs: int = 1,
        on_step: Callable[[int, int], None] | None = None,
        max_sequence_length: int | None = None,
    ) -> torch.Tensor:
        """``[num_outputs, height, width, 3]`` uint8 RGB images, still on the device (the safety
        checker's input is prepared there; :func:`pil_images` copies them to the host).

        Images ``i = 0..num_outputs-1`` use seed ``seed + i``, all denoised in one batch.
        The noise is drawn on the CPU from a per-image generator, so a seed gives the same
        image whatever the batch size and device. ``on_step(step, steps)`` is called after each
        denoising step (raise from it to cancel). ``max_sequence_length`` (T5 tokens) defaults
        to the model's own: 256 for schnell, 512 for dev (``text_tokens_for``).
        """
        max_sequence_length = max_sequence_length or self.text_tokens
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

        images = self.pipe(
            prompt=prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=0.0,
            num_images_per_prompt=num_outputs,
            generator=generators,
            max_sequence_length=max_sequence_length,
            callback_on_step_end=step_end,
            output_type="pt",  # [B, 3, H, W] in [0, 1], still on the device: to_uint8 converts it there
        ).images
        return to_uint8(images)

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


def configure_memory(pipe, memory: Mode, device: torch.device) -> None:
    """Apply memory mode ``memory`` (engine.memory) to a pipeline not yet on ``device``.

    Both modes: the VAE decodes one image at a time (diffusers' sliced decode), so the decode's
    peak, the prediction's highest, does not grow with num_outputs; a batch-1 decode at 1
    megapixel already fills the GPU, so this costs no time. ``small``: T5's linears in 4-bit
    weights (engine.text_encoder), quantized one layer at a time on ``device``.
    """
    pipe.vae.enable_slicing()
    if Mode(memory) is Mode.SMALL:
        quantize_t5(pipe.text_encoder_2, device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [0, 1] (diffusers' ``output_type="pt"``) as ``[B, H, W, 3]`` uint8,
    on their device. Bit for bit diffusers' ``pt_to_numpy`` then ``numpy_to_pil``: the same float32
    ``x * 255`` rounded half to even."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """``[B, H, W, 3]`` uint8 images (any device) as PIL images: one 1-byte copy per value to the host
    instead of diffusers' float32 copy and numpy passes."""
    return [Image.fromarray(a) for a in pixels.cpu().numpy()]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` images in [0, 1] as PIL images (:func:`to_uint8` on their device, then
    :func:`pil_images`)."""
    return pil_images(to_uint8(images))


def text_tokens_for(transformer: torch.nn.Module) -> int:
    """T5 tokens for this transformer: schnell (no guidance embedding) 256, dev 512, as BFL's reference."""
    guidance = getattr(getattr(transformer, "config", None), "guidance_embeds", False)
    return DEV_TEXT_TOKENS if guidance else SCHNELL_TEXT_TOKENS


@functools.cache
def svdq_pipeline_class() -> type:
    """``FluxPipeline`` whose LoRA methods route to the 4-bit transformer's LoRA slots.

    diffusers' own ``load_lora_weights`` looks for each layer's ``.weight`` (a KeyError on our
    layers) and would inject PEFT wrappers; here each call goes to the transformer's adapter
    API (engine/flux/model.py). Everything else is the stock pipeline. Made on first use so
    that importing this module does not import diffusers' pipelines.
    """
    from diffusers import FluxPipeline

    from engine.flux.model import FUSE_MESSAGE

    class SVDQFluxPipeline(FluxPipeline):
        def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
            self.transformer.load_lora_adapter(
                pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap, **kwargs
            )

        def set_adapters(self, adapter_names, adapter_weights=None):
            self.transformer.set_adapters(adapter_names, adapter_weights)

        def get_active_adapters(self) -> list[str]:
            return self.transformer.active_adapters()

        def get_list_adapters(self) -> dict[str, list[str]]:
            return {"transformer": self.transformer.loaded_adapters()}

        def delete_adapters(self, adapter_names):
            self.transformer.delete_adapters(adapter_names)

        def unload_lora_weights(self, reset_to_overwritten_params=False):
            self.transformer.unload_lora()

        def disable_lora(self):
            self.transformer.disable_lora()

        def enable_lora(self):
            self.transformer.enable_lora()

        def fuse_lora(self, *args, **kwargs):
            raise NotImplementedError(FUSE_MESSAGE)

        def unfuse_lora(self, *args, **kwargs):
            raise NotImplementedError(FUSE_MESSAGE)

    return SVDQFluxPipeline
