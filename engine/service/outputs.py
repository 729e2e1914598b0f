"""A prediction's files: images encoded with their seed, in one folder per prediction."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, PngImagePlugin

logger = logging.getLogger(__name__)

FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# libwebp's speed/size trade-off (0 fastest .. 6 smallest; Pillow's default is 4). Method 2 does
# 2.5x less work than 4 for a 4% larger file at quality 80 (docs/benchmarks.md, "Encoding").
WEBP_METHOD = 2
OUTPUT_PREFIX = "svdq-out-"


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
