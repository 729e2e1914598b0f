"""Manifest downloads against a local HTTP server: resume, sha256, truncation, offline, atomicity."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from engine.download import etag_path
from engine.weights import WeightFile, WeightsError, ensure_files, load_manifest, transformer_file

BLOB = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BLOB).hexdigest()
ETAG = '"v1"'


class _Files(BaseHTTPRequestHandler):
    truncate = False
    ranges: ClassVar[list] = []

    def do_GET(self):
        if self.path == "/endless.bin":  # no Content-Length, no end
            self.send_response(200)
            self.end_headers()
            while True:
                self.wfile.write(b"\0" * 65536)
        if self.path == "/gzip.bin":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 8)
            return
        data = BLOB
        start = 0
        rng = self.headers.get("Range")
        if rng and self.headers.get("If-Range", ETAG) == ETAG:  # RFC 9110: If-Range or the whole file
            start = int(rng.split("=")[1].split("-")[0])
            self.ranges.append(start)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("ETag", ETAG)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.truncate else body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def http():
    _Files.truncate, _Files.ranges = False, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def entry(url, **kw):
    return WeightFile(
        path=kw.pop("path", "sub/blob.bin"), url=f"{url}/blob.bin", sha256=kw.pop("sha256", SHA), **kw
    )


def test_download_verify_and_reuse(http, tmp_path):
    ensure_files([entry(http), entry(http, path="other.bin")], tmp_path)
    assert (tmp_path / "sub" / "blob.bin").read_bytes() == BLOB and (tmp_path / "other.bin").exists()
    assert not list(tmp_path.rglob("*.part"))
    ensure_files([entry(http)], tmp_path, offline=True)  # present and verified: no network needed


@pytest.mark.parametrize("etag,resumed", [(ETAG, [300_000]), (None, []), ('"v0"', [])])
def test_resume_from_part_file_only_with_its_etag(http, tmp_path, etag, resumed):
    """A partial continues only when its recorded ETag still names the remote (If-Range)."""
    part = tmp_path / "sub" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BLOB[:300_000] if etag == ETAG else b"x" * 300_000)  # another version's bytes
    if etag:
        etag_path(part).write_text(etag)
    ensure_files([entry(http)], tmp_path)
    assert _Files.ranges == resumed and (tmp_path / "sub" / "blob.bin").read_bytes() == BLOB
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["blob.bin", "blob.bin.sha256.json"]


def test_wrong_checksum_names_the_file_and_leaves_nothing(http, tmp_path):
    with pytest.raises(WeightsError, match=r"sub/blob\.bin: sha256 .* does not match"):
        ensure_files([entry(http, sha256="0" * 64)], tmp_path)
    assert not (tmp_path / "sub" / "blob.bin").exists() and not list(tmp_path.rglob("*.part"))


def test_truncated_download_is_an_error(http, tmp_path):
    _Files.truncate = True
    with pytest.raises(WeightsError, match=r"sub/blob\.bin: truncated download"):
        ensure_files([entry(http)], tmp_path)
    assert not (tmp_path / "sub" / "blob.bin").exists()


def test_corrupt_cached_file_is_caught(http, tmp_path):
    ensure_files([entry(http)], tmp_path)
    (tmp_path / "sub" / "blob.bin").write_bytes(b"x" * len(BLOB))
    with pytest.raises(WeightsError, match=r"sub/blob\.bin: sha256 .* no longer matches .* delete it"):
        ensure_files([entry(http)], tmp_path)


def test_unpinned_file_that_changed_is_an_error_never_re_recorded(http, tmp_path):
    """sha256 null: trusted on first download, and the recorded hash is kept from then on."""
    unpinned = entry(http, sha256=None)
    ensure_files([unpinned], tmp_path)
    side = tmp_path / "sub" / "blob.bin.sha256.json"
    recorded = json.loads(side.read_text())["sha256"]
    assert recorded == SHA
    (tmp_path / "sub" / "blob.bin").write_bytes(b"y" * 1000)
    for _ in range(2):  # the second time too: the bad hash was not recorded by the first check
        with pytest.raises(WeightsError, match=r"sub/blob\.bin: sha256 .* no longer matches"):
            ensure_files([unpinned], tmp_path)
    assert json.loads(side.read_text())["sha256"] == recorded


def test_missing_offline_names_the_file(tmp_path):
    e = WeightFile(path="vae/model.safetensors", hub="owner/repo", file="vae/model.safetensors", sha256=None)
    with pytest.raises(WeightsError, match=r"vae/model\.safetensors: missing from .*offline"):
        ensure_files([e], tmp_path, offline=True)


def test_manifest_lists_every_component(tmp_path):
    entries = load_manifest("flux-schnell")
    paths = {e.path.split("/")[0] for e in entries}
    assert {
        "text_encoder",
        "text_encoder_2",
        "vae",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
        "safety_checker",
        "feature_extractor",
        "model_index.json",
        "svdq-int4_r32-flux.1-schnell.safetensors",
    } <= paths
    assert transformer_file("flux-schnell") in {e.path for e in entries}
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"models": {"x": {"files": [{"path": "a", "sha256": None}]}}}))
    with pytest.raises(WeightsError, match="no transformer listed for model 'x'"):
        transformer_file("x", bad)
    with pytest.raises(ValueError, match="exactly one source"):
        load_manifest("x", bad)
    with pytest.raises(WeightsError, match="no model named 'y'"):
        load_manifest("y", bad)


def test_pin_weights_fills_hashes(http, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {"models": {"m": {"files": [{"path": "a/blob.bin", "url": f"{http}/blob.bin", "sha256": None}]}}}
        )
    )
    script = Path(__file__).resolve().parent.parent / "scripts" / "pin_weights.py"
    res = subprocess.run(
        [sys.executable, str(script), "--model", "m", "--manifest", str(manifest)],
        env={**os.environ, "SVDQ_WEIGHTS_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(manifest.read_text())["models"]["m"]["files"]
    assert entry["sha256"] == SHA and entry["size"] == len(BLOB)


def test_url_entries_are_capped_at_their_size_and_never_inflated(http, tmp_path):
    endless = WeightFile(path="e.bin", url=f"{http}/endless.bin", sha256=None, size=2_000_000)
    with pytest.raises(WeightsError, match=r"e\.bin: .* sent more than the download cap of 1\.9 MiB"):
        ensure_files([endless], tmp_path)
    assert not (tmp_path / "e.bin").exists()
    gz = WeightFile(path="g.bin", url=f"{http}/gzip.bin", sha256=None)
    with pytest.raises(WeightsError, match=r"g\.bin: .*Content-Encoding 'gzip' although identity was asked"):
        ensure_files([gz], tmp_path)
