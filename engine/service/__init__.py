"""What the Cog predictor does, without Cog: choose and fetch the model, load it, run, encode.

predict.py stays a thin declaration of inputs; everything here is testable without a server.
:class:`FluxService` composes the parts, each a module of this package:

- ``config``: :class:`ServiceConfig`, every environment variable, read once;
- ``models``: which model to serve, and its files fetched and verified;
- ``setup_phases``: process-wide settings, the memory mode, setup's timed phases;
- ``request``: one request's inputs checked, its LoRAs applied, its flagged images dropped;
- ``outputs``: images encoded with their seed into one folder per prediction.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import torch

from engine import inputs, kernels, memory
from engine.flux import attention
from engine.flux.converted import converted_checkpoint
from engine.go_fast import (
    CompileSettings,
    GoFast,
    GoFastError,
    configure_compiler,
    select_attention,
    shape_label,
)
from engine.lora import LoraManager, LoraStore, StoreConfig, parse_lora
from engine.pipeline import FluxGenerator, default_device, pil_images
from engine.safety import SafetyChecker
from engine.service.config import ServiceConfig
from engine.service.models import SHAPES, choose_model, model_files
from engine.service.outputs import OutputFolders, save_images
from engine.service.request import check_request, drop_flagged, use_loras
from engine.service.setup_phases import SetupPhases, compile_cache_dir, configure_runtime, memory_mode
from engine.tiny_scenes import vocabulary_note
from engine.weights import WeightsError, recorded_sha256

logger = logging.getLogger(__name__)

# go_fast warm-up at setup, in this order: the default size at batch 1 (Replicate's default
# request), then batch 2, which gives the graph batches 2-4 share. Every other size shares
# these graphs (dynamic sequence length), so setup covers all 88 size x batch combinations.
WARM_UP_SHAPES = ((1024, 1024, 1), (1024, 1024, 2))
# Where the W4A8 route serves (Hopper), a linear takes it from M = kernels.w4a8_min_m rows (1025):
# a 0.25-megapixel image's stream (952-1024 tokens) stays W4A4 at batch 1, and that guard gives
# the double blocks a graph of their own, compiled at setup too (one size covers the class).
W4A8_EXTRA_SHAPE = (512, 512, 1)


def warm_up_shapes(device: torch.device) -> tuple[tuple[int, int, int], ...]:
    """The shapes setup compiles on ``device``: WARM_UP_SHAPES, plus W4A8_EXTRA_SHAPE where the
    W4A8 route serves (kernels.w4a8_served)."""
    return WARM_UP_SHAPES + ((W4A8_EXTRA_SHAPE,) if kernels.w4a8_served(device) else ())


class FluxService:
    """The loaded model (generator, safety checker, go_fast, LoRAs) and the steps of a request, composed."""

    def __init__(
        self,
        generator: FluxGenerator,
        safety: SafetyChecker | None,
        model: str,
        lora: StoreConfig | None = None,
        *,
        compile_settings: CompileSettings | None = None,
        output_base: str | Path | None = None,
    ) -> None:
        """``lora``: the LoRA store's settings (a temporary folder when None); ``compile_settings``:
        go_fast's torch.compile (None: go_fast has no effect, as on a CPU)."""
        self.generator, self.safety, self.model = generator, safety, model
        self._eager = generator.pipe.transformer
        self.go_fast = GoFast(self._eager, compile_settings, vae=generator.pipe.vae) if compile_settings else None
        self.loras = LoraManager(self._eager)
        lora = lora or StoreConfig(root=Path(tempfile.mkdtemp(prefix="svdq-loras-")))
        self.lora_store = LoraStore(lora, lambda state: parse_lora(state, self._eager))
        self.outputs = OutputFolders(output_base)

    @classmethod
    def setup(cls, config: ServiceConfig | None = None, *, gpu: bool | None = None) -> FluxService:
        """Choose, fetch, check and load the model; ``config`` defaults to the environment's."""
        phases = SetupPhases()
        config = config or ServiceConfig.from_env()
        with phases("runtime"):
            configure_runtime(config.weights_dir, config.kernels, compile_cache_dir(config), config.w4a8)
        model = choose_model(config, gpu)
        try:
            with phases("weights"):
                model_dir, checkpoint = model_files(model, config)
        except WeightsError:
            logger.error("setup failed while fetching the weights of %s", model)
            raise
        with phases("convert"):  # the public engine's file: converted once, then from the cache
            baked = model_dir.parent == config.baked_dir
            checkpoint = converted_checkpoint(
                checkpoint,
                lambda: recorded_sha256(checkpoint, trust_recorded=baked),
                [model_dir.parent / "converted", config.weights_dir / "converted"],
            )
        device = default_device()
        with phases("load"):
            mode = memory_mode(config.memory, device)
            generator = FluxGenerator.from_pretrained(model_dir, checkpoint, device=device, memory=mode)
            safety = SafetyChecker.load(model_dir, device)
            if safety is not None and not memory.safety_resident(mode):
                safety.checker = memory.OnDemand(safety.checker, device)  # on the GPU for its check only
                if safety.classifier is not None:  # off the GPU: it runs only on flagged images
                    safety.classifier = safety.classifier.to("cpu", torch.float32)
        settings = CompileSettings(attention=config.attention) if device.type == "cuda" else None
        lora = config.lora or StoreConfig(root=config.weights_dir / "loras")
        service = cls(generator, safety, model, lora, compile_settings=settings)
        select_attention(service._eager, settings)  # before go_fast's graphs are compiled
        if device.type == "cuda":  # build the kernels and warm the caches before the first request
            with phases("kernels"), service._eager_only():  # eager once: Triton JIT, CUDA extension, cuDNN
                generator.generate("warm-up", width=1024, height=1024, steps=1, seed=0)
            with phases("compile"):
                service.warm_up(warm_up_shapes(device))
        logger.info(
            "setup: model %s on %s, %d T5 tokens; %s", model, device, generator.text_tokens, phases.summary()
        )
        return service

    def warm_up(
        self,
        shapes: tuple[tuple[int, int, int], ...] = WARM_UP_SHAPES,
        vae_sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        """Compile go_fast's graphs now (setup), one denoising step per shape, then one VAE decode
        per size (``vae_sizes``, default: every served size), so requests do not."""
        if self.go_fast is None:
            return
        configure_compiler(self.go_fast.settings)
        t0 = time.perf_counter()
        self.generator.pipe.transformer = self.go_fast.compiled
        try:
            for width, height, batch in shapes:
                with self.go_fast.track(shape_label(width, height, batch), at_setup=True):
                    self.generator.generate("warm-up", width=width, height=height, steps=1, num_outputs=batch)
        finally:
            self.generator.pipe.transformer = self._eager
        self.go_fast.warm_up_vae(inputs.served_sizes() if vae_sizes is None else vae_sizes)
        logger.info(
            "setup: go_fast compiled %d graph(s) in %.1f s (%s backend, dynamic=%s)",
            self.go_fast.graphs,
            time.perf_counter() - t0,
            self.go_fast.settings.backend,
            self.go_fast.settings.dynamic,
        )

    def _transformer(self, go_fast: bool):
        """The compiled transformer when go_fast is on and configured (a GPU), else the eager one."""
        if go_fast and self.go_fast is not None:
            return self.go_fast.compiled
        return self._eager

    def _run_fast(self, run, shape: str) -> torch.Tensor:
        """``run()`` on the compiled transformer; past the recompile limit, eagerly, with a warning."""
        try:
            with self.go_fast.track(shape):
                return run()
        except GoFastError as e:
            logger.warning("%s; this request runs without go_fast", e)
            self.generator.pipe.transformer = self._eager
            with self._eager_only():
                return run()

    def _eager_only(self):
        """go_fast off: the compiled blocks run their eager forwards (regional compile is in place)."""
        return self.go_fast.disabled() if self.go_fast is not None else contextlib.nullcontext()

    def _use_loras(self, requested: list[tuple[str, str | None, float]]) -> None:
        """Make ``[(field, source, scale)]`` the active LoRAs, all-or-nothing (:func:`use_loras`)."""
        use_loras(self.lora_store, self.loras, requested)

    def predict(
        self,
        *,
        prompt: str,
        aspect_ratio: str = "1:1",
        num_outputs: int = 1,
        num_inference_steps: int = 4,
        seed: int | None = None,
        output_format: str = "webp",
        output_quality: int = 80,
        disable_safety_checker: bool = False,
        go_fast: bool = True,
        megapixels: str = "1",
        lora_weights: str | None = None,
        lora_scale: float = 1.0,
        extra_lora: str | None = None,
        extra_lora_scale: float = 1.0,
        out_dir: Path | None = None,
    ) -> list[Path]:
        # Every input is checked before any work is done (engine.inputs owns the bounds).
        request = check_request(
            prompt=prompt,
            aspect_ratio=aspect_ratio,
            megapixels=megapixels,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            seed=seed,
            lora_scale=lora_scale,
            extra_lora_scale=extra_lora_scale,
            output_format=output_format,
            output_quality=output_quality,
            go_fast=go_fast,
            lora_weights=lora_weights,
            extra_lora=extra_lora,
        )
        prompt, width, height, num_outputs, num_inference_steps, seed, output_format, output_quality = request
        if go_fast and self.go_fast is None:
            logger.info("go_fast: no GPU, so nothing to speed up; running the same path")
        if self.model == SHAPES and (note := vocabulary_note(prompt)):
            logger.info("%s", note)  # the image still comes: the model draws what it makes of the rest
        self._use_loras(
            [("lora_weights", lora_weights, lora_scale), ("extra_lora", extra_lora, extra_lora_scale)]
        )
        self.generator.pipe.transformer = self._transformer(go_fast)
        t0 = time.perf_counter()

        def run() -> torch.Tensor:  # [B, H, W, 3] uint8 on the device
            return self.generator.generate_pixels(
                prompt,
                width=width,
                height=height,
                steps=num_inference_steps,
                seed=seed,
                num_outputs=num_outputs,
                on_step=lambda i, n: logger.info("step %d/%d (%.2f s)", i, n, time.perf_counter() - t0),
            )

        try:
            if go_fast and self.go_fast is not None:
                pixels = self._run_fast(run, shape_label(width, height, num_outputs, self._eager))
            else:
                with attention.using("sdpa"), self._eager_only():  # go_fast off: SDPA, eager blocks
                    pixels = run()
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise RuntimeError(
                f"out of GPU memory for {num_outputs} image(s) at {width}x{height}; "
                "try fewer outputs or megapixels=0.25"
            ) from e
        t1 = time.perf_counter()
        logger.info("denoise + decode: %.2f s", t1 - t0)
        seeds = [seed + i for i in range(len(pixels))]
        if self.safety is not None and not disable_safety_checker:  # its input prepared on the device
            pixels, seeds = drop_flagged(self.safety, pixels, seeds)
        images = pil_images(pixels)  # the kept images' bytes to the host
        out_dir = out_dir or self.outputs.next()
        paths = save_images(
            images, out_dir, output_format=output_format, quality=output_quality, seeds=seeds, prompt=prompt
        )
        logger.info(
            "safety + encode: %.2f s; total %.2f s", time.perf_counter() - t1, time.perf_counter() - t0
        )
        return paths
