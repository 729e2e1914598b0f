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
where a later run continues from it with a ``Range`` request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

from engine.egress import AddressRefused, EgressPolicy

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the waiting caller checks for cancellation and the deadline
_CHUNK = 1 << 20
_SECRET_QUERY = re.compile(r"token|key|sig|signature|secret|password|auth|credential|expires", re.I)


class DownloadError(RuntimeError):
    """A download that failed or was refused; the message names the (redacted) URL and why."""


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
    policy: EgressPolicy | None = None,
):
    import requests

    from engine import egress

    get = requests.get if policy is None else egress.session(policy).get
    shown = redact(url)
    have = part.stat().st_size if resume and part.exists() else 0
    req_headers = {"Accept-Encoding": "identity", **headers}
    if have:
        req_headers["Range"] = f"bytes={have}-"
    with get(url, headers=req_headers, stream=True, timeout=(limits.connect_s, limits.idle_s)) as r:
        st.sock = _socket_of(r)
        if st.stop.is_set():
            return
        if r.status_code == 416 and have:  # the part file is already complete
            st.written = have
            return
        if r.status_code not in (200, 206):
            hint = " (a private or gated file needs a token)" if r.status_code in (401, 403) else ""
            raise DownloadError(f"HTTP {r.status_code} from {shown}{hint}")
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(
                f"{shown} answered with Content-Encoding {encoding!r} although identity was asked; refused"
            )
        append = r.status_code == 206
        start = have if append else 0  # a server without Range support restarts from 0
        length = r.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and start + expected > limits.max_bytes:
            raise DownloadError(
                f"{shown} is {human(start + expected)}, over the download cap of {human(limits.max_bytes)}"
            )
        written = start
        with open(part, "ab" if append else "wb") as f:
            while not st.stop.is_set():
                try:
                    chunk = r.raw.read(_CHUNK, decode_content=False)
                except Exception as e:  # urllib3/http.client errors: a dropped or shut-down connection
                    if st.stop.is_set():
                        return
                    raise DownloadError(
                        f"truncated download from {shown}: the connection ended after {human(written)} "
                        f"({type(e).__name__})"
                    ) from None
                if not chunk:
                    break
                written += len(chunk)
                if written > limits.max_bytes:
                    raise DownloadError(
                        f"{shown} sent more than the download cap of {human(limits.max_bytes)}; stopped"
                    )
                f.write(chunk)
        st.written = written
        if not st.stop.is_set() and expected is not None and written - start != expected:
            raise DownloadError(
                f"truncated download from {shown} ({human(written - start)} of {human(expected)})"
            )


def download(
    url: str,
    part: Path,
    *,
    limits: DownloadLimits,
    headers: dict[str, str] | None = None,
    resume: bool = False,
    cancel: threading.Event | None = None,
    policy: EgressPolicy | None = None,
) -> int:
    """Stream ``url`` into ``part``; returns its size in bytes. Raises :class:`DownloadError`.

    On failure, cancellation or deadline the part file is removed (kept when ``resume``; a
    later call continues it). Any exception raised in the calling thread while waiting
    (coglet's cancellation) stops the worker and is re-raised. ``policy``: which addresses may
    be connected to (engine.egress); None for the operator's own URLs (the manifest).
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"not an http(s) URL: {redact(url)}")
    part.parent.mkdir(parents=True, exist_ok=True)
    st = _State()

    def worker() -> None:
        try:
            _stream(url, part, headers or {}, limits, resume, st, policy)
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
                    f"({human(part.stat().st_size if part.exists() else 0)} received); stopped"
                )
        if st.error is not None:
            if isinstance(st.error, DownloadError):
                raise st.error
            if isinstance(st.error, AddressRefused):  # the host only: no port, no path
                raise DownloadError(f"refused: {st.error}") from None
            raise DownloadError(f"download from {redact(url)} failed: {_describe(st.error)}") from None
        ok = True
        return st.written
    finally:
        if not ok:
            _shutdown(st)
            thread.join(timeout=2.0)  # the shut-down socket wakes it; a stuck connect ends on its own
            if not resume:
                part.unlink(missing_ok=True)


def _describe(e: BaseException) -> str:
    """An exception's message without any URL in it (requests repeats the URL, credentials included)."""
    text = re.sub(r"https?://\S+", lambda m: redact(m.group(0).rstrip("')\"")), str(e))
    return f"{type(e).__name__}: {text}"[:400]
