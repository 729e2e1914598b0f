"""The one cache that keeps LoRAs (files on disk, parsed in memory), and their fetching.

What a ``lora_weights`` string names is engine.lora.sources' (:func:`resolve_source`: URLs, the
hub, civitai, data: URLs, a path inside the configured folder; Replicate references refused);
a ``.tar`` archive (any of those) gives its one .safetensors (or ``lora.safetensors``), as
Replicate's trainer writes them.

Downloads go through engine.download (size cap, identity encoding, deadline, cancellation).
A file reaches the cache only after it parsed: it is written as ``<key>.part``, unpacked,
read and mapped onto the model, and only then renamed. ``.part`` files count towards the
cache bound and are removed on failure. Tokens (HF_TOKEN, CIVITAI_API_TOKEN) are sent as
headers only to their own hosts, and sources are redacted in every log line and error.

Sources whose bytes can change (any URL without a pinned revision, hub ``resolve/main``,
``owner/repo``, a civitai model's latest version: ``Source.immutable`` False) are revalidated on
every use: the file URL the source names now (the hub or civitai API asked again where there is
one) is requested with the recorded validator (``If-None-Match: <strong ETag>``, else
``If-Modified-Since``), kept beside the file as ``<key>.json``. 304 (or 200 with the same strong
ETag): the cached copy is used. 200: the server says the copy is stale, so it is deleted as the
new body starts (the bound never has to hold two versions; the ``.part`` counts in it) and the
new file is renamed into place once it parsed; a file name never holds a half-written file. A
revalidation that fails without saying anything about the file (no answer in time, a refused
address, a broken connection, 500/502/503/504: RFC 5861's stale-if-error) serves the cached copy
with one warning line: that copy was verified when fetched, and a hub outage should not fail
requests the cache can answer. Any other answer (404, 401, 403, ...) fails the request, as a
first fetch would. A file recorded without any validator (the server sent none) is kept for
``StoreConfig.mutable_ttl_s`` and then fetched again. Immutable sources (a hub commit, a civitai
version id, data: URLs) are never revalidated.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import logging
import os
import stat
import tarfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import torch

from engine.download import (
    DownloadError,
    DownloadLimits,
    Validators,
    download_if_changed,
    human,
    redact,
)
from engine.egress import EgressPolicy
from engine.lora.formats import LoraError, ParsedLora, read_lora
from engine.lora.sources import CIVITAI, HUB, Source, resolve_source, resolve_url

logger = logging.getLogger(__name__)

# Default cap: the largest FLUX LoRAs are about 1.3 GB (rank 128 over every layer in bf16);
# fp32 rank-128 files reach about 2.5 GB.
MAX_DOWNLOAD_BYTES = 4 * 2**30
CACHE_BYTES = 10 * 2**30
PREFERRED_NAMES = ("lora.safetensors", "pytorch_lora_weights.safetensors")
_API_BYTES = 16 * 2**20  # cap on a hub or civitai API answer
MAX_TAR_MEMBERS = 1000  # Replicate's trainer writes a handful; 200k empty members cost 15 s to list
MUTABLE_TTL_S = 3600.0  # cache life of a LoRA from a mutable source whose server sends no validator


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Everything the store needs, read from the environment once, by the service's setup()."""

    root: Path  # the download cache
    cache_bytes: int = CACHE_BYTES  # bound on the cache folder, .part files included
    max_download_bytes: int = MAX_DOWNLOAD_BYTES  # cap on one LoRA (download, data: URL, tar member)
    deadline_s: float = 300.0  # one LoRA, lookups and download together
    idle_s: float = 30.0  # longest wait for the next bytes
    local_dir: Path | None = None  # paths are served only inside this folder; None: no paths
    hub: str = HUB  # base URLs, injectable for tests and mirrors (HF_ENDPOINT)
    civitai: str = CIVITAI
    hf_token: str | None = dataclasses.field(default=None, repr=False)
    civitai_token: str | None = dataclasses.field(default=None, repr=False)
    parsed_kept: int = 4  # parsed LoRAs kept in memory
    # cache life of a LoRA whose source can change (Source.immutable) and whose server sent no
    # ETag or Last-Modified to revalidate it with
    mutable_ttl_s: float = MUTABLE_TTL_S
    # outbound requests: public addresses only, unless allow-listed (dev/tests; engine.egress)
    egress: EgressPolicy = dataclasses.field(default_factory=EgressPolicy)


class Unavailable(LoraError):
    """A fetch that failed without saying anything about the file (DownloadError.transient)."""


@dataclasses.dataclass(frozen=True)
class _Version:
    """What the cache knows of a cached file from a mutable source (``<key>.json``): the file URL
    it came from, whether that URL's bytes are fixed (a civitai version's download), its
    validators, and the size and mtime of the file it describes (a record that does not match its
    file is ignored)."""

    url: str
    fixed: bool
    validators: Validators
    size: int
    mtime_ns: int


def choose_file(names: list[str], what: str) -> str:
    """The one .safetensors among ``names`` (or the one with a conventional LoRA name)."""
    found = [n for n in names if n.endswith(".safetensors")]
    if len(found) == 1:
        return found[0]
    preferred = [n for n in found if n.rsplit("/", 1)[-1] in PREFERRED_NAMES]
    if len(preferred) == 1:
        return preferred[0]
    if not found:
        raise LoraError(f"{what} holds no .safetensors file")
    raise LoraError(
        f"{what} holds {len(found)} .safetensors files ({', '.join(found[:5])}); name one "
        "(owner/repo/file.safetensors, or a blob/resolve URL)"
    )


class LoraStore:
    """Resolves, fetches, verifies and caches LoRAs; the service's only LoRA cache.

    ``parse`` maps a state dict onto the served model (``parse_lora(state, transformer)``);
    the store keeps the last ``parsed_kept`` results in memory and the files on disk, LRU,
    within ``cache_bytes``.
    """

    def __init__(self, config: StoreConfig, parse: Callable[[dict[str, torch.Tensor]], ParsedLora]) -> None:
        self.config, self.parse = config, parse
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Left by a process that died mid-download or mid-unpack: <key>.part, <key>.part.tarmember,
        # <key>.part.json; and records whose file is gone.
        for stale in self.root.glob("*.part*"):
            stale.unlink(missing_ok=True)
        for record in self.root.glob("*.json"):
            if not record.with_suffix(".safetensors").exists():
                record.unlink(missing_ok=True)
        self._parsed: collections.OrderedDict[str, ParsedLora] = collections.OrderedDict()
        if config.cache_bytes < config.max_download_bytes:
            logger.warning(
                "LoRA cache bound %s is below the download cap %s: LoRAs larger than the bound are refused",
                human(config.cache_bytes),
                human(config.max_download_bytes),
            )

    # --- the one entry point ---------------------------------------------------------------

    def load(self, text: str) -> tuple[str, ParsedLora]:
        """``(name for logs, parsed LoRA)`` for a ``lora_weights`` value. Raises LoraError."""
        c = self.config
        src = resolve_source(text, hub=c.hub, civitai=c.civitai, local_dir=c.local_dir)
        key = self._key(src)
        hit = self._parsed.pop(key, None)  # put back below once it is known to be current
        if hit is not None and (src.immutable or src.kind == "local"):  # a local key holds the mtime
            self._parsed[key] = hit
            logger.info("LoRA cache hit: %s already parsed", src.shown)
            return src.shown, hit
        t0 = time.perf_counter()
        if src.kind == "local":
            parsed = self._parse_file(Path(src.location), src.shown)
        else:
            parsed = self._cached_or_fetched(src, key, hit)
        if parsed is hit:
            logger.info("LoRA cache hit: %s already parsed (revalidated)", src.shown)
        else:
            logger.info("LoRA loaded from %s in %.2f s", src.shown, time.perf_counter() - t0)
        self._parsed[key] = parsed
        while len(self._parsed) > c.parsed_kept:
            self._parsed.popitem(last=False)
        return src.shown, parsed

    # --- internals -------------------------------------------------------------------------

    @staticmethod
    def _key(src: Source) -> str:
        if src.kind == "local":  # a local file is known by its path and modification time
            path = Path(src.location)
            return f"local:{path}@{path.stat().st_mtime_ns}"
        ident = f"{src.kind}:{src.location}@{src.revision}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def _parse_file(self, path: Path, shown: str) -> ParsedLora:
        try:
            state = read_lora(path)
        except LoraError as e:  # read_lora names the file; name the source instead
            raise LoraError(f"{shown}: {str(e).split(': ', 1)[-1]}") from None
        try:
            return self.parse(state)
        except LoraError as e:
            raise LoraError(f"{shown}: {e}") from None

    @property
    def _cap(self) -> int:
        """Largest LoRA file: the download cap, or the cache bound where that is smaller."""
        return min(self.config.max_download_bytes, self.config.cache_bytes)

    def _cached_or_fetched(self, src: Source, key: str, hit: ParsedLora | None) -> ParsedLora:
        """The LoRA from the file cache (revalidated if its source is mutable) or fetched."""
        c = self.config
        final = self.root / f"{key}.safetensors"
        version = None
        if final.exists():
            if src.immutable:
                return self._use_cached(key, src, hit)
            version = self._version(key)
            if version is None or not (version.validators or version.fixed):
                age = time.time() - final.stat().st_mtime  # mtime: when it was fetched
                if age <= c.mutable_ttl_s:
                    return self._use_cached(key, src, hit)
                logger.info(
                    "LoRA cache: %s is %.0f s old, may have changed and has no validator; fetching again",
                    src.shown,
                    age,
                )
                self._forget(key)
                version = None
        part = self.root / f"{key}.part"
        deadline = time.monotonic() + c.deadline_s
        try:
            if src.kind == "data":
                self._evict(reserve=self._cap)
                self._decode_data(src.location, part)
                url, fixed, new = "", True, Validators()
            else:
                try:
                    url, fixed = self._locate(src, part, deadline)
                    if version is not None and version.url == url and fixed:
                        return self._use_cached(key, src, hit)
                    since = version.validators if version is not None and version.url == url else None
                    new = self._get(url, part, deadline, since=since or Validators(), replacing=key)
                except Unavailable as e:
                    if version is None or not final.exists():
                        raise
                    logger.warning(
                        "LoRA cache: could not revalidate %s (%s); serving the copy fetched %.0f s ago",
                        src.shown,
                        e,
                        time.time() - final.stat().st_mtime,
                    )
                    return self._use_cached(key, src, hit)
                if new is None:  # 304: the cached copy is current
                    logger.info("LoRA cache: %s unchanged (revalidated)", src.shown)
                    return self._use_cached(key, src, hit)
            self._unpack_tar(part, src.shown)
            parsed = self._parse_file(part, src.shown)
            part.replace(final)
            if not src.immutable:
                self._record(key, url, fixed, new)
        finally:
            part.unlink(missing_ok=True)
            self._evict(keep=final)
        return parsed

    def _use_cached(self, key: str, src: Source, hit: ParsedLora | None) -> ParsedLora:
        """The cached file's LoRA: ``hit`` if it was already parsed, else read from the file."""
        final = self.root / f"{key}.safetensors"
        st = final.stat()
        os.utime(final, ns=(time.time_ns(), st.st_mtime_ns))  # atime: last use (LRU); mtime kept
        if hit is not None:
            return hit
        logger.info("LoRA file cache hit: %s (%s)", src.shown, final.name)
        try:
            return self._parse_file(final, src.shown)
        except LoraError:
            self._forget(key)  # nothing stays cached that does not parse
            raise

    def _version(self, key: str) -> _Version | None:
        """The record of ``<key>.safetensors``, if there is one and it describes that file."""
        final, record = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        try:
            d = json.loads(record.read_text())
            st = final.stat()
            v = _Version(
                str(d["url"]),
                bool(d["fixed"]),
                Validators(d.get("etag"), d.get("last_modified")),
                int(d["size"]),
                int(d["mtime_ns"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return v if (v.size, v.mtime_ns) == (st.st_size, st.st_mtime_ns) else None

    def _record(self, key: str, url: str, fixed: bool, validators: Validators) -> None:
        """Write ``<key>.json`` for the file just renamed into place (atomically, after the file:
        a crash between the two leaves the file unrecorded, so it is fetched again, never trusted)."""
        st = (self.root / f"{key}.safetensors").stat()
        record = {
            "url": url,
            "fixed": fixed,
            "etag": validators.etag,
            "last_modified": validators.last_modified,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        tmp = self.root / f"{key}.part.json"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.root / f"{key}.json")

    def _forget(self, key: str) -> None:
        """Delete a cached file and its record (the parsed copy, if any, is the caller's)."""
        (self.root / f"{key}.safetensors").unlink(missing_ok=True)
        (self.root / f"{key}.json").unlink(missing_ok=True)

    def _limits(self, deadline: float, max_bytes: int | None = None) -> DownloadLimits:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"not fetched within {self.config.deadline_s:g} s")
        return DownloadLimits(max_bytes=max_bytes or self._cap, deadline_s=left, idle_s=self.config.idle_s)

    def _headers(self, url: str) -> dict[str, str]:
        """Credentials for the hub and civitai, sent only to their own hosts."""
        netloc = urllib.parse.urlsplit(url).netloc.lower()
        c = self.config
        if c.hf_token and netloc == urllib.parse.urlsplit(c.hub).netloc.lower():
            return {"Authorization": f"Bearer {c.hf_token}"}
        if c.civitai_token and netloc == urllib.parse.urlsplit(c.civitai).netloc.lower():
            return {"Authorization": f"Bearer {c.civitai_token}"}
        return {}

    def _get(
        self,
        url: str,
        part: Path,
        deadline: float,
        max_bytes: int | None = None,
        *,
        since: Validators | None = None,
        replacing: str | None = None,
    ) -> Validators | None:
        """``url`` into ``part`` (if it changed from ``since``: None when it did not), room made
        for it when its body starts (the stale ``replacing`` file first). Unavailable when the
        failure is transient (:attr:`DownloadError.transient`), else LoraError."""
        limit = max_bytes or self._cap

        def make_room() -> None:  # in the download's worker thread, while the caller waits
            if replacing is not None:
                self._forget(replacing)
            self._evict(reserve=limit)

        try:
            return download_if_changed(
                url,
                part,
                since=since or Validators(),
                limits=self._limits(deadline, max_bytes),
                headers=self._headers(url),
                policy=self.config.egress,
                on_body=make_room,
            )
        except DownloadError as e:
            note = ""
            if "cap" in str(e) and max_bytes is None and self._cap < self.config.max_download_bytes:
                note = (
                    " (the cap is the LoRA cache bound, SVDQ_LORA_CACHE_BYTES: a LoRA must fit in the cache)"
                )
            raise (Unavailable if e.transient else LoraError)(f"{e}{note}") from None

    def _get_json(self, url: str, part: Path, deadline: float) -> object:
        try:
            self._get(url, part, deadline, _API_BYTES)
            return json.loads(part.read_bytes())
        except ValueError as e:
            raise LoraError(f"{redact(url)}: not a JSON answer ({e})") from None
        finally:
            part.unlink(missing_ok=True)

    def _locate(self, src: Source, part: Path, deadline: float) -> tuple[str, bool]:
        """The file URL ``src`` names now, and whether that URL's bytes are fixed; asks the hub or
        civitai API where the source is a repository or a model (``part`` holds their answer)."""
        c = self.config
        if src.kind == "url":
            return src.location, src.immutable
        if src.kind == "hub_repo":
            api = f"{c.hub.rstrip('/')}/api/models/{src.location}"
            if src.revision != "main":
                api += f"/revision/{urllib.parse.quote(src.revision, safe='')}"
            info = self._get_json(api, part, deadline)
            names = (
                [s.get("rfilename", "") for s in info.get("siblings", [])] if isinstance(info, dict) else []
            )
            file = choose_file(names, f"hub repository {src.location}")
            logger.info("LoRA: %s -> %s", src.shown, file)
            url = f"{c.hub.rstrip('/')}/{src.location}/resolve/{src.revision}/{urllib.parse.quote(file)}"
            return url, src.immutable
        if src.kind == "civitai_model":
            info = self._get_json(f"{c.civitai.rstrip('/')}/api/v1/models/{src.location}", part, deadline)
            url = _civitai_download_url(info, src.location)
            resolved = resolve_url(url, c.hub, c.civitai) if url.startswith("http") else None
            if resolved is None or resolved.kind != "url":
                raise LoraError(f"civitai model {src.location}: unexpected download URL {redact(url)}")
            return resolved.location, resolved.immutable
        raise LoraError(f"cannot fetch a source of kind {src.kind}")

    def _decode_data(self, url: str, part: Path) -> None:
        header, sep, payload = url.partition(",")
        if not sep:
            raise LoraError("data: URL without a ',' before its data")
        cap = self._cap
        if len(payload) * 3 // 4 > cap:
            raise LoraError(f"data: URL holds more than the download cap of {human(cap)}")
        try:
            if header.endswith(";base64"):
                data = base64.b64decode(payload, validate=True)
            else:
                data = urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise LoraError(f"data: URL is not valid base64 ({e})") from None
        part.write_bytes(data)

    def _unpack_tar(self, part: Path, shown: str) -> None:
        """Replace a .tar archive by its one .safetensors member; anything else is left as is.

        Bounded whatever the archive says: at most MAX_TAR_MEMBERS members are listed, sparse
        members are refused, and the bytes actually written are counted against the cap (a
        member's header can claim any size).
        """
        try:
            tar = tarfile.open(part, "r:")  # noqa: SIM115 - closed by the with below; plain tar only
        except tarfile.TarError:
            return
        cap = self._cap
        with tar:
            members = {}
            for i, m in enumerate(tar):
                if i >= MAX_TAR_MEMBERS:
                    raise LoraError(
                        f"{shown}: the .tar archive holds more than {MAX_TAR_MEMBERS} members; refused"
                    )
                if m.isfile():
                    members[m.name] = m
            name = choose_file(list(members), f"{shown} (a .tar archive)")
            member = members[name]
            if member.issparse():
                raise LoraError(f"{shown}: {name} is a sparse archive member; a LoRA file never is")
            if member.size > cap:
                raise LoraError(
                    f"{shown}: {name} is {human(member.size)}, over the download cap of {human(cap)}"
                )
            src = tar.extractfile(member)
            out = part.with_name(part.name + ".tarmember")
            try:
                written = 0
                with src, open(out, "wb") as f:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > cap:
                            raise LoraError(
                                f"{shown}: {name} unpacks to more than the cap of {human(cap)}; stopped"
                            )
                        f.write(chunk)
                out.replace(part)
            finally:
                out.unlink(missing_ok=True)
        logger.info("LoRA: %s is a .tar archive; using its %s", shown, name)

    def _evict(self, keep: Path | None = None, reserve: int = 0) -> None:
        """Delete least recently used files (with their records) until the folder, ``.part``
        files and records included, fits with ``reserve`` bytes to spare. A file that vanishes
        meanwhile (a cancelled download's worker may still be cleaning up) counts as gone."""
        stats = {p: st for p in self.root.iterdir() if (st := _stat(p)) is not None}
        total = sum(st.st_size for st in stats.values())
        for p in sorted(stats, key=lambda p: stats[p].st_atime):
            if total + reserve <= self.config.cache_bytes:
                break
            # <key>.part and <key>.part.tarmember are in use; a record goes with its file
            if p != keep and ".part" not in p.name and p.suffix == ".safetensors":
                record = stats.get(p.with_suffix(".json"))
                total -= stats[p].st_size + (record.st_size if record is not None else 0)
                self._forget(p.stem)
                logger.info("LoRA cache: evicted %s", p.name)

    @property
    def disk_bytes(self) -> int:
        return sum(st.st_size for p in self.root.iterdir() if (st := _stat(p)) is not None)


def _stat(p: Path) -> os.stat_result | None:
    """A regular file's stat; None for anything else or a file gone since it was listed."""
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _civitai_download_url(info: object, model: str) -> str:
    """The latest version's .safetensors file of a civitai model API answer."""
    versions = info.get("modelVersions") if isinstance(info, dict) else None
    if not versions or not isinstance(versions, list):
        raise LoraError(f"civitai model {model}: the API answer lists no versions")
    files = [f for f in versions[0].get("files", []) if isinstance(f, dict)]
    chosen = [f for f in files if str(f.get("name", "")).endswith(".safetensors")]
    if len(chosen) > 1:
        chosen = [f for f in chosen if f.get("primary")] or chosen[:1]
    if not chosen or not chosen[0].get("downloadUrl"):
        raise LoraError(f"civitai model {model}: its latest version has no .safetensors file")
    return str(chosen[0]["downloadUrl"])
