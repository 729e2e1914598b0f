"""Weights from a manifest: parallel, resumable downloads into a cache, verified by sha256.

A manifest (weights/manifest.json) lists, per model, every file the container needs with its
source (a hub repository and file, or a URL) and sha256. ``ensure_files`` makes each present
in the cache folder: files already there are verified (a sidecar remembers the size, mtime and
hash, so a restart does not re-hash gigabytes), missing ones are downloaded in parallel, a
``.part`` file is resumed where it stopped, and a file only takes its final name after its
hash matched. A wrong hash, a truncated download or a missing file offline is a
:class:`WeightsError` that names the file.

An entry whose sha256 is null is verified on first use only (its hash is recorded and
checked from then on), and a warning says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "weights" / "manifest.json"
CACHE_ENV = "SVDQ_WEIGHTS_DIR"
_CHUNK = 1 << 20


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


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or ROOT / "weights" / "cache")


def load_manifest(model: str, manifest: Path = MANIFEST) -> list[WeightFile]:
    data = json.loads(Path(manifest).read_text())
    models = data.get("models", {})
    if model not in models:
        raise WeightsError(f"{manifest}: no model named {model!r} (have: {', '.join(models)})")
    return [WeightFile(**entry) for entry in models[model]["files"]]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _verified_hash(path: Path) -> str:
    """The file's sha256, from its sidecar when size and mtime are unchanged."""
    st = path.stat()
    side = _sidecar(path)
    if side.exists():
        rec = json.loads(side.read_text())
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return rec["sha256"]
    digest = sha256_of(path)
    side.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    return digest


def _check(entry: WeightFile, path: Path) -> None:
    if entry.size is not None and path.stat().st_size != entry.size:
        raise WeightsError(
            f"{entry.path}: size {path.stat().st_size} bytes, expected {entry.size} (truncated download?)"
        )
    digest = _verified_hash(path)
    if entry.sha256 is None:
        logger.warning(
            "%s: no sha256 pinned for it; recorded %s on first use and verified from now on",
            entry.path,
            digest,
        )
    elif digest != entry.sha256.lower():
        raise WeightsError(f"{entry.path}: sha256 {digest} does not match the manifest's {entry.sha256}")


def _download_url(entry: WeightFile, part: Path) -> None:
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(entry.url, headers=headers, stream=True, timeout=(10, 60)) as r:
        if r.status_code == 416:  # the part file is already complete
            return
        if r.status_code not in (200, 206):
            raise WeightsError(f"{entry.path}: HTTP {r.status_code} from {entry.url}")
        mode = "ab" if r.status_code == 206 else "wb"  # a server without Range support restarts
        with open(part, mode) as f:
            try:
                for chunk in r.iter_content(_CHUNK):
                    f.write(chunk)
            except requests.exceptions.ChunkedEncodingError as e:  # the connection ended early
                raise WeightsError(
                    f"{entry.path}: truncated download ({f.tell()} bytes kept in {part.name}; run again to resume)"
                ) from e
        expected = r.headers.get("Content-Length")
    if expected is not None and r.status_code == 200 and part.stat().st_size != int(expected):
        raise WeightsError(f"{entry.path}: truncated download ({part.stat().st_size} of {expected} bytes)")


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
            f"{entry.path}: missing from {root} and downloads are off (offline); source {entry.source}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s from %s", entry.path, entry.source)
    try:
        (_download_url if entry.url else _download_hub)(entry, part)
    except WeightsError:
        raise
    except Exception as e:  # network and hub errors: name the file, keep the part for resuming
        raise WeightsError(f"{entry.path}: download from {entry.source} failed: {e}") from e
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
