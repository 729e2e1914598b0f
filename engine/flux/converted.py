"""The public engine's checkpoint converted once, kept, and found again by its source's sha256.

Converting the published INT4 file to our layout is CPU work (278 CPU-seconds measured for
FLUX.1-schnell) that gives the same bytes every time for the same source. setup() therefore
converts it once and writes the result (our format, atomic rename) as
``<folder>/<source name>.<sha256[:16]>.svdq.safetensors``, its metadata recording the full
sha256 of the source (``converted_from_sha256``); the next setup, or an image baked by
scripts/bake_weights.py, loads that file instead. A file of ours is used as it is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from engine.flux.checkpoint import FORMAT, convert_public_checkpoint, read_metadata, write_checkpoint

logger = logging.getLogger(__name__)

SOURCE_KEY = "converted_from_sha256"


def converted_name(source: Path, sha256: str) -> str:
    return f"{source.stem}.{sha256[:16]}.svdq.safetensors"


def _matches(path: Path, sha256: str) -> bool:
    try:
        metadata, _ = read_metadata(path)
    except Exception:  # a damaged or half-written file: converted again
        return False
    return metadata.get("format") == FORMAT and metadata.get(SOURCE_KEY) == sha256


def converted_checkpoint(source: Path, source_sha256: Callable[[], str], folders: list[Path]) -> Path:
    """``source`` in our format: itself if it is ours, else its conversion, made once.

    ``source_sha256()`` gives the source's sha256 (asked only for a file to convert: the weights
    cache has it recorded, so nothing is hashed again).
    ``folders``: where a conversion is looked for, in order (a baked image's folder first); a
    new one is written into the first writable folder. Logs whether the cache was used and
    how long the conversion took.
    """
    metadata, _ = read_metadata(source)
    if metadata.get("format") == FORMAT:
        return source
    sha256 = source_sha256()
    name = converted_name(source, sha256)
    for folder in folders:
        if _matches(folder / name, sha256):
            logger.info(
                "setup: converted checkpoint from the cache: %s (source sha256 %s)", folder / name, sha256
            )
            return folder / name
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if not os.access(folder, os.W_OK):
            continue
        t0 = time.perf_counter()
        state, meta = convert_public_checkpoint(source)
        meta[SOURCE_KEY] = sha256
        path = write_checkpoint(state, folder / name, meta)
        logger.info(
            "setup: converted the public engine's checkpoint %s in %.1f s, kept as %s (next setup loads it)",
            source.name,
            time.perf_counter() - t0,
            path,
        )
        return path
    raise OSError(
        f"no writable folder for the converted checkpoint of {source} among {[str(f) for f in folders]}"
    )
