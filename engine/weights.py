"""Weights from a manifest: parallel, resumable downloads into a cache, verified by sha256.

A manifest (weights/manifest.json) lists, per model, every file the container needs with its
source (a hub repository and file, or a URL) and sha256. ``ensure_files`` makes each present
in the cache folder: files already there are verified (a sidecar remembers the size, mtime and
hash, so a restart does not re-hash gigabytes), missing ones are downloaded in parallel, and a
file only takes its final name after its hash matched. A wrong hash, a truncated download or a
missing file offline is a :class:`WeightsError` that names the file.

Where the bytes come from (:class:`Sources`, configured once by setup()): each entry's own
source, with ``HF_TOKEN`` sent to the hub only (black-forest-labs/FLUX.1-schnell is gated: a
refused or missing token is an error naming the repository and the ways out), or a mirror, a
base URL of the deployer's own bucket that serves every entry at ``<base>/<path>``. Every file,
hub or URL, goes through engine.download: a file the server describes with a size, a strong
ETag and ``Accept-Ranges: bytes`` is fetched in parallel ranged chunks (``If-Range``: a file
that changes midway restarts from zero), its finished chunks recorded in ``<part>.chunks.json``
so a killed download resumes with the chunks it has; any other file is one stream that resumes
only when its ETag says the remote is unchanged (engine.weight_transfer moves the bytes). Nothing
of a partial download is left once a file is complete. The hub's own client is not used for manifest files (its staging folders
outlived killed downloads and restarted at byte 0).

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
import re
import shutil
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.download import DownloadError, DownloadLimits, human, probe, redact
from engine.weight_transfer import chunks_path, discard_partial, sidecar_path, transfer

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "weights" / "manifest.json"
CACHE_ENV = "SVDQ_WEIGHTS_DIR"
# Written by scripts/bake_weights.py before `cog build`; in the image only when it exists
# (.dockerignore keeps weights/cache and weights/tiny out, not this).
BAKED = ROOT / "weights" / "baked"
HUB = "https://huggingface.co"
CHUNK_BYTES = 64 * 2**20  # one ranged request of a large file
CHUNK_WORKERS = 8  # ranged requests in flight per file
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


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where manifest files come from; built by setup() (ServiceConfig) and passed down."""

    mirror: str | None = None  # base URL: every entry from <mirror>/<entry.path>
    hub: str = HUB  # the hub's base URL (HF_ENDPOINT)
    hf_token: str | None = None  # sent to the hub only, never to a mirror or a URL entry
    chunk_bytes: int = CHUNK_BYTES
    chunk_workers: int = CHUNK_WORKERS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Sources:
        """``SVDQ_WEIGHTS_URL`` (a mirror), ``HF_ENDPOINT``, ``HF_TOKEN``: read by setup() and the scripts."""
        env = os.environ if environ is None else environ
        return cls(
            mirror=env.get("SVDQ_WEIGHTS_URL", "").strip() or None,
            hub=env.get("HF_ENDPOINT", "").strip() or HUB,
            hf_token=env.get("HF_TOKEN") or None,
        )

    def url_of(self, entry: WeightFile) -> str:
        if self.mirror:
            return f"{self.mirror.rstrip('/')}/{urllib.parse.quote(entry.path)}"
        if entry.url:
            return entry.url
        revision = urllib.parse.quote(entry.revision or "main", safe="")
        return f"{self.hub.rstrip('/')}/{entry.hub}/resolve/{revision}/{urllib.parse.quote(entry.file)}"

    def headers_for(self, entry: WeightFile) -> dict[str, str]:
        # requests drops Authorization on a redirect to another host (the hub's CDN).
        if entry.hub and not self.mirror and self.hf_token:
            return {"Authorization": f"Bearer {self.hf_token}"}
        return {}

    @property
    def host(self) -> str:
        """The host downloads go to first (for the reachability check)."""
        return urllib.parse.urlsplit(self.mirror or self.hub).hostname or ""


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


def _verified_hash(path: Path, label: str) -> str:
    """The file's sha256, from its sidecar when size and mtime are unchanged.

    When they changed the file is hashed again and must still match the recorded hash: a
    recorded hash is never overwritten by a different one.
    """
    st = path.stat()
    side = sidecar_path(path)
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
    first_use = not sidecar_path(path).exists()
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


def _gated_message(entry: WeightFile, e: DownloadError, sources: Sources) -> str:
    why = (
        f"the token in HF_TOKEN was refused (HTTP {e.status}): its account has not been granted access"
        if sources.hf_token
        else f"no token was given (HF_TOKEN is unset; HTTP {e.status})"
    )
    return (
        f"{entry.path}: {entry.hub} is a gated repository on the Hugging Face hub and {why}. Ways out: "
        f"accept its license at {HUB}/{entry.hub} and set HF_TOKEN to a token of that account (a "
        "secret of the deployment); or serve every weight file from your own bucket and set "
        "SVDQ_WEIGHTS_URL to its base URL; or bake the weights into the image with "
        'scripts/bake_weights.py before `cog build` (README, "Weights")'
    )


def _fetch(entry: WeightFile, root: Path, offline: bool, sources: Sources, verify: str = "sha256") -> Path:
    dest = root / entry.path
    if dest.exists():
        if verify == "size":  # a baked image: hashed when it was baked, immutable since
            if entry.size is not None and dest.stat().st_size != entry.size:
                raise WeightsError(f"{entry.path}: size {dest.stat().st_size} bytes, expected {entry.size}")
        else:
            _check(entry, dest)
        return dest
    if offline:
        raise WeightsError(
            f"{entry.path}: missing from {root} and downloads are off (offline); source {redact(entry.source)}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = sources.url_of(entry)
    logger.info("downloading %s from %s", entry.path, redact(url))
    limits = dataclasses.replace(WEIGHTS_LIMITS, max_bytes=entry.size or MAX_FILE_BYTES)
    try:
        transfer(url, part, sources.headers_for(entry), limits, sources)
    except DownloadError as e:
        if entry.hub and not sources.mirror and e.status in (401, 403):
            discard_partial(part)
            raise WeightsError(_gated_message(entry, e, sources)) from None
        try:  # a chunked partial is preallocated: what it holds is in its record
            kept = len(json.loads(chunks_path(part).read_text())["done"]) * sources.chunk_bytes
        except (OSError, ValueError, KeyError, TypeError):
            kept = part.stat().st_size if part.exists() else 0
        hint = f"; about {human(kept)} kept in {part.name}, run again to resume" if kept else ""
        raise WeightsError(f"{entry.path}: {e}{hint}") from None
    try:
        _check(entry, part)
    except WeightsError:
        discard_partial(part)
        raise
    part.replace(dest)
    sidecar_path(part).replace(sidecar_path(dest))
    return dest


CONVERTED = "converted"  # a mirror's folder for the transformer already in our format


def with_mirrored_conversion(
    entries: list[WeightFile], transformer: str, sources: Sources
) -> tuple[list[WeightFile], str]:
    """``(entries, transformer path)``, the transformer taken from ``<mirror>/converted/<path>``
    when the mirror has it (our format: nothing to convert at boot), else as listed."""
    if not sources.mirror:
        return entries, transformer
    converted = WeightFile(
        path=f"{CONVERTED}/{transformer}",
        url=f"{sources.mirror.rstrip('/')}/{CONVERTED}/{transformer}",
        sha256=None,
    )
    try:
        probe(sources.url_of(converted), limits=WEIGHTS_LIMITS)
    except DownloadError as e:
        logger.info("mirror: no converted transformer (%s); fetching the published one", e)
        return entries, transformer
    logger.info("mirror: the transformer comes converted (%s)", converted.path)
    return [e for e in entries if e.path != transformer] + [converted], converted.path


_STAGING = re.compile(r"tmp[a-z0-9_]{8}")


def remove_stale_staging(root: Path) -> None:
    """Remove the staging folders huggingface_hub left in ``root`` when a download was killed
    (``tmpXXXXXXXX/.cache/huggingface/...incomplete``, written by earlier versions of this module)."""
    if not root.is_dir():
        return
    for d in [p for p in root.rglob("tmp*") if p.is_dir() and _STAGING.fullmatch(p.name)]:
        if (d / ".cache" / "huggingface").is_dir():
            logger.info("removing a download's staging folder left behind: %s", d)
            shutil.rmtree(d, ignore_errors=True)


def recorded_sha256(path: Path, *, trust_recorded: bool = False) -> str:
    """The verified sha256 of a file ``ensure_files`` made present (from its sidecar when current).

    ``trust_recorded``: the sidecar's hash whenever the size matches, mtime aside (a baked image,
    whose files were hashed when baked and whose copy may not keep mtimes to the nanosecond).
    """
    if trust_recorded:
        try:
            rec = json.loads(sidecar_path(path).read_text())
            if rec.get("size") == path.stat().st_size and isinstance(rec.get("sha256"), str):
                return rec["sha256"]
        except (OSError, ValueError):
            pass
    return _verified_hash(path, path.name)


def ensure_files(
    entries: list[WeightFile],
    root: Path,
    *,
    offline: bool = False,
    workers: int = 4,
    sources: Sources | None = None,
    verify: str = "sha256",
) -> Path:
    """Make every entry present and verified under ``root``; returns ``root``.

    ``verify="size"`` checks present files by size only (a baked image, hashed when baked).
    """
    sources = sources or Sources()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_fetch, e, root, offline, sources, verify) for e in entries]
        errors = []
        for fut in futures:
            try:
                fut.result()
            except WeightsError as e:
                errors.append(str(e))
    if errors:
        gated = [e for e in errors if "is a gated repository" in e]
        if len(gated) > 1:  # one explanation, not one per file
            errors = [e for e in errors if e not in gated] + [
                f"{len(gated)} files ({', '.join(g.split(':', 1)[0] for g in gated)}) are refused: "
                + gated[0].split(": ", 1)[1]
            ]
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
