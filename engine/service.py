"""What the Cog predictor does, without Cog: choose and fetch the model, load it, run, encode.

predict.py stays a thin declaration of inputs; everything here is testable without a server.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
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
import urllib.parse
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from engine import inputs, kernels, memory
from engine.egress import EgressPolicy
from engine.flux import attention
from engine.flux.checkpoint import read_metadata
from engine.flux.converted import SOURCE_KEY, converted_checkpoint
from engine.go_fast import (
    CompileSettings,
    GoFast,
    GoFastError,
    configure_compiler,
    select_attention,
    shape_label,
)
from engine.lora import LoraError, LoraManager, LoraStore, StoreConfig, parse_lora
from engine.lora.store import CACHE_BYTES, CIVITAI, HUB, MAX_DOWNLOAD_BYTES
from engine.pipeline import FluxGenerator, default_device
from engine.safety import ALL_FLAGGED, SafetyChecker
from engine.weights import (
    BAKED,
    Sources,
    WeightsError,
    cache_dir,
    check_model_folder,
    ensure_files,
    load_manifest,
    recorded_sha256,
    transformer_file,
    with_mirrored_conversion,
)

logger = logging.getLogger(__name__)

MODEL_ENV = "SVDQ_MODEL"  # auto | tiny | a model name of weights/manifest.json
TINY = "tiny"
REAL = "flux-schnell"
FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# libwebp's speed/size trade-off (0 fastest .. 6 smallest; Pillow's default is 4). Method 2 does
# 2.5x less work than 4 for a 4% larger file at quality 80 (docs/benchmarks.md, "Encoding").
WEBP_METHOD = 2
# go_fast warm-up at setup, in this order: the default size at batch 1 (Replicate's default
# request), then batch 2, which gives the graph batches 2-4 share. Every other size shares
# these graphs (dynamic sequence length), so setup covers all 88 size x batch combinations.
WARM_UP_SHAPES = ((1024, 1024, 1), (1024, 1024, 2))
OUTPUT_PREFIX = "svdq-out-"
LORA_FIELDS = ("lora_weights", "extra_lora")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """The server's configuration, read from the environment in one place (:meth:`from_env`).

    ========================= ====================================================== =========
    variable                  meaning                                                default
    ========================= ====================================================== =========
    SVDQ_MODEL                auto, tiny, or a model of weights/manifest.json         auto
    SVDQ_WEIGHTS_DIR          the weights cache                                       weights/cache
    HF_HUB_OFFLINE=1          no downloads                                            off
    SVDQ_LORA_DIR             folder whose files lora_weights may name by path        none (no paths)
    SVDQ_LORA_CACHE_BYTES     bound on the LoRA download cache                        10 GiB
    SVDQ_LORA_MAX_BYTES       cap on one LoRA download                                4 GiB
    SVDQ_LORA_DEADLINE_S      time allowed to fetch one LoRA                          300
    HF_ENDPOINT, HF_TOKEN     the hub's base URL and token (sent to the hub only)     huggingface.co
    SVDQ_WEIGHTS_URL          a mirror: every weight file from <url>/<path>           none (sources)
    SVDQ_CIVITAI_ENDPOINT,    civitai's base URL and token (sent to civitai only)     civitai.com
    CIVITAI_API_TOKEN
    SVDQ_EGRESS_ALLOW         networks LoRA requests may reach although not public    none
                              (dev/tests only: e.g. 127.0.0.0/8; engine.egress)
    SVDQ_KERNELS              kernel backend: auto, reference, triton, cuda           auto
    SVDQ_ATTENTION            go_fast's attention: auto, sage, sdpa                   auto
    SVDQ_MEMORY               memory mode: auto, fast, small (engine/memory.py)       auto
    ========================= ====================================================== =========
    """

    weights_dir: Path
    model: str = "auto"
    offline: bool = False
    lora: StoreConfig | None = None
    kernels: str = "auto"
    attention: str = "auto"
    sources: Sources = dataclasses.field(default_factory=Sources)  # where weight files come from (mirror, hub, token)
    baked_dir: Path = BAKED  # weights baked into the image (scripts/bake_weights.py), used first
    memory: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceConfig:
        env = os.environ if environ is None else environ
        weights = cache_dir(env)

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                return float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        local = env.get("SVDQ_LORA_DIR", "").strip()
        lora = StoreConfig(
            root=weights / "loras",
            cache_bytes=int(number("SVDQ_LORA_CACHE_BYTES", CACHE_BYTES)),
            max_download_bytes=int(number("SVDQ_LORA_MAX_BYTES", MAX_DOWNLOAD_BYTES)),
            deadline_s=number("SVDQ_LORA_DEADLINE_S", 300.0),
            local_dir=Path(local).expanduser() if local else None,
            hub=env.get("HF_ENDPOINT", "").strip() or HUB,
            civitai=env.get("SVDQ_CIVITAI_ENDPOINT", "").strip() or CIVITAI,
            hf_token=env.get("HF_TOKEN") or None,
            civitai_token=env.get("CIVITAI_API_TOKEN") or None,
            egress=EgressPolicy.parse(env.get("SVDQ_EGRESS_ALLOW", "")),
        )
        attention_kind = env.get("SVDQ_ATTENTION", "auto").strip().lower() or "auto"
        if attention_kind not in attention.KINDS:
            raise ValueError(f"SVDQ_ATTENTION={attention_kind!r}: choose one of {', '.join(attention.KINDS)}")
        return cls(
            weights_dir=weights,
            model=env.get(MODEL_ENV, "auto").strip() or "auto",
            offline=env.get("HF_HUB_OFFLINE") == "1",
            lora=lora,
            kernels=env.get(kernels.ENV_VAR, "auto").strip() or "auto",
            attention=attention_kind,
            sources=Sources.from_env(env),
            memory=memory.parse(env.get(memory.ENV_VAR)),
        )


class NSFWError(RuntimeError):
    """Every image of a prediction was flagged by the safety checker."""


def _online(endpoint: str = HUB, timeout: float = 3.0) -> bool:
    """Whether the server at ``endpoint`` (a base URL: HF_ENDPOINT's hub or a mirror) takes connections."""
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname or "huggingface.co", parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def configure_runtime(weights_dir: Path, kernel_backend: str = "auto", compile_cache: Path | None = None) -> None:
    """Process-wide settings for serving, in one place, called once from setup()."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars are noise in a server's logs; per-step progress is logged instead.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # urllib3 logs every request line, query string (tokens included) and all, at DEBUG.
    logging.getLogger("urllib3").setLevel(logging.INFO)
    # The kernel backend; where no prebuilt CUDA package is installed (development machines) the
    # extension is compiled on first use, next to the weights so a warm container reuses it.
    kernels.configure(kernel_backend, ext_dir=weights_dir / "torch_extensions")

    # go_fast's compiled graphs (inductor's FX graph, autotuning and Triton caches) and our own
    # Triton kernels' cache: a restarted container with the same folder, or an image baked with
    # it, loads them instead of compiling again at setup.
    cache = compile_cache or weights_dir / "compile-cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "torchinductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))


class SetupPhases:
    """Times setup's phases; each is logged as it ends, and :meth:`summary` lists them all."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t
            logger.info("setup: %s %.1f s", name, self.seconds[name])

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return f"setup {time.perf_counter() - self.t0:.1f} s ({parts})"


def compile_cache_dir(config: ServiceConfig) -> Path:
    """Inductor's and Triton's caches: in the baked folder when the image has one (warmed there by
    scripts/bake_weights.py --warm on a GPU of the serving kind), else beside the weights cache.
    Either lives as long as the container; /tmp, Triton's default home, may not."""
    return config.baked_dir / "compile-cache" if config.baked_dir.is_dir() else config.weights_dir / "compile-cache"



def memory_mode(requested: str, device: torch.device) -> memory.Mode:
    """The memory mode for ``device`` (auto: from the GPU's memory), logged with the reason."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    mode, why = memory.choose(requested, total)
    logger.info("memory mode: %s (%s)", mode.value, why)
    return mode


def choose_model(config: ServiceConfig, gpu: bool | None = None) -> str:
    """The model to serve: ``config.model`` when named; in auto mode the real model on a GPU.

    The tiny model (random weights, noise images) is served only on a CPU or when named: a GPU
    host without the real weights fails setup (see :func:`model_files`) rather than silently
    serving noise.
    """
    if config.model != "auto":
        return config.model
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not gpu:
        logger.info("no GPU: serving the embedded tiny model (set %s to choose)", MODEL_ENV)
        return TINY
    return REAL


def tiny_model_dir(weights_dir: Path) -> Path:
    """The embedded tiny model, made on first use (seconds) and renamed into place when complete."""
    from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model

    root = weights_dir / TINY
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


def model_files(name: str, config: ServiceConfig) -> tuple[Path, Path]:
    """``(model folder, transformer checkpoint)`` for a model, fetched and verified.

    Every .safetensors file's header is checked, so a damaged file fails setup naming it.
    """
    if name == TINY:
        from engine.tiny_model import CHECKPOINT_NAME

        root = tiny_model_dir(config.weights_dir)
        check_model_folder(root)
        return root, root / CHECKPOINT_NAME
    entries = load_manifest(name)
    baked = config.baked_dir / name
    if all((baked / e.path).exists() for e in entries):
        logger.info("weights: baked into the image at %s (checked by size; hashed when baked)", baked)
        ensure_files(entries, baked, offline=True, verify="size")
        check_model_folder(baked)
        return baked, baked / transformer_file(name)
    root = config.weights_dir / name
    missing = [e.path for e in entries if not (root / e.path).exists()]
    where = urllib.parse.urlsplit(config.sources.mirror or config.sources.hub)
    reachable = _online(config.sources.mirror or config.sources.hub)
    offline = config.offline or (bool(missing) and not reachable)
    if missing and offline:
        raise WeightsError(
            f"{name}: {len(missing)} of {len(entries)} weight files are missing from the cache folder "
            f"{root} ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}) and "
            f"{where.hostname} cannot be reached{' (HF_HUB_OFFLINE=1)' if config.offline else ''}. Put the "
            f"files there (or mount a cache with SVDQ_WEIGHTS_DIR), bake them into the image "
            f"(scripts/bake_weights.py), allow network access, or set {MODEL_ENV}=tiny to serve the "
            "tiny test model on purpose"
        )
    transformer = transformer_file(name)
    source = next((e for e in entries if e.path == transformer), None)
    if not (root / transformer).exists() and not offline:
        entries, transformer = with_mirrored_conversion(entries, transformer, config.sources)
    ensure_files(entries, root, offline=offline, sources=config.sources)
    check_model_folder(root)
    if source is not None and transformer != source.path and source.sha256:
        converted_from = read_metadata(root / transformer)[0].get(SOURCE_KEY)
        if converted_from != source.sha256.lower():
            raise WeightsError(
                f"{transformer}: the mirror's converted transformer was made from a file with sha256 "
                f"{converted_from}, not the manifest's {source.path} ({source.sha256}); convert it again "
                "(scripts/bake_weights.py) or remove it from the mirror"
            )
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
        Only from the main thread, where Python allows installing handlers: predict.py's setup()
        calls it (FluxService.setup itself runs on the prediction thread).
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
        lora: StoreConfig | None = None,
        *,
        compile_settings: CompileSettings | None = None,
        output_base: str | Path | None = None,
    ) -> None:
        """``lora``: the LoRA store's settings (a temporary folder when None); ``compile_settings``:
        go_fast's torch.compile (None: go_fast has no effect, as on a CPU)."""
        self.generator, self.safety, self.model = generator, safety, model
        self._eager = generator.pipe.transformer
        self.go_fast = GoFast(self._eager, compile_settings) if compile_settings else None
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
            configure_runtime(config.weights_dir, config.kernels, compile_cache_dir(config))
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
                service.warm_up()
        logger.info(
            "setup: model %s on %s, %d T5 tokens; %s", model, device, generator.text_tokens, phases.summary()
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
            with self._eager_only():
                return run()

    def _eager_only(self):
        """go_fast off: the compiled blocks run their eager forwards (regional compile is in place)."""
        return self.go_fast.disabled() if self.go_fast is not None else contextlib.nullcontext()

    def _use_loras(self, requested: list[tuple[str, str | None, float]]) -> None:
        """Make ``[(field, source, scale)]`` the active LoRAs (no source: none), all-or-nothing.

        Every failure, whatever its cause, is a ValueError naming the field, and the model stays
        as it was.
        """
        wanted = []
        for field, source, scale in requested:
            if source is None or not source.strip():
                continue
            try:
                shown, parsed = self.lora_store.load(source)
            except LoraError as e:
                raise ValueError(f"{field}: {e}") from None
            except Exception as e:  # anything unforeseen in a hostile file still names the field
                raise ValueError(f"{field}: could not be loaded ({type(e).__name__}: {e})") from None
            wanted.append((field, parsed, float(scale), shown))
        if not wanted and self.loras.active:
            logger.info("LoRA: none (base model restored)")
        t0 = time.perf_counter()
        try:
            self.loras.set([(field, parsed, scale) for field, parsed, scale, _ in wanted])
        except Exception as e:
            fields = " and ".join(w[0] for w in wanted)
            raise ValueError(f"{fields}: could not be applied ({e}); the model is unchanged") from None
        for field, _, scale, shown in wanted:
            logger.info(
                "LoRA active: %s = %s at scale %g (%.3f s)", field, shown, scale, time.perf_counter() - t0
            )

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
        prompt = inputs.check_prompt(prompt)
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
        if go_fast and self.go_fast is None:
            logger.info("go_fast: no GPU, so nothing to speed up; running the same path")
        self._use_loras(
            [("lora_weights", lora_weights, lora_scale), ("extra_lora", extra_lora, extra_lora_scale)]
        )
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
                with attention.using("sdpa"), self._eager_only():  # go_fast off: SDPA, eager blocks
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
            flags = self.safety.flags(images)  # the checker, confirmed by the classifier (engine.safety)
            for i, flagged in enumerate(flags):
                if flagged:
                    logger.warning("NSFW content detected in image %d (seed %d); it is not returned", i, seeds[i])
            kept = [i for i, flagged in enumerate(flags) if not flagged]
            if not kept:
                raise NSFWError(ALL_FLAGGED)  # Replicate's flux models' words
            images, seeds = [images[i] for i in kept], [seeds[i] for i in kept]
        out_dir = out_dir or self.outputs.next()
        paths = save_images(
            images, out_dir, output_format=output_format, quality=output_quality, seeds=seeds, prompt=prompt
        )
        logger.info(
            "safety + encode: %.2f s; total %.2f s", time.perf_counter() - t1, time.perf_counter() - t0
        )
        return paths
