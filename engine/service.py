"""What the Cog predictor does, without Cog: choose and fetch the model, load it, run, encode.

predict.py stays a thin declaration of inputs; everything here is testable without a server.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from engine.go_fast import CompileSettings, GoFast, GoFastError, configure_compiler, shape_label
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
# libwebp's speed/size trade-off (0 fastest .. 6 smallest; Pillow's default is 4). Method 2 does
# 2.5x less work than 4 for a 4% larger file at quality 80 (docs/benchmarks.md, "Encoding").
WEBP_METHOD = 2
# go_fast warm-up at setup, in this order: the default size at batch 1 (Replicate's default
# request), then batch 2, which gives the graph batches 2-4 share. Every other size shares
# these graphs (dynamic sequence length), so setup covers all 88 size x batch combinations.
WARM_UP_SHAPES = ((1024, 1024, 1), (1024, 1024, 2))
OUTPUT_PREFIX = "svdq-out-"


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
    # go_fast's compiled graphs (inductor's FX graph and Triton caches) likewise: a restarted
    # container with the same cache folder loads them instead of compiling again at setup.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))


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
    """``out-0.<ext>``, ``out-1.<ext>``...; each image's seed goes into PNG text or EXIF ImageDescription.

    Images are encoded in parallel threads (Pillow's encoders release the GIL), WebP with
    ``WEBP_METHOD``.
    """
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}; got {output_format!r}")

    def encode(i: int) -> Path:
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
            if output_format == "webp":
                kwargs["method"] = WEBP_METHOD
        images[i].convert("RGB").save(path, format=FORMATS[output_format], **kwargs)
        return path

    if len(images) == 1:
        return [encode(0)]
    with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1)) as pool:
        return list(pool.map(encode, range(len(images))))


class OutputFolders:
    """One folder per prediction under a per-process root in the temp dir, removed when done.

    Cog reads the returned files after predict() returns (coglet's parent process reads each
    path when the worker reports it, before the prediction completes, and only then gives the
    slot the next prediction), so a prediction's folder is removed when the next one starts,
    and the root at interpreter exit. Roots left by processes that no longer run (a crash, a
    kill) are removed when the next one starts.
    """

    def __init__(self, base: str | Path | None = None) -> None:
        base = Path(base or tempfile.gettempdir())
        self._remove_stale(base)
        self.root = Path(tempfile.mkdtemp(prefix=f"{OUTPUT_PREFIX}{os.getpid()}-", dir=base))
        self._current: Path | None = None
        atexit.register(self.remove_all)

    def next(self) -> Path:
        """A fresh, empty folder for this prediction; the previous prediction's is removed."""
        if self._current is not None:
            shutil.rmtree(self._current, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self._current = Path(tempfile.mkdtemp(prefix="pred-", dir=self.root))
        return self._current

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._current = None

    def remove_on_sigterm(self) -> None:
        """Also remove the root when the process is terminated by SIGTERM (how servers are stopped).

        atexit does not run on SIGTERM's default action; the handler removes the folders and
        then lets the previous handler (or the default: terminate) act as it would have.
        Only from the main thread, where Python allows installing handlers; called from setup().
        """
        if threading.current_thread() is not threading.main_thread():
            logger.info("output folders: not on the main thread, so no SIGTERM cleanup (atexit only)")
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: object) -> None:
            self.remove_all()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)

    @staticmethod
    def _remove_stale(base: Path) -> None:
        pattern = re.compile(rf"{re.escape(OUTPUT_PREFIX)}(\d+)-")
        for d in base.glob(f"{OUTPUT_PREFIX}*"):
            m = pattern.match(d.name)
            if not (m and d.is_dir() and d.stat().st_uid == os.getuid()):
                continue
            pid = int(m.group(1))
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.info("removing output folder %s left by process %d", d, pid)
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


class FluxService:
    def __init__(
        self,
        generator: FluxGenerator,
        safety: SafetyChecker | None,
        model: str,
        *,
        compile_settings: CompileSettings | None = None,
        output_base: str | Path | None = None,
    ) -> None:
        """``compile_settings``: go_fast's torch.compile (None: go_fast has no effect, as on a CPU)."""
        self.generator, self.safety, self.model = generator, safety, model
        self._eager = generator.pipe.transformer
        self.go_fast = GoFast(self._eager, compile_settings) if compile_settings else None
        self.loras = LoraManager(self._eager)
        self.lora_store = LoraStore(
            cache_dir() / "loras", int(os.environ.get(LORA_CACHE_ENV, LORA_CACHE_BYTES))
        )
        self._parsed: dict[str, ParsedLora] = {}  # source -> parsed LoRA, most recent last
        self.outputs = OutputFolders(output_base)

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
        settings = CompileSettings() if device.type == "cuda" else None
        service = cls(generator, safety, model, compile_settings=settings)
        service.outputs.remove_on_sigterm()
        if device.type == "cuda":  # build the kernels and warm the caches before the first request
            t_warm = time.perf_counter()
            generator.generate("warm-up", width=1024, height=1024, steps=1, seed=0)
            logger.info("setup: warm-up at 1024x1024 in %.1f s", time.perf_counter() - t_warm)
            service.warm_up()
        logger.info(
            "setup: model %s, weights %.1f s, load %.1f s, on %s, %d T5 tokens",
            model,
            t1 - t0,
            time.perf_counter() - t1,
            device,
            generator.text_tokens,
        )
        return service

    def warm_up(self, shapes: tuple[tuple[int, int, int], ...] = WARM_UP_SHAPES) -> None:
        """Compile go_fast's graphs now (setup), one denoising step per shape, so requests do not."""
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

    def _run_fast(self, run, shape: str) -> list[Image.Image]:
        """``run()`` on the compiled transformer; past the recompile limit, eagerly, with a warning."""
        try:
            with self.go_fast.track(shape):
                return run()
        except GoFastError as e:
            logger.warning("%s; this request runs without go_fast", e)
            self.generator.pipe.transformer = self._eager
            return run()

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
        if go_fast and self.go_fast is None:
            logger.info("go_fast: no GPU, so nothing to speed up; running the same path")
        try:
            self._use_lora(lora_weights, lora_scale)
        except LoraError as e:
            raise ValueError(str(e)) from e
        self.generator.pipe.transformer = self._transformer(go_fast)
        t0 = time.perf_counter()

        def run() -> list[Image.Image]:
            return self.generator.generate(
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
                images = self._run_fast(run, shape_label(width, height, num_outputs, self._eager))
            else:
                images = run()
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
        out_dir = out_dir or self.outputs.next()
        paths = save_images(
            images, out_dir, output_format=output_format, quality=output_quality, seeds=seeds, prompt=prompt
        )
        logger.info(
            "safety + encode: %.2f s; total %.2f s", time.perf_counter() - t1, time.perf_counter() - t0
        )
        return paths
