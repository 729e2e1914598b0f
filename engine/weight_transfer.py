"""One weight file into its part file: parallel ranged chunks where the server allows, resumed
from a record of finished chunks, else one resumable stream (engine.download does the HTTP).

engine.weights decides what to fetch and verifies it; this module only moves the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from engine.download import (
    DownloadError,
    DownloadLimits,
    Remote,
    RemoteChanged,
    download,
    etag_path,
    human,
    probe,
    redact,
)

if TYPE_CHECKING:
    from engine.weights import Sources

logger = logging.getLogger(__name__)


def sidecar_path(path: Path) -> Path:
    """The hash record beside a file (size, mtime, sha256), written by engine.weights' verification."""
    return path.with_name(path.name + ".sha256.json")


def chunks_path(part: Path) -> Path:
    """The record of a chunked download's finished chunks, beside its part file."""
    return part.with_name(part.name + ".chunks.json")


def discard_partial(part: Path) -> None:
    """Remove a partial download and every record beside it (chunks, ETag, hash)."""
    for path in (part, chunks_path(part), etag_path(part), sidecar_path(part)):
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _fetch_chunks(
    url: str, part: Path, remote: Remote, headers: dict[str, str], limits: DownloadLimits, sources: Sources
) -> None:
    """``url`` into ``part`` in parallel ranged chunks, resuming the chunks a record says are done.

    The record holds the remote's ETag and size: a record of another version, or none, starts
    from zero. A chunk is recorded only after its bytes are on the disk (fsync), so a process
    killed at any point resumes with whole chunks of one version, never a splice.
    """
    chunk = sources.chunk_bytes
    key = {"etag": remote.etag, "size": remote.size, "chunk": chunk}
    record = chunks_path(part)
    done: set[int] = set()
    try:
        state = json.loads(record.read_text())
        if {k: state.get(k) for k in key} == key and part.stat().st_size == remote.size:
            done = {int(i) for i in state["done"]}
    except (OSError, ValueError, TypeError, KeyError):
        pass
    n = -(-remote.size // chunk)
    if done:
        logger.info("%s: resuming, %d of %d chunks already here", part.name, len(done), n)
    else:
        if part.exists() or record.exists():
            logger.info(
                "%s: the partial file is of another version or unrecorded; starting from zero", part.name
            )
        discard_partial(part)
        with open(part, "wb") as f:
            f.truncate(remote.size)
        _write_json(record, {**key, "done": []})
    lock = threading.Lock()

    def one(i: int) -> None:
        first, last = i * chunk, min(remote.size, (i + 1) * chunk) - 1
        chunk_limits = dataclasses.replace(limits, max_bytes=last - first + 1)
        download(
            url, part, limits=chunk_limits, headers=headers, byte_range=(first, last), if_range=remote.etag
        )
        with lock:
            done.add(i)
            _write_json(record, {**key, "done": sorted(done)})

    with ThreadPoolExecutor(max_workers=sources.chunk_workers) as pool:
        futures = [pool.submit(one, i) for i in range(n) if i not in done]
        errors = [e for f in futures if (e := f.exception()) is not None]
    if errors:
        raise next((e for e in errors if isinstance(e, RemoteChanged)), errors[0])
    record.unlink()


def transfer(
    url: str, part: Path, headers: dict[str, str], limits: DownloadLimits, sources: Sources
) -> None:
    """One file into ``part``: parallel chunks where the server allows, else one resumable stream."""
    for attempt in range(2):
        try:
            remote = probe(url, limits=limits, headers=headers)
        except DownloadError as e:
            if e.status in (401, 403, 404):
                raise
            remote = None  # HEAD not served (or failed): one stream, whose GET says what is wrong
        if not (
            remote and remote.size and remote.etag and remote.ranges and remote.size > sources.chunk_bytes
        ):
            if chunks_path(part).exists():  # a chunked partial: not continuable as one stream
                discard_partial(part)
            download(url, part, limits=limits, headers=headers, resume=True)
            return
        if remote.size > limits.max_bytes:
            raise DownloadError(
                f"{redact(url)} is {human(remote.size)}, over the cap of {human(limits.max_bytes)}"
            )
        try:
            _fetch_chunks(url, part, remote, headers, limits, sources)
            return
        except RemoteChanged:
            if attempt:
                raise
            logger.warning("%s changed during the download; starting again from zero", redact(url))
            discard_partial(part)

