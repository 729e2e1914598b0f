"""HTTP downloads that hold under hostile servers: size cap, identity encoding, deadline, cancel.

One function, :func:`download`, used for LoRAs and for the manifest's URL entries. What it
guarantees, whatever the server does:

- at most ``limits.max_bytes`` reach the disk (refused up front when ``Content-Length`` says
  more, stopped while streaming otherwise: a response that streams without end is cut at the cap);
- bytes are written as sent (``Accept-Encoding: identity``; a response with any other
  ``Content-Encoding`` is refused, so 1 MB of gzip never becomes 1 GiB on disk);
- it returns or raises within ``limits.deadline_s`` (plus about a second), and a server that
  sends nothing for ``limits.idle_s`` is dropped;
- it stops within about ``POLL_S`` of being cancelled, either through ``cancel`` or by an
  exception raised asynchronously in the calling thread, which is how coglet cancels a
  prediction (``PyThreadState_SetAsyncExc``: delivered only while Python bytecode runs, never
  inside a blocking ``recv``). The network I/O therefore runs in a worker thread while the
  caller waits in short slices; on cancel or deadline the worker's socket is shut down, which
  wakes its ``recv`` at once;
- credentials never reach a log line or an error message (:func:`redact`);
- with a ``policy`` (engine.egress; the LoRA store always passes one), every connection,
  redirect hops included, goes only to a checked public (or allow-listed) address, and a
  refusal says only that the host is not public.

The partial file is removed on failure unless ``resume`` is set (the manifest's large files,
where a later run continues from it with a ``Range`` request). A partial file is continued only
when the remote is provably the one it came from: the response's strong ``ETag`` is kept beside
it (``<part>.etag``) and the continuation asks ``Range`` with ``If-Range: <etag>``; a server whose
file changed answers 200 with the whole new file, which is then written from byte 0. A partial
without a recorded ETag, or a 206 that does not start where the partial ends, starts again from
zero: bytes of two versions are never spliced. ``byte_range`` fetches one range of a file into
its place in a preallocated ``part`` (the manifest's parallel chunks, engine.weights), and a
remote whose ETag no longer matches is :class:`RemoteChanged`. :func:`probe` asks a file's size
and ETag with ``HEAD``. :func:`download_if_changed` is the conditional GET of a cached file
(``If-None-Match``, else ``If-Modified-Since``): nothing is written when the server answers 304,
or 200 with the same strong ETag (a server that ignores the condition but names the version).
A :class:`DownloadError` says whether it is ``transient`` (the server was not reached in time,
its address was refused, the connection broke, or it answered 500/502/503/504: the failures
after which RFC 5861's stale-if-error lets a cache serve what it has).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from engine.egress import AddressRefused, EgressPolicy

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the waiting caller checks for cancellation and the deadline
_CHUNK = 1 << 20
_SECRET_QUERY = re.compile(r"token|key|sig|signature|secret|password|auth|credential|expires", re.I)


class DownloadError(RuntimeError):
    """A download that failed or was refused; the message names the (redacted) URL and why.

    ``status``: the HTTP status that refused it, where one did (401/403: a token is needed).
    ``transient``: the failure says nothing about the file (no answer in time, a refused
    address, a broken connection, or 500/502/503/504).
    """

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient or status in _TRANSIENT_STATUS


_TRANSIENT_STATUS = (500, 502, 503, 504)  # RFC 5861, stale-if-error's "error"


class RemoteChanged(DownloadError):
    """The remote's ETag is no longer the one a partial download or a range was started from."""


@dataclasses.dataclass(frozen=True)
class Remote:
    """What ``HEAD`` says of a file: its size, strong ETag (None if weak or absent), ranges."""

    size: int | None
    etag: str | None
    ranges: bool


@dataclasses.dataclass(frozen=True)
class Validators:
    """What names one version of a remote file (RFC 9110, 8.8): its strong ETag and its
    Last-Modified date, as the server sent them; either may be None."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def conditions(self) -> dict[str, str]:
        """The request headers that ask for the file only if it changed: ``If-None-Match``, or
        ``If-Modified-Since`` when there is no ETag (a server ignores the date when both come)."""
        if self.etag:
            return {"If-None-Match": self.etag}
        return {"If-Modified-Since": self.last_modified} if self.last_modified else {}


def etag_path(part: Path) -> Path:
    """Where the ETag of the remote a resumable partial file came from is kept."""
    return part.with_name(part.name + ".etag")


def strong_etag(value: str | None) -> str | None:
    """An ETag usable with If-Range (RFC 9110: strong only); None for a weak or missing one."""
    value = (value or "").strip()
    return value if value.startswith('"') and value.endswith('"') and len(value) >= 2 else None


@dataclasses.dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int  # cap on what reaches the disk
    deadline_s: float = 600.0  # the whole download, redirects included
    idle_s: float = 30.0  # longest wait for the next bytes
    connect_s: float = 10.0


def redact(url: str) -> str:
    """``url`` without its password or user name and with credential-like query values hidden."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.scheme == "data":
        return url[: url.find(",") + 1] + "..." if "," in url else "data:..."
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username or parts.password:
        netloc = "***@" + netloc
    query = urllib.parse.urlencode(
        [
            (k, "***" if _SECRET_QUERY.search(k) else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclasses.dataclass
class _State:
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    sock: socket.socket | None = None
    error: BaseException | None = None
    written: int = 0
    not_modified: bool = False  # a conditional request answered "unchanged"
    validators: Validators = dataclasses.field(default_factory=Validators)  # of what was written


def _socket_of(response) -> socket.socket | None:
    """The socket under a streaming ``requests`` response (urllib3 2.x), to shut it down."""
    try:
        return response.raw._fp.fp.raw._sock
    except AttributeError:
        return None


def _shutdown(state: _State) -> None:
    state.stop.set()
    if state.sock is not None:
        with contextlib.suppress(OSError):
            state.sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in the worker


def _stream(
    url: str,
    part: Path,
    headers: dict[str, str],
    limits: DownloadLimits,
    resume: bool,
    st: _State,
    byte_range: tuple[int, int] | None = None,
    if_range: str | None = None,
    policy: EgressPolicy | None = None,
    since: Validators | None = None,
    on_body: Callable[[], None] | None = None,
):
    import requests

    from engine import egress

    get = requests.get if policy is None else egress.session(policy).get
    shown = redact(url)
    have = part.stat().st_size if resume and part.exists() else 0
    etag = _read_etag(part) if have else None
    if have and etag is None:
        logger.info("%s: %s of a partial file with no recorded ETag; starting from zero", shown, human(have))
        have = 0
    req_headers = {"Accept-Encoding": "identity", **headers}
    if byte_range is not None:
        req_headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        if if_range:
            req_headers["If-Range"] = if_range
    elif have:
        req_headers["Range"] = f"bytes={have}-"
        req_headers["If-Range"] = etag
    elif since:
        req_headers.update(since.conditions())
    with get(url, headers=req_headers, stream=True, timeout=(limits.connect_s, limits.idle_s)) as r:
        st.sock = _socket_of(r)
        if st.stop.is_set():
            return
        if since and r.status_code == 304:
            st.not_modified = True
            return
        total = _content_range(r.headers.get("Content-Range"))
        if byte_range is None and r.status_code == 416 and have and total == (None, None, have):
            st.written = have  # If-Range held (else a 200) and the partial is the whole file
            return
        if r.status_code not in (200, 206):
            hint = " (a private or gated file needs a token)" if r.status_code in (401, 403) else ""
            raise DownloadError(f"HTTP {r.status_code} from {shown}{hint}", status=r.status_code)
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(
                f"{shown} answered with Content-Encoding {encoding!r} although identity was asked; refused"
            )
        st.validators = Validators(strong_etag(r.headers.get("ETag")), r.headers.get("Last-Modified"))
        if since and since.etag and st.validators.etag == since.etag and r.status_code == 200:
            st.not_modified = True  # the condition ignored, but the same version named: body unread
            return
        if byte_range is not None:
            if r.status_code != 206 or total[:2] != byte_range:
                raise RemoteChanged(
                    f"{shown} answered bytes {byte_range[0]}-{byte_range[1]} with HTTP {r.status_code} "
                    f"{r.headers.get('Content-Range', '')!s}: the file changed since its ETag {if_range} was read"
                )
            start, mode = byte_range[0], "r+b"
        else:
            append = r.status_code == 206 and have and total[0] == have
            if have and not append:
                logger.info("%s changed or cannot resume (HTTP %d): starting from zero", shown, r.status_code)
            start, mode = (have, "ab") if append else (0, "wb")
            new_etag = strong_etag(r.headers.get("ETag"))
            if not append:  # a new body: remember which version it is, or that it is unknown
                etag_path(part).unlink(missing_ok=True)
                if resume and new_etag:
                    etag_path(part).write_text(new_etag)
        length = r.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        base = 0 if byte_range is not None else start  # the cap applies to what this call writes
        if expected is not None and base + expected > limits.max_bytes:
            raise DownloadError(
                f"{shown} is {human(base + expected)}, over the download cap of {human(limits.max_bytes)}"
            )
        written = start
        if on_body is not None:
            on_body()
        with open(part, mode) as f:
            if byte_range is not None:
                f.seek(start)
            while not st.stop.is_set():
                try:
                    chunk = r.raw.read(_CHUNK, decode_content=False)
                except Exception as e:  # urllib3/http.client errors: a dropped or shut-down connection
                    if st.stop.is_set():
                        return
                    raise DownloadError(
                        f"truncated download from {shown}: the connection ended after {human(written)} "
                        f"({type(e).__name__})",
                        transient=True,
                    ) from None
                if not chunk:
                    break
                written += len(chunk)
                if written - start + base > limits.max_bytes:
                    raise DownloadError(
                        f"{shown} sent more than the download cap of {human(limits.max_bytes)}; stopped"
                    )
                f.write(chunk)
            if byte_range is not None:  # a chunk counts as done only once it is on the disk
                f.flush()
                os.fsync(f.fileno())
        st.written = written
        if not st.stop.is_set() and expected is not None and written - start != expected:
            raise DownloadError(
                f"truncated download from {shown} ({human(written - start)} of {human(expected)})",
                transient=True,
            )


def _read_etag(part: Path) -> str | None:
    try:
        return strong_etag(etag_path(part).read_text())
    except OSError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/n`` -> (a, b, n); ``bytes */n`` -> (None, None, n); anything else -> Nones."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    a, b, n = m.groups()
    return (int(a) if a else None, int(b) if b else None, int(n) if n and n != "*" else None)


def probe(
    url: str,
    *,
    limits: DownloadLimits,
    headers: dict[str, str] | None = None,
    policy: EgressPolicy | None = None,
) -> Remote:
    """``HEAD`` the file (redirects followed): its size, strong ETag and whether it serves ranges.
    ``policy`` as for :func:`download`."""
    import requests

    from engine import egress

    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"not an http(s) URL: {redact(url)}")
    try:
        head = requests.head if policy is None else egress.session(policy).head
        r = head(
            url,
            headers={"Accept-Encoding": "identity", **(headers or {})},
            allow_redirects=True,
            timeout=(limits.connect_s, limits.idle_s),
        )
    except AddressRefused as e:  # the host only: no port, no path
        raise DownloadError(f"refused: {e}") from None
    except requests.RequestException as e:
        raise DownloadError(f"HEAD {redact(url)} failed: {_describe(e)}") from None
    if r.status_code != 200:
        hint = " (a private or gated file needs a token)" if r.status_code in (401, 403) else ""
        raise DownloadError(f"HTTP {r.status_code} from {redact(url)}{hint}", status=r.status_code)
    length = r.headers.get("Content-Length", "")
    return Remote(
        size=int(length) if length.isdigit() else None,
        etag=strong_etag(r.headers.get("ETag")),
        ranges=r.headers.get("Accept-Ranges", "").strip().lower() == "bytes",
    )


def download(
    url: str,
    part: Path,
    *,
    limits: DownloadLimits,
    headers: dict[str, str] | None = None,
    resume: bool = False,
    cancel: threading.Event | None = None,
    byte_range: tuple[int, int] | None = None,
    if_range: str | None = None,
    policy: EgressPolicy | None = None,
) -> int:
    """Stream ``url`` into ``part``; returns its size in bytes. Raises :class:`DownloadError`.

    On failure, cancellation or deadline the part file is removed (kept when ``resume``; a
    later call continues it if its ETag still matches). Any exception raised in the calling
    thread while waiting (coglet's cancellation) stops the worker and is re-raised.
    ``byte_range=(first, last)``: only those bytes (inclusive), written at their offset into
    the existing ``part`` (kept on failure: it belongs to the caller), guarded by ``if_range``.
    ``policy``: which addresses may be connected to (engine.egress); None for the operator's own
    URLs (the manifest).
    """
    st = _run(url, part, limits, headers, resume, cancel, byte_range, if_range, policy)
    return st.written


def download_if_changed(
    url: str,
    part: Path,
    *,
    since: Validators,
    limits: DownloadLimits,
    headers: dict[str, str] | None = None,
    cancel: threading.Event | None = None,
    policy: EgressPolicy | None = None,
    on_body: Callable[[], None] | None = None,
) -> Validators | None:
    """The conditional GET of a cached file: None when the remote is still the version ``since``
    names (304, or 200 with the same strong ETag; nothing written), else the file is written to
    ``part`` as :func:`download` does and its validators are returned (empty if the server sent
    none). An empty ``since`` asks unconditionally. ``on_body`` is called once the answer is known
    to be a new body, just before its first byte is written (the caller makes room for it).
    """
    st = _run(url, part, limits, headers, False, cancel, None, None, policy, since or None, on_body)
    return None if st.not_modified else st.validators


def _run(
    url: str,
    part: Path,
    limits: DownloadLimits,
    headers: dict[str, str] | None,
    resume: bool,
    cancel: threading.Event | None,
    byte_range: tuple[int, int] | None,
    if_range: str | None,
    policy: EgressPolicy | None,
    since: Validators | None = None,
    on_body: Callable[[], None] | None = None,
) -> _State:
    """:func:`download`'s body: the worker thread, the waiting in slices, the cleanup."""
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"not an http(s) URL: {redact(url)}")
    part.parent.mkdir(parents=True, exist_ok=True)
    st = _State()

    def worker() -> None:
        try:
            _stream(
                url, part, headers or {}, limits, resume, st, byte_range, if_range, policy, since, on_body
            )
        except BaseException as e:  # handed to the waiting caller
            st.error = e
        finally:
            st.done.set()

    thread = threading.Thread(target=worker, name="download", daemon=True)
    deadline = time.monotonic() + limits.deadline_s
    ok = False
    try:
        thread.start()
        while not st.done.wait(POLL_S):
            if cancel is not None and cancel.is_set():
                raise DownloadError(f"download of {redact(url)} cancelled")
            if time.monotonic() > deadline:
                raise DownloadError(
                    f"download of {redact(url)} did not finish within {limits.deadline_s:g} s "
                    f"({human(part.stat().st_size if part.exists() else 0)} received); stopped",
                    transient=True,
                )
        if st.error is not None:
            if isinstance(st.error, DownloadError):
                raise st.error
            if isinstance(st.error, AddressRefused):  # the host only: no port, no path
                raise DownloadError(f"refused: {st.error}", transient=True) from None
            raise DownloadError(
                f"download from {redact(url)} failed: {_describe(st.error)}", transient=True
            ) from None
        ok = True
        if byte_range is None:
            etag_path(part).unlink(missing_ok=True)  # complete: nothing left to resume
        return st
    finally:
        if not ok:
            _shutdown(st)
            thread.join(timeout=2.0)  # the shut-down socket wakes it; a stuck connect ends on its own
            if not resume and byte_range is None:
                part.unlink(missing_ok=True)
                etag_path(part).unlink(missing_ok=True)


def _describe(e: BaseException) -> str:
    """An exception's message without any URL in it (requests repeats the URL, credentials included)."""
    text = re.sub(r"https?://\S+", lambda m: redact(m.group(0).rstrip("')\"")), str(e))
    # urllib3 names the request target alone: "Max retries exceeded with url: /path?token=..."
    text = re.sub(
        r"(url: )(/\S*)", lambda m: m.group(1) + redact("http://h" + m.group(2))[len("http://h") :], text
    )
    return f"{type(e).__name__}: {text}"[:400]
