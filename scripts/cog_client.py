"""A small client for the Cog HTTP server: start it, wait for READY, predict, save outputs.

Used by the demo (scripts/demo_predict.py) and by the HTTP tests.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """``bash scripts/serve.sh PORT`` as a child process, on a free loopback port."""

    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"cog-server-{self.port}.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "serve.sh"), str(self.port)],
            env={**os.environ, **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        timeout: float = 600,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def wait_ready(self, timeout: float = 300) -> dict:
        """Poll /health-check until READY (or setup failure, or the process dying)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; log: {self.log.read_text()[-3000:]}"
                )
            try:
                _, health = self.request("GET", "/health-check", timeout=5)
                if health.get("status") in ("READY", "SETUP_FAILED", "DEFUNCT"):
                    return health
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s; log: {self.log.read_text()[-3000:]}")

    def setup_logs(self, containing: str, timeout: float = 10) -> str:
        """Setup's logs from /health-check once they contain ``containing`` (or as they are at
        ``timeout``): coglet can report READY before it has forwarded setup's last log lines."""
        deadline = time.monotonic() + timeout
        while True:
            _, health = self.request("GET", "/health-check", timeout=5)
            logs = health.get("setup", {}).get("logs", "")
            if containing in logs or time.monotonic() >= deadline:
                return logs
            time.sleep(0.1)

    def predict(self, inputs: dict, **kw) -> tuple[int, dict]:
        """POST one synchronous prediction; (HTTP status, response body).

        No retry: a client that waits for each answer before it sends the next request is never
        refused (the server has two slots and queues the second on the GPU; docs/architecture.md,
        "Back-to-back requests"). A 409 means other clients keep both slots busy.
        """
        return self.request("POST", "/predictions", {"input": inputs}, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self._log_file.close()

    def __enter__(self) -> CogServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def decode_output(item: str) -> tuple[bytes, str]:
    """A ``data:image/webp;base64,...`` output -> (bytes, extension)."""
    header, _, payload = item.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ValueError(f"not a base64 data URL: {item[:60]!r}")
    mime = header[5:].split(";")[0]
    ext = {"image/webp": "webp", "image/jpeg": "jpg", "image/png": "png"}.get(mime, mime.split("/")[-1])
    return base64.b64decode(payload), ext


def save_outputs(response: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(response["output"]):
        data, ext = decode_output(item)
        path = out_dir / f"out-{i}.{ext}"
        path.write_bytes(data)
        paths.append(path)
    return paths
