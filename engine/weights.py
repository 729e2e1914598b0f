"""Weights from a manifest: parallel, resumable downloads into a cache, verified by sha256.

A manifest (weights/manifest.json) lists, per model, every file the container needs with its
source (a hub repository and file, or a URL) and sha256. ``ensure_files`` makes each present
in the cache folder: files already there are verified (a sidecar remembers the size, mtime and
hash, so a restart does not re-hash gigabytes), missing ones are downloaded in parallel, a
``.part`` file is resumed where it stopped, and a file only takes its final name after its
hash matched. A wrong hash, a truncated download or a missing file offline is a
:class:`WeightsError` that names the file.

An entry whose sha256 is null is trusted on first download: its hash is recorded then and
checked from then on, with a warning. A recorded hash is never replaced: a file that no longer
matches it is an error naming the file (delete the file to fetch it again). URL entries go
through :func:`engine.download.download` (size cap, identity encoding, deadline); hub entries
through huggingface_hub, which resumes and verifies its own downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.download import DownloadError, DownloadLimits, download, redact

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "weights" / "manifest.json"
CACHE_ENV = "SVDQ_WEIGHTS_DIR"
_CHUNK = 1 << 20
# Cap for a URL entry without a recorded size: above any single file of the model (the
# largest, a T5 shard, is about 5 GB; the transformer about 6.7 GB).
MAX_FILE_BYTES = 32 * 2**30
WEIGHTS_LIMITS = DownloadLimits(max_bytes=MAX_FILE_BYTES, deadline_s=3 * 3600.0, idle_s=60.0)


class WeightsError(RuntimeError):
    """A weights file that could not be made present and verified; the message names it."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    path: str  # where it goes, relative to the model folder
    sha256: str | None
    url: str | None = None
    hub: str | None = None  # "owner/repo"
    file: str | None = None  # path inside the hub repository
    revision: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.hub is None):
            raise ValueError(f"{self.path}: give exactly one source, url or hub")
        if self.hub and not self.file:
            raise ValueError(f"{self.path}: a hub source needs 'file'")

    @property
    def source(self) -> str:
        return self.url or f"hub:{self.hub}/{self.file}" + (f"@{self.revision}" if self.revision else "")


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The weights cache: ``$SVDQ_WEIGHTS_DIR`` or ``weights/cache`` (read by setup(), passed on)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(CACHE_ENV) or ROOT / "weights" / "cache")


def load_manifest(model: str, manifest: Path = MANIFEST) -> list[WeightFile]:
    data = json.loads(Path(manifest).read_text())
    models = data.get("models", {})
    if model not in models:
        raise WeightsError(f"{manifest}: no model named {model!r} (have: {', '.join(models)})")
    return [WeightFile(**entry) for entry in models[model]["files"]]


def transformer_file(model: str, manifest: Path = MANIFEST) -> str:
    """The manifest's name for a model's quantized transformer checkpoint (a path in its folder)."""
    models = json.loads(Path(manifest).read_text()).get("models", {})
    if model not in models or "transformer" not in models[model]:
        raise WeightsError(f"{manifest}: no transformer listed for model {model!r}")
    return models[model]["transformer"]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _verified_hash(path: Path, label: str) -> str:
    """The file's sha256, from its sidecar when size and mtime are unchanged.

    When they changed the file is hashed again and must still match the recorded hash: a
    recorded hash is never overwritten by a different one.
    """
    st = path.stat()
    side = _sidecar(path)
    recorded = None
    if side.exists():
        try:
            rec = json.loads(side.read_text())
            recorded = rec["sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{label}: its hash record {side.name} is damaged ({e}); delete both") from e
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return recorded
    digest = sha256_of(path)
    if recorded is not None and digest != recorded:
        raise WeightsError(
            f"{label}: sha256 {digest} no longer matches the one recorded when it was fetched ({recorded}); "
            f"the file in {path.parent} changed or is damaged: delete it to fetch it again"
        )
    side.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    return digest


def _check(entry: WeightFile, path: Path) -> None:
    if entry.size is not None and path.stat().st_size != entry.size:
        raise WeightsError(
            f"{entry.path}: size {path.stat().st_size} bytes, expected {entry.size} (truncated download?)"
        )
    first_use = not _sidecar(path).exists()
    digest = _verified_hash(path, entry.path)
    if entry.sha256 is None:
        if first_use:
            logger.warning(
                "%s: no sha256 pinned for it; recorded %s on first use and verified from now on",
                entry.path,
                digest,
            )
    elif digest != entry.sha256.lower():
        raise WeightsError(f"{entry.path}: sha256 {digest} does not match the manifest's {entry.sha256}")


def _download_url(entry: WeightFile, part: Path) -> None:
    limits = dataclasses.replace(WEIGHTS_LIMITS, max_bytes=entry.size or MAX_FILE_BYTES)
    try:
        download(entry.url, part, limits=limits, resume=True)
    except DownloadError as e:
        kept = part.stat().st_size if part.exists() else 0
        hint = f"; {kept} bytes kept in {part.name}, run again to resume" if kept else ""
        raise WeightsError(f"{entry.path}: {e}{hint}") from None


def _download_hub(entry: WeightFile, part: Path) -> None:
    from huggingface_hub import hf_hub_download

    # The hub client resumes and stages its own partial files; we only move the result.
    with tempfile.TemporaryDirectory(dir=part.parent) as tmp:
        got = hf_hub_download(entry.hub, entry.file, revision=entry.revision, local_dir=tmp)
        shutil.move(got, part)


def _fetch(entry: WeightFile, root: Path, offline: bool) -> Path:
    dest = root / entry.path
    if dest.exists():
        _check(entry, dest)
        return dest
    if offline:
        raise WeightsError(
            f"{entry.path}: missing from {root} and downloads are off (offline); source {redact(entry.source)}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s from %s", entry.path, redact(entry.source))
    try:
        (_download_url if entry.url else _download_hub)(entry, part)
    except WeightsError:
        raise
    except Exception as e:  # hub errors: name the file, keep the part for resuming
        raise WeightsError(f"{entry.path}: download from {redact(entry.source)} failed: {e}") from e
    try:
        _check(entry, part)
    except WeightsError:
        part.unlink(missing_ok=True)
        _sidecar(part).unlink(missing_ok=True)
        raise
    part.replace(dest)
    _sidecar(part).replace(_sidecar(dest))
    return dest


def ensure_files(entries: list[WeightFile], root: Path, *, offline: bool = False, workers: int = 4) -> Path:
    """Make every entry present and verified under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_fetch, e, root, offline) for e in entries]
        errors = []
        for fut in futures:
            try:
                fut.result()
            except WeightsError as e:
                errors.append(str(e))
    if errors:
        raise WeightsError("; ".join(errors))
    return root


def check_safetensors(path: Path, label: str | None = None) -> None:
    """Read a .safetensors file's header and check every tensor lies inside the file.

    Cheap (the header only), and it turns a damaged shard into an error naming the file
    instead of the loader's bare "header too large" or "incomplete metadata".
    """
    label = label or path.name
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {name} at bytes {begin}..{end} lies outside the file")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise WeightsError(f"{label}: damaged .safetensors file ({e}); delete it to fetch it again") from e


def check_model_folder(root: Path) -> None:
    """:func:`check_safetensors` on every .safetensors file under ``root``, naming the first bad one."""
    for path in sorted(root.rglob("*.safetensors")):
        check_safetensors(path, str(path.relative_to(root)))
