"""Set-up's process-wide settings and phases: runtime flags and caches, the memory mode, phase timing."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine import kernels, memory
from engine.service.config import ServiceConfig

logger = logging.getLogger(__name__)


def configure_runtime(
    weights_dir: Path, kernel_backend: str = "auto", compile_cache: Path | None = None, w4a8: str = "auto"
) -> None:
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
    kernels.configure(kernel_backend, ext_dir=weights_dir / "torch_extensions", w4a8=w4a8)

    # go_fast's compiled graphs (inductor's FX graph, autotuning and Triton caches) and our own
    # Triton kernels' cache: a restarted container with the same folder, or an image baked with
    # it, loads them instead of compiling again at setup.
    # Inductor's cache keys do not cover a custom op's fake: a graph compiled against an older
    # version of our ops (another output layout, say) would be loaded and fail its stride asserts,
    # so the folder is keyed by the ops' source.
    cache = compile_cache or weights_dir / "compile-cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / f"torchinductor-{ops_source_digest()}"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))


def ops_source_digest() -> str:
    """12 hex digits of sha256 over the Python sources that define our ops and their fakes.

    Inductor's FX-graph cache does not key on a custom op's fake, so a changed fake must change
    the cache folder: every engine file that registers a fake is hashed, with the kernels'
    package (the ops' wrappers and launch code) and the reference ops.
    """
    engine = Path(kernels.__file__).resolve().parent.parent
    paths = {*(engine / "kernels").rglob("*.py"), engine / "quant" / "ops.py"}
    paths |= {p for p in engine.rglob("*.py") if "register_fake" in p.read_text()}
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


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

