"""The three ways a deployment reaches its weights, against loopback stand-ins only.

* a stand-in hub that answers 401 for a gated repository's files without a token, 403 for a
  token it refuses, and with the right token redirects to a stand-in CDN on another port (which
  must never see the token);
* a mirror (a base URL serving every manifest path) fetched in parallel ranged chunks with
  ``If-Range``: a resume after a failure, a remote whose ETag changed (restart from zero, never
  a splice), and a process killed with SIGKILL mid-download and restarted;
* the staging folders the hub client used to leave behind are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.weight_transfer import chunks_path
from engine.weights import Sources, WeightFile, WeightsError, ensure_files, remove_stale_staging

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
V1 = hashlib.sha256(b"v1").digest() * (32 * KIB)  # 1 MiB
V2 = hashlib.sha256(b"v2").digest() * (32 * KIB)


class StandIn:
    """A threaded loopback HTTP server over ``files`` ({path: (bytes, etag)}), recording requests.

    Implements HEAD, single ranges (``bytes=a-b``, ``bytes=a-``), ``If-Range`` (a mismatch
    gets the whole file with 200), ``Accept-Ranges``; optional gating and redirects for the hub.
    """

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[dict] = []
        self.gated: set[str] = set()  # path prefixes needing "Bearer good"
        self.redirect: str | None = None  # base URL that authorized hub paths redirect to
        self.delay_s = 0.0  # per 16 KiB sent: slow enough to kill a client midway
        self.fail_ranges_from: int | None = None  # 500 for ranges starting at or after this byte
        self.after_range = None  # called after each ranged response was sent
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                outer.serve(self, body=False)

            def do_GET(self):
                outer.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        auth = h.headers.get("Authorization")
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        with self.lock:
            self.requests.append({"method": h.command, "path": h.path, "range": rng, "auth": auth})
        if any(h.path.startswith(g) for g in self.gated):
            if auth is None or auth != "Bearer good":
                h.send_response(401 if auth is None else 403)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            if self.redirect:
                h.send_response(302)
                h.send_header("Location", self.redirect + "/cdn" + h.path)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        path = h.path.removeprefix("/cdn")
        if path not in self.files:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data, etag = self.files[path]
        start, end = 0, len(data) - 1
        partial = rng is not None and (if_range is None or if_range == etag)
        if partial:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            if self.fail_ranges_from is not None and start >= self.fail_ranges_from:
                h.send_response(500)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        h.send_response(206 if partial else 200)
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        h.end_headers()
        if not body:
            return
        payload = data[start : end + 1]
        try:
            for i in range(0, len(payload), 16 * KIB):
                if self.delay_s:
                    time.sleep(self.delay_s)
                h.wfile.write(payload[i : i + 16 * KIB])
        except (BrokenPipeError, ConnectionResetError):
            pass
        if partial and self.after_range is not None:
            self.after_range()

    def ranges(self) -> list[int]:
        return sorted(int(r["range"].split("=")[1].split("-")[0]) for r in self.requests if r["range"])

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def server():
    s = StandIn()
    yield s
    s.close()


@pytest.fixture()
def cdn():
    s = StandIn()
    yield s
    s.close()


def leftovers(root: Path) -> list[str]:
    """Every partial download's file under ``root`` (part, chunk record, ETag, temporary, staging)."""
    partial = (".part", ".chunks.json", ".etag", ".tmp", ".incomplete")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(partial))


def hub_entry(
    path: str, repo: str = "black-forest-labs/FLUX.1-schnell", sha: bytes | None = None
) -> WeightFile:
    return WeightFile(path=path, hub=repo, file=path, sha256=hashlib.sha256(sha).hexdigest() if sha else None)


# --- (a) the hub, gated -------------------------------------------------------------------------
def test_gated_hub_without_a_token_names_the_repository_and_the_ways_out(server, tmp_path):
    server.files["/open/repo/resolve/main/free.bin"] = (V1, '"a"')
    server.gated = {"/black-forest-labs/FLUX.1-schnell/"}
    entries = [
        hub_entry("vae/x.bin"),
        hub_entry("text_encoder/y.bin"),
        hub_entry("free.bin", repo="open/repo"),
    ]
    with pytest.raises(WeightsError) as err:
        ensure_files(entries, tmp_path, sources=Sources(hub=server.url))
    msg = str(err.value)
    assert "2 files (vae/x.bin, text_encoder/y.bin) are refused" in msg
    assert "black-forest-labs/FLUX.1-schnell is a gated repository" in msg and "HF_TOKEN is unset" in msg
    for way_out in ("set HF_TOKEN", "SVDQ_WEIGHTS_URL", "scripts/bake_weights.py"):
        assert way_out in msg
    assert (tmp_path / "free.bin").read_bytes() == V1  # the open repository's file came
    assert leftovers(tmp_path) == []


def test_gated_hub_with_a_refused_token_says_so(server, tmp_path):
    server.gated = {"/black-forest-labs/"}
    with pytest.raises(WeightsError, match=r"the token in HF_TOKEN was refused \(HTTP 403\)"):
        ensure_files([hub_entry("vae/x.bin")], tmp_path, sources=Sources(hub=server.url, hf_token="wrong"))
    assert leftovers(tmp_path) == []


def test_gated_hub_with_the_token_serves_and_the_cdn_never_sees_it(server, cdn, tmp_path):
    server.gated, server.redirect = {"/black-forest-labs/"}, cdn.url
    cdn.files["/black-forest-labs/FLUX.1-schnell/resolve/main/vae/x.bin"] = (V1, '"v1"')
    sources = Sources(hub=server.url, hf_token="good", chunk_bytes=256 * KIB)
    ensure_files([hub_entry("vae/x.bin", sha=V1)], tmp_path, sources=sources)
    assert (tmp_path / "vae" / "x.bin").read_bytes() == V1 and leftovers(tmp_path) == []
    assert all(r["auth"] == "Bearer good" for r in server.requests)
    assert cdn.requests and all(r["auth"] is None for r in cdn.requests)
    assert cdn.ranges() == [0, 256 * KIB, 512 * KIB, 768 * KIB]  # ranged chunks through the redirect


# --- (b) a mirror ----------------------------------------------------------------------------
def mirror_entry(sha: bytes | None = V1) -> WeightFile:
    # the manifest's own source is the gated hub; the mirror replaces every source
    return hub_entry("text_encoder_2/model.bin", sha=sha)


def test_mirror_serves_every_entry_in_parallel_chunks(server, tmp_path):
    server.files["/bucket/text_encoder_2/model.bin"] = (V1, '"v1"')
    server.files["/bucket/small.json"] = (b"{}", '"s"')
    sources = Sources(mirror=server.url + "/bucket/", chunk_bytes=64 * KIB, chunk_workers=4)
    small = WeightFile(path="small.json", url="https://example.invalid/never-used", sha256=None)
    ensure_files([mirror_entry(), small], tmp_path, sources=sources)
    assert (tmp_path / "text_encoder_2" / "model.bin").read_bytes() == V1
    assert (tmp_path / "small.json").read_bytes() == b"{}"
    assert server.ranges() == [i * 64 * KIB for i in range(16)]
    assert all(r["auth"] is None for r in server.requests)  # no token goes to a mirror
    assert leftovers(tmp_path) == []


def test_mirror_resumes_the_chunks_it_has(server, tmp_path):
    server.files["/m/text_encoder_2/model.bin"] = (V1, '"v1"')
    server.fail_ranges_from = 512 * KIB
    sources = Sources(mirror=server.url + "/m", chunk_bytes=128 * KIB, chunk_workers=2)
    with pytest.raises(WeightsError, match=r"HTTP 500 .* run again to resume"):
        ensure_files([mirror_entry()], tmp_path, sources=sources)
    part = tmp_path / "text_encoder_2" / "model.bin.part"
    assert json.loads(chunks_path(part).read_text())["done"] == [0, 1, 2, 3]
    server.fail_ranges_from, server.requests = None, []
    ensure_files([mirror_entry()], tmp_path, sources=sources)
    assert server.ranges() == [512 * KIB, 640 * KIB, 768 * KIB, 896 * KIB]  # only the missing chunks
    assert (tmp_path / "text_encoder_2" / "model.bin").read_bytes() == V1 and leftovers(tmp_path) == []


def test_mirror_file_changed_between_runs_restarts_from_zero(server, tmp_path):
    server.files["/m/text_encoder_2/model.bin"] = (V1, '"v1"')
    server.fail_ranges_from = 512 * KIB
    sources = Sources(mirror=server.url + "/m", chunk_bytes=128 * KIB, chunk_workers=2)
    with pytest.raises(WeightsError):
        ensure_files([mirror_entry(sha=None)], tmp_path, sources=sources)
    server.files["/m/text_encoder_2/model.bin"] = (V2, '"v2"')  # the bucket's file replaced
    server.fail_ranges_from, server.requests = None, []
    ensure_files([mirror_entry(sha=None)], tmp_path, sources=sources)
    assert server.ranges() == [i * 128 * KIB for i in range(8)]  # every chunk again
    assert (tmp_path / "text_encoder_2" / "model.bin").read_bytes() == V2 and leftovers(tmp_path) == []


def test_mirror_file_changed_midway_is_never_spliced(server, tmp_path, caplog):
    """The file changes after two chunks were served: If-Range makes the server answer the next
    chunks with the whole new file (200), which a ranged request refuses; the download restarts
    from zero on the new ETag."""
    path = "/m/text_encoder_2/model.bin"
    server.files[path] = (V1, '"v1"')

    def swap() -> None:
        if len([r for r in server.requests if r["range"]]) == 2:
            server.files[path] = (V2, '"v2"')

    server.after_range = swap
    sources = Sources(mirror=server.url + "/m", chunk_bytes=64 * KIB, chunk_workers=1)
    ensure_files([mirror_entry(sha=V2)], tmp_path, sources=sources)  # V2's hash: nothing of V1 inside
    assert "changed during the download; starting again from zero" in caplog.text
    assert server.ranges().count(0) == 2  # chunk 0 fetched twice: once per version
    assert (tmp_path / "text_encoder_2" / "model.bin").read_bytes() == V2 and leftovers(tmp_path) == []


_KILLED_CHILD = """
import sys
from pathlib import Path
from engine.weights import Sources, WeightFile, ensure_files
entry = WeightFile(path="text_encoder_2/model.bin", hub="black-forest-labs/FLUX.1-schnell",
                   file="text_encoder_2/model.bin", sha256=sys.argv[3])
ensure_files([entry], Path(sys.argv[2]), sources=Sources(mirror=sys.argv[1], chunk_bytes=64 * 1024, chunk_workers=2))
"""


def test_killed_mid_download_resumes_with_nothing_spliced_or_left_behind(server, tmp_path):
    server.files["/m/text_encoder_2/model.bin"] = (V1, '"v1"')
    server.delay_s = 0.05  # 0.2 s a chunk: the child is killed with whole chunks on disk and some in flight
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_CHILD,
            server.url + "/m",
            str(tmp_path),
            hashlib.sha256(V1).hexdigest(),
        ],
        env=env,
    )
    record = chunks_path(tmp_path / "text_encoder_2" / "model.bin.part")
    done: list[int] = []
    deadline = time.monotonic() + 60
    while len(done) < 3 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
        with contextlib.suppress(OSError, ValueError):
            done = json.loads(record.read_text())["done"]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert 3 <= len(done) < 16, f"the child was not killed midway (done: {done})"
    done = json.loads(record.read_text())["done"]  # what it had recorded when it died
    in_flight = {r["range"] for r in server.requests} - {
        f"bytes={i * 64 * KIB}-{(i + 1) * 64 * KIB - 1}" for i in done
    }
    assert in_flight, "no chunk was in flight at the kill"
    server.delay_s, server.requests = 0.0, []
    ensure_files([mirror_entry()], tmp_path, sources=Sources(mirror=server.url + "/m", chunk_bytes=64 * KIB))
    assert server.ranges() == [i * 64 * KIB for i in range(16) if i not in done]
    assert (tmp_path / "text_encoder_2" / "model.bin").read_bytes() == V1  # and its sha256 matched
    assert leftovers(tmp_path) == []


# --- the hub client's leftovers ----------------------------------------------------------------
def test_stale_hub_staging_folders_are_removed(tmp_path):
    stale = tmp_path / "vae" / "tmpab12cd_9" / ".cache" / "huggingface" / "download"
    stale.mkdir(parents=True)
    (stale / "x.incomplete").write_bytes(b"\0" * 100)
    mine = tmp_path / "vae" / "tmp_keep_me"  # not the hub client's: left alone
    mine.mkdir()
    remove_stale_staging(tmp_path)
    assert not (tmp_path / "vae" / "tmpab12cd_9").exists() and mine.exists()


# --- (c) baked into the image, and the mirror's converted transformer ------------------------
def _serve_manifest(server: StandIn, tiny_model_dir: Path, converted: bool = False) -> None:
    """Every flux-schnell manifest path under /bucket (small stand-ins; the transformer is the
    tiny model's checkpoint, our format), and with ``converted`` also /bucket/converted/<it>."""
    import torch
    from safetensors.torch import save

    from engine.tiny_model import CHECKPOINT_NAME
    from engine.weights import load_manifest, transformer_file

    tensor_file = save({"w": torch.zeros(4)})
    ours = (tiny_model_dir / CHECKPOINT_NAME).read_bytes()
    for entry in load_manifest("flux-schnell"):
        if entry.path == transformer_file("flux-schnell"):
            data = ours
            if converted:
                server.files[f"/bucket/converted/{entry.path}"] = (ours, '"conv"')
        else:
            data = tensor_file if entry.path.endswith(".safetensors") else b"{}"
        server.files[f"/bucket/{entry.path}"] = (data, f'"{hashlib.sha256(data).hexdigest()[:8]}"')


def test_baked_weights_are_used_with_no_network(server, tmp_path, tiny_model_dir, caplog):
    """scripts/bake_weights.py fills weights/baked/<model> from a mirror (every manifest path);
    setup's model_files then serves from it offline, checked by size, downloading nothing."""
    import logging

    sys.path.insert(0, str(ROOT / "scripts"))
    from bake_weights import bake

    from engine.service.config import ServiceConfig
    from engine.service.models import model_files
    from engine.tiny_model import CHECKPOINT_NAME

    _serve_manifest(server, tiny_model_dir)
    baked = tmp_path / "baked"
    bake("flux-schnell", baked, Sources(mirror=server.url + "/bucket"))
    assert len(server.requests) >= len(server.files) and leftovers(baked) == []
    server.requests.clear()
    caplog.set_level(logging.INFO, logger="engine")
    config = ServiceConfig(weights_dir=tmp_path / "cache", baked_dir=baked, offline=True)
    root, checkpoint = model_files("flux-schnell", config)
    assert root == baked / "flux-schnell"
    assert checkpoint.read_bytes() == (tiny_model_dir / CHECKPOINT_NAME).read_bytes()
    assert server.requests == [] and not (tmp_path / "cache" / "flux-schnell").exists()
    assert "baked into the image" in caplog.text


def test_mirror_with_a_converted_transformer_skips_the_published_one(server, tmp_path, tiny_model_dir):
    from engine.service.config import ServiceConfig
    from engine.service.models import model_files
    from engine.weights import transformer_file

    _serve_manifest(server, tiny_model_dir, converted=True)
    sources = Sources(mirror=server.url + "/bucket")
    config = ServiceConfig(weights_dir=tmp_path / "cache", baked_dir=tmp_path / "none", sources=sources)
    root, checkpoint = model_files("flux-schnell", config)
    published = transformer_file("flux-schnell")
    assert checkpoint == root / "converted" / published
    assert not any(r["path"] == f"/bucket/{published}" for r in server.requests)  # never downloaded
    assert leftovers(root) == []
