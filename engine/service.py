"""What the Cog predictor does, without Cog: choose and fetch the model, load it, run, encode.

predict.py stays a thin declaration of inputs; everything here is testable without a server.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from engine.inputs import MAX_SEED, size_for
from engine.lora import LoraError, LoraManager, LoraStore, ParsedLora, parse_lora, read_lora
from engine.pipeline import FluxGenerator, default_device
from engine.safety import SafetyChecker
from engine.weights import MANIFEST, WeightsError, cache_dir, ensure_files, load_manifest

logger = logging.getLogger(__name__)

MODEL_ENV = "SVDQ_MODEL"  # auto | tiny | a model name of weights/manifest.json
TINY = "tiny"
REAL = "flux-schnell"
LORA_CACHE_ENV = "SVDQ_LORA_CACHE_BYTES"
LORA_CACHE_BYTES = 10 * 2**30
PARSED_LORAS_KEPT = 4
FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


class NSFWError(RuntimeError):
    """Every image of a prediction was flagged by the safety checker."""


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def configure_runtime() -> None:
    """Process-wide settings for serving, in one place, called once from setup()."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars are noise in a server's logs; per-step progress is logged instead.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # The CUDA extension is compiled on first use (Cog's build steps run before the source is in
    # the image); keep its build next to the weights so a warm container reuses it.
    os.environ.setdefault("SVDQ_EXT_DIR", str(cache_dir() / "torch_extensions"))


def choose_model() -> str:
    """``SVDQ_MODEL``, or in auto mode the real model when a GPU and its weights (cached or reachable) exist."""
    wanted = os.environ.get(MODEL_ENV, "auto").strip() or "auto"
    if wanted != "auto":
        return wanted
    if not torch.cuda.is_available():
        logger.info("no GPU: serving the embedded tiny model (set %s to choose)", MODEL_ENV)
        return TINY
    root = cache_dir() / REAL
    if all((root / e.path).exists() for e in load_manifest(REAL)) or _online():
        return REAL
    logger.warning("no network and %s not cached: serving the embedded tiny model", REAL)
    return TINY


def tiny_model_dir() -> Path:
    """The embedded tiny model, made on first use (seconds) and renamed into place when complete."""
    from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model

    root = cache_dir() / TINY
    if (root / CHECKPOINT_NAME).exists():
        return root
    logger.info("making the tiny model in %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        make_tiny_model(tmp)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def model_files(name: str) -> tuple[Path, Path]:
    """``(model folder, transformer checkpoint)`` for a model, fetched and verified."""
    if name == TINY:
        from engine.tiny_model import CHECKPOINT_NAME

        root = tiny_model_dir()
        return root, root / CHECKPOINT_NAME
    entries = load_manifest(name)
    root = ensure_files(entries, cache_dir() / name, offline=not _online())
    transformer = json.loads(MANIFEST.read_text())["models"][name]["transformer"]
    return root, root / transformer


def save_images(
    images: list[Image.Image],
    out_dir: Path,
    *,
    output_format: str,
    quality: int,
    seeds: list[int],
    prompt: str,
) -> list[Path]:
    """``out-0.<ext>``, ``out-1.<ext>``...; each image's seed goes into PNG text or EXIF ImageDescription."""
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}; got {output_format!r}")
    paths = []
    for i, img in enumerate(images):
        path = out_dir / f"out-{i}.{output_format}"
        kwargs: dict = {}
        if output_format == "png":
            info = PngImagePlugin.PngInfo()
            info.add_text("seed", str(seeds[i]))
            info.add_text("prompt", prompt)
            kwargs["pnginfo"] = info
        else:
            exif = Image.Exif()
            exif[0x010E] = f"seed={seeds[i]}"  # ImageDescription
            kwargs.update(quality=quality, exif=exif.tobytes())
        img.convert("RGB").save(path, format=FORMATS[output_format], **kwargs)
        paths.append(path)
    return paths


class FluxService:
    def __init__(self, generator: FluxGenerator, safety: SafetyChecker | None, model: str) -> None:
        self.generator, self.safety, self.model = generator, safety, model
        self._eager = generator.pipe.transformer
        self._compiled = None
        self.loras = LoraManager(self._eager)
        self.lora_store = LoraStore(
            cache_dir() / "loras", int(os.environ.get(LORA_CACHE_ENV, LORA_CACHE_BYTES))
        )
        self._parsed: dict[str, ParsedLora] = {}  # source -> parsed LoRA, most recent last

    @classmethod
    def setup(cls) -> FluxService:
        t0 = time.perf_counter()
        configure_runtime()
        model = choose_model()
        try:
            model_dir, checkpoint = model_files(model)
        except WeightsError:
            logger.error("setup failed while fetching the weights of %s", model)
            raise
        t1 = time.perf_counter()
        device = default_device()
        generator = FluxGenerator.from_pretrained(model_dir, checkpoint, device=device)
        safety = SafetyChecker.load(model_dir, device)
        if device.type == "cuda":  # build the kernels and warm the caches before the first request
            t_warm = time.perf_counter()
            generator.generate("warm-up", width=1024, height=1024, steps=1, seed=0)
            logger.info("setup: warm-up at 1024x1024 in %.1f s", time.perf_counter() - t_warm)
        logger.info(
            "setup: model %s, weights %.1f s, load %.1f s, on %s",
            model,
            t1 - t0,
            time.perf_counter() - t1,
            device,
        )
        return cls(generator, safety, model)

    def _transformer(self, go_fast: bool):
        """The compiled transformer for go_fast on a GPU (compiled once, on first use), else eager."""
        if not go_fast or self.generator.device.type != "cuda":
            return self._eager
        if self._compiled is None:
            logger.info("go_fast: compiling the transformer (first use; later predictions reuse it)")
            self._compiled = torch.compile(self._eager, mode="max-autotune-no-cudagraphs", dynamic=False)
        return self._compiled

    def _use_lora(self, source: str | None, scale: float) -> None:
        """Make ``source`` (or no LoRA) the active one; a bad file leaves the model as it was."""
        if not source:
            if self.loras.active:
                logger.info("LoRA: none (base model restored)")
            self.loras.set([])
            return
        if not -1.0 <= scale <= 3.0:
            raise ValueError(f"lora_scale must be in [-1, 3], got {scale}")
        key = source  # a local file is known by its path and modification time
        if (local := Path(source).expanduser()).is_file():
            key = f"{local.resolve()}@{local.stat().st_mtime_ns}"
        parsed = self._parsed.pop(key, None)
        if parsed is None:
            t0 = time.perf_counter()
            parsed = parse_lora(read_lora(self.lora_store.fetch(source)), self._eager)
            logger.info("LoRA loaded from %s in %.2f s", source, time.perf_counter() - t0)
        else:
            logger.info("LoRA cache hit: %s already parsed", source)
        self._parsed[key] = parsed
        while len(self._parsed) > PARSED_LORAS_KEPT:
            self._parsed.pop(next(iter(self._parsed)))
        t0 = time.perf_counter()
        self.loras.set([(source, parsed, scale)])
        logger.info("LoRA active: %s at scale %g (%.3f s)", source, scale, time.perf_counter() - t0)

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
        out_dir: Path | None = None,
    ) -> list[Path]:
        if output_format not in FORMATS:  # checked before any work is done
            raise ValueError(f"output_format must be one of {', '.join(FORMATS)}; got {output_format!r}")
        if not 0 <= output_quality <= 100:
            raise ValueError(f"output_quality must be in [0, 100], got {output_quality}")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
            logger.info("seed: %d (random; pass seed=%d to reproduce)", seed, seed)
        else:
            logger.info("seed: %d", seed)
        width, height = size_for(aspect_ratio, megapixels)
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
        if go_fast and self.generator.device.type != "cuda":
            logger.info("go_fast: no GPU, so nothing to speed up; running the same path")
        try:
            self._use_lora(lora_weights, lora_scale)
        except LoraError as e:
            raise ValueError(str(e)) from e
        self.generator.pipe.transformer = self._transformer(go_fast)
        t0 = time.perf_counter()
        try:
            images = self.generator.generate(
                prompt,
                width=width,
                height=height,
                steps=num_inference_steps,
                seed=seed,
                num_outputs=num_outputs,
                on_step=lambda i, n: logger.info("step %d/%d (%.2f s)", i, n, time.perf_counter() - t0),
            )
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise RuntimeError(
                f"out of GPU memory for {num_outputs} image(s) at {width}x{height}; "
                "try fewer outputs or megapixels=0.25"
            ) from e
        t1 = time.perf_counter()
        logger.info("denoise + decode: %.2f s", t1 - t0)
        seeds = [seed + i for i in range(len(images))]
        if self.safety is not None and not disable_safety_checker:
            flags = self.safety.flags(images)
            for i, flagged in enumerate(flags):
                if flagged:
                    logger.warning(
                        "image %d (seed %d) was flagged by the safety checker and is not returned",
                        i,
                        seeds[i],
                    )
            kept = [i for i, flagged in enumerate(flags) if not flagged]
            if not kept:
                raise NSFWError("all images were flagged as possibly NSFW; try a different prompt or seed")
            images, seeds = [images[i] for i in kept], [seeds[i] for i in kept]
        out_dir = out_dir or Path(tempfile.mkdtemp(prefix="svdq-out-"))
        paths = save_images(
            images, out_dir, output_format=output_format, quality=output_quality, seeds=seeds, prompt=prompt
        )
        logger.info(
            "safety + encode: %.2f s; total %.2f s", time.perf_counter() - t1, time.perf_counter() - t0
        )
        return paths
