"""Which model to serve, and its files: chosen from the configuration, fetched, verified."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch

from engine.flux.checkpoint import read_metadata
from engine.flux.converted import SOURCE_KEY
from engine.lora.sources import HUB
from engine.service.config import MODEL_ENV, ServiceConfig
from engine.weights import (
    WeightsError,
    check_model_folder,
    ensure_files,
    load_manifest,
    transformer_file,
    with_mirrored_conversion,
)

logger = logging.getLogger(__name__)

TINY = "tiny"  # random weights: every code path of the real model, noise images (the tests' model)
SHAPES = "tiny-shapes"  # trained: draws one coloured shape (docs/tiny-model.md); the CPU default
REAL = "flux-schnell"


def _online(endpoint: str = HUB, timeout: float = 3.0) -> bool:
    """Whether the server at ``endpoint`` (a base URL: HF_ENDPOINT's hub or a mirror) takes connections."""
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname or "huggingface.co", parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def choose_model(config: ServiceConfig, gpu: bool | None = None) -> str:
    """The model to serve: ``config.model`` when named; in auto mode the real model on a GPU.

    The embedded models are served only on a CPU or when named: a GPU host without the real
    weights fails setup (see :func:`model_files`) rather than silently serving a toy. On a CPU the
    default is the trained tiny model that draws its prompt's shape (:data:`SHAPES`).
    """
    if config.model != "auto":
        return config.model
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not gpu:
        logger.info(
            "no GPU: serving the embedded tiny model %s, which draws one coloured shape (set %s to choose)",
            SHAPES,
            MODEL_ENV,
        )
        return SHAPES
    return REAL


def tiny_model_dir(weights_dir: Path, name: str = TINY) -> Path:
    """An embedded model's folder (:data:`TINY` or :data:`SHAPES`), made on first use (seconds)
    and renamed into place when complete."""
    from engine.tiny_model import CHECKPOINT_NAME, make_tiny_model
    from engine.tiny_shapes import make_shapes_model

    root = weights_dir / name
    if (root / CHECKPOINT_NAME).exists() and (name != SHAPES or _made_from_current_weights(root)):
        return root
    logger.info("making the embedded model %s in %s", name, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    try:
        (make_shapes_model if name == SHAPES else make_tiny_model)(tmp)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _made_from_current_weights(root: Path) -> bool:
    """Whether a made shapes model folder comes from the repository's trained weights."""
    import json

    from engine.tiny_shapes import shapes_weights_digest

    try:
        made = json.loads((root / "TINY_MODEL.json").read_text()).get("weights_sha256")
    except (OSError, ValueError):
        return False
    return made == shapes_weights_digest()


def model_files(name: str, config: ServiceConfig) -> tuple[Path, Path]:
    """``(model folder, transformer checkpoint)`` for a model, fetched and verified.

    Every .safetensors file's header is checked, so a damaged file fails setup naming it.
    """
    if name in (TINY, SHAPES):
        from engine.tiny_model import CHECKPOINT_NAME

        root = tiny_model_dir(config.weights_dir, name)
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

