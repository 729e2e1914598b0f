"""Serving under hostile input (issue 12): every finding as a test, against a loopback server.

Downloads: endless streams, gzip bombs, trickling and silent servers, cancellation, the cache
bound, files that do not parse. Sources: every form Replicate's flux LoRA models take that can
be served without their platform, with the hub and civitai moved onto the loopback server.
LoRA contents: NaN, rank 0, vector alpha. Paths, credentials in logs, prompts, seeds.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import gzip
import io
import json
import logging
import shutil
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from engine.download import DownloadError, DownloadLimits, download, redact
from engine.egress import EgressPolicy
from engine.flux import load_transformer
from engine.lora import LoraError, LoraStore, StoreConfig, parse_lora, resolve_source
from engine.tiny_model import CHECKPOINT_NAME

from .test_lora import DIFFUSERS_MODULES, diffusers_file

MiB = 2**20
LOOPBACK = EgressPolicy(allow=("127.0.0.0/8",))  # the stand-in servers here are on loopback


# --- a loopback server whose behaviour each test chooses ------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.seen.append((self.path, dict(self.headers)))
        route = self.server.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with contextlib.suppress(OSError):  # the client hung up, as it should when it gives up
            route(self)

    def log_message(self, *args):
        pass


def body(data: bytes, **headers):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.end_headers()
        h.wfile.write(data)

    return route


def endless(h):
    """Streams zeros without end and without a Content-Length."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    block = b"\0" * 65536
    while True:
        h.wfile.write(block)


def trickle(interval: float):
    """A byte every ``interval`` seconds (issue 12: a byte every 59 s held the slot forever)."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Length", str(10 * MiB))
        h.end_headers()
        for _ in range(10 * MiB):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(interval)

    return route


@contextlib.contextmanager
def standin():
    """A loopback server answering ``srv.routes`` (path -> reply), every request kept in ``srv.seen``."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes, srv.seen = {}, []
    srv.base = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def web():
    with standin() as srv:
        yield srv


# --- LoRA files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    return load_transformer(tiny_model_dir / CHECKPOINT_NAME)


def lora_bytes(seed: int = 0, **overrides) -> bytes:
    sd = diffusers_file(DIFFUSERS_MODULES, seed=seed)
    sd.update(overrides)
    return save(sd)


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def store_for(tmp_path, transformer, web=None, **kw) -> LoraStore:
    cfg = StoreConfig(
        root=tmp_path / "cache",
        hub=web.base if web else "https://huggingface.co",
        civitai=web.base if web else "https://civitai.com",
        **{"egress": LOOPBACK, **kw},
    )
    return LoraStore(cfg, lambda state: parse_lora(state, transformer))


def cache_files(store: LoraStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


# --- downloads -----------------------------------------------------------------------------------


def test_endless_stream_is_cut_at_the_cap_and_nothing_is_cached(web, tmp_path, transformer):
    web.routes["/endless.safetensors"] = endless
    store = store_for(tmp_path, transformer, web, max_download_bytes=2 * MiB)
    t0 = time.monotonic()
    with pytest.raises(LoraError, match=r"more than the download cap of 2\.0 MiB"):
        store.load(f"{web.base}/endless.safetensors")
    assert time.monotonic() - t0 < 10
    assert cache_files(store) == []


def test_announced_size_over_the_cap_is_refused_before_reading(web, tmp_path, transformer):
    web.routes["/big.safetensors"] = body(b"\0" * (3 * MiB))
    store = store_for(tmp_path, transformer, web, max_download_bytes=2 * MiB)
    with pytest.raises(LoraError, match=r"is 3\.0 MiB, over the download cap of 2\.0 MiB"):
        store.load(f"{web.base}/big.safetensors")
    assert cache_files(store) == []


def test_gzip_encoded_response_is_refused_not_inflated(web, tmp_path, transformer):
    bomb = gzip.compress(b"\0" * (64 * MiB))  # 64 KiB on the wire
    web.routes["/bomb.safetensors"] = body(bomb, Content_Encoding="gzip")
    store = store_for(tmp_path, transformer, web)
    with pytest.raises(LoraError, match="Content-Encoding 'gzip' although identity was asked"):
        store.load(f"{web.base}/bomb.safetensors")
    assert cache_files(store) == []
    assert web.seen[-1][1].get("Accept-Encoding") == "identity"


def test_deadline_stops_a_trickling_server(web, tmp_path):
    web.routes["/slow"] = trickle(0.1)
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=r"did not finish within 1\.5 s"):
        download(f"{web.base}/slow", tmp_path / "x.part", limits=DownloadLimits(100 * MiB, deadline_s=1.5))
    assert time.monotonic() - t0 < 3.5
    assert not (tmp_path / "x.part").exists()


def test_silent_server_is_dropped_after_the_idle_limit(web, tmp_path):
    web.routes["/silent"] = trickle(30.0)  # one byte, then nothing for 30 s
    t0 = time.monotonic()
    with pytest.raises(DownloadError):
        download(f"{web.base}/silent", tmp_path / "x.part", limits=DownloadLimits(100 * MiB, idle_s=1.0))
    assert time.monotonic() - t0 < 4


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    """What coglet does to cancel a prediction: an exception raised asynchronously in its thread."""
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))
    assert n == 1


class FakeCancel(BaseException):
    """Stands in for coglet.CancelationException (also a BaseException)."""


def test_cancel_stops_a_download_from_a_server_sending_a_byte_a_minute(web, tmp_path, transformer):
    web.routes["/minute.safetensors"] = trickle(59.0)
    store = store_for(tmp_path, transformer, web)
    outcome = {}

    def predict():
        try:
            store.load(f"{web.base}/minute.safetensors")
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=predict)
    thread.start()
    time.sleep(1.0)  # the download is under way, blocked waiting for the next byte
    assert thread.is_alive() and list(store.root.glob("*.part"))
    t0 = time.monotonic()
    _raise_in(thread, FakeCancel)
    thread.join(timeout=10)
    stopped = time.monotonic() - t0
    assert not thread.is_alive() and isinstance(outcome["error"], FakeCancel)
    assert stopped < 2.0, stopped
    assert cache_files(store) == []


def test_cancel_event(web, tmp_path):
    web.routes["/minute"] = trickle(59.0)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="cancelled"):
        download(f"{web.base}/minute", tmp_path / "x.part", limits=DownloadLimits(100 * MiB), cancel=cancel)
    assert time.monotonic() - t0 < 2.0 and not (tmp_path / "x.part").exists()


def test_part_files_count_in_the_cache_bound_and_stale_ones_go(web, tmp_path, transformer):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "deadbeef.part").write_bytes(b"\0" * MiB)  # left by a process killed mid-download
    old = cache / ("0" * 32 + ".safetensors")
    old.write_bytes(b"\0" * (3 * MiB))
    web.routes["/a.safetensors"] = body(lora_bytes())
    store = store_for(tmp_path, transformer, web, cache_bytes=3 * MiB, max_download_bytes=MiB)
    assert cache_files(store) == [old.name]  # the stale .part is gone at start
    store.load(f"{web.base}/a.safetensors")
    assert old.name not in cache_files(store)  # evicted to make room: the bound holds
    assert store.disk_bytes <= 3 * MiB


def test_nothing_that_fails_to_parse_is_cached(web, tmp_path, transformer):
    web.routes["/junk.safetensors"] = body(b"not a safetensors file at all")
    wrong = diffusers_file({"transformer_blocks.0.attn.to_q": (128, 64)})  # does not fit the model
    web.routes["/wrong.safetensors"] = body(save(wrong))
    store = store_for(tmp_path, transformer, web)
    with pytest.raises(LoraError, match=r"junk\.safetensors: not a readable \.safetensors LoRA file"):
        store.load(f"{web.base}/junk.safetensors")
    with pytest.raises(LoraError, match=r"do not fit transformer_blocks\.0\.attn\.to_q"):
        store.load(f"{web.base}/wrong.safetensors")
    assert cache_files(store) == []
    web.routes["/good.safetensors"] = body(lora_bytes())
    store.load(f"{web.base}/good.safetensors")
    key = cache_files(store)[0].split(".")[0]
    assert cache_files(store) == [f"{key}.json", f"{key}.safetensors"]  # a mutable URL's file and its record


def test_a_cached_file_is_served_without_the_network(web, tmp_path, transformer):
    web.routes["/good.safetensors"] = body(lora_bytes())
    url = f"{web.base}/good.safetensors"
    store_for(tmp_path, transformer, web).load(url)
    web.routes.clear()
    _, parsed = store_for(tmp_path, transformer, web).load(url)  # a new process: memory is empty
    assert parsed.factors


# --- sources -------------------------------------------------------------------------------------


HUB, CIV = "http://hub.test", "http://civ.test"


@pytest.mark.parametrize(
    "text,kind,location",
    [
        (
            "https://example.com/x/style.safetensors?dl=1",
            "url",
            "https://example.com/x/style.safetensors?dl=1",
        ),
        (
            "https://huggingface.co/o/r/blob/main/sub/s.safetensors",
            "url",
            f"{HUB}/o/r/resolve/main/sub/s.safetensors",
        ),
        (
            "https://huggingface.co/o/r/resolve/v1.0/s.safetensors",
            "url",
            f"{HUB}/o/r/resolve/v1.0/s.safetensors",
        ),
        ("huggingface.co/o/r", "hub_repo", "o/r"),
        ("https://hf.co/o/r", "hub_repo", "o/r"),
        ("o/r", "hub_repo", "o/r"),
        ("o/r/lora/s.safetensors", "url", f"{HUB}/o/r/resolve/main/lora/s.safetensors"),
        ("https://civitai.com/models/123/some-style", "civitai_model", "123"),
        ("civitai.com/models/123?modelVersionId=456", "url", f"{CIV}/api/download/models/456"),
        (
            "https://civitai.com/api/download/models/456?type=Model&format=SafeTensor",
            "url",
            f"{CIV}/api/download/models/456?type=Model&format=SafeTensor",
        ),
        (
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
            "url",
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
        ),
        ("data:application/octet-stream;base64,AAAA", "data", "data:application/octet-stream;base64,AAAA"),
    ],
)
def test_source_forms_resolve_to_download_urls(text, kind, location):
    src = resolve_source(text, hub=HUB, civitai=CIV)
    assert (src.kind, src.location) == (kind, location)


@pytest.mark.parametrize(
    "text",
    [
        "fofr/flux-pixar-cars:2c8e2f9d8a0b4f",
        "r8.im/fofr/flux-pixar-cars",
        "https://replicate.com/fofr/flux-pixar-cars",
    ],
)
def test_replicate_model_references_are_refused_saying_why(text):
    with pytest.raises(LoraError, match="Replicate model reference; resolving it needs Replicate's platform"):
        resolve_source(text)


def test_hub_repository_is_listed_then_its_lora_fetched_with_the_token(web, tmp_path, transformer):
    web.routes["/api/models/o/r"] = body(
        json.dumps({"siblings": [{"rfilename": "README.md"}, {"rfilename": "lora.safetensors"}]}).encode()
    )
    web.routes["/o/r/resolve/main/lora.safetensors"] = body(lora_bytes())
    store = store_for(tmp_path, transformer, web, hf_token="hf_secret_token")
    shown, parsed = store.load("https://huggingface.co/o/r")
    assert parsed.factors and shown == "hub o/r@main"
    assert [p for p, _ in web.seen] == ["/api/models/o/r", "/o/r/resolve/main/lora.safetensors"]
    assert all(h.get("Authorization") == "Bearer hf_secret_token" for _, h in web.seen)
    web.routes["/api/models/o/two"] = body(
        json.dumps({"siblings": [{"rfilename": "a.safetensors"}, {"rfilename": "b.safetensors"}]}).encode()
    )
    with pytest.raises(
        LoraError, match=r"holds 2 \.safetensors files \(a\.safetensors, b\.safetensors\); name one"
    ):
        store.load("o/two")


def test_civitai_model_page_resolves_through_the_api(web, tmp_path, transformer):
    web.routes["/api/v1/models/123"] = body(
        json.dumps(
            {
                "modelVersions": [
                    {
                        "id": 456,
                        "files": [
                            {
                                "name": "s.safetensors",
                                "primary": True,
                                "downloadUrl": "https://civitai.com/api/download/models/456",
                            }
                        ],
                    }
                ]
            }
        ).encode()
    )
    web.routes["/api/download/models/456"] = body(lora_bytes())
    store = store_for(tmp_path, transformer, web, civitai_token="civ_secret")
    _, parsed = store.load("https://civitai.com/models/123/a-style")
    assert parsed.factors
    assert [p for p, _ in web.seen] == ["/api/v1/models/123", "/api/download/models/456"]
    assert web.seen[-1][1].get("Authorization") == "Bearer civ_secret"


def test_tokens_go_only_to_their_own_hosts(web, tmp_path, transformer):
    web.routes["/x.safetensors"] = body(lora_bytes())
    store = store_for(tmp_path, transformer, None, hf_token="hf_secret_token", civitai_token="civ")
    store.load(f"{web.base}/x.safetensors")  # the hub and civitai are elsewhere here
    assert "Authorization" not in web.seen[-1][1]


def test_data_url_and_tar_archives(web, tmp_path, transformer):
    store = store_for(tmp_path, transformer, web)
    data = "data:application/octet-stream;base64," + base64.b64encode(lora_bytes(seed=1)).decode()
    assert store.load(data)[1].factors
    web.routes["/trained_model.tar"] = body(
        tar_of(
            {"output/README.md": b"hi", "output/flux_train_replicate/lora.safetensors": lora_bytes(seed=2)}
        )
    )
    assert store.load(f"{web.base}/trained_model.tar")[1].factors
    web.routes["/two.tar"] = body(tar_of({"a.safetensors": lora_bytes(), "b.safetensors": lora_bytes()}))
    with pytest.raises(LoraError, match=r"a \.tar archive\) holds 2 \.safetensors files"):
        store.load(f"{web.base}/two.tar")
    small = store_for(tmp_path / "s", transformer, web, max_download_bytes=1000)
    with pytest.raises(LoraError, match="data: URL holds more than the download cap"):
        small.load(data)
    with pytest.raises(LoraError, match="not valid base64"):
        store.load("data:;base64,@@@@")


# --- LoRA contents -------------------------------------------------------------------------------


def test_nan_rank0_and_vector_alpha_are_clear_errors(transformer):
    key = "transformer.transformer_blocks.0.attn.to_q"
    sd = diffusers_file(DIFFUSERS_MODULES)
    sd[f"{key}.lora_A.weight"] = torch.full_like(sd[f"{key}.lora_A.weight"], float("nan"))
    with pytest.raises(LoraError, match=f"{key}: its down factor holds NaN or Inf"):
        parse_lora(sd, transformer)
    sd = diffusers_file(DIFFUSERS_MODULES)
    sd[f"{key}.lora_B.weight"][0, 0] = float("inf")
    with pytest.raises(LoraError, match="up factor holds NaN or Inf"):
        parse_lora(sd, transformer)
    sd = diffusers_file({"transformer_blocks.0.attn.to_q": (64, 64)})
    sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = torch.zeros(0, 64), torch.zeros(64, 0)
    with pytest.raises(LoraError, match="rank 0"):
        parse_lora(sd, transformer)
    sd = diffusers_file({"transformer_blocks.0.attn.to_q": (64, 64)})
    sd[f"{key}.alpha"] = torch.ones(4)
    with pytest.raises(LoraError, match=r"alpha: expected one number, got a tensor of shape \[4\]"):
        parse_lora(sd, transformer)


# --- paths and credentials -------------------------------------------------------------------------


def test_local_paths_are_off_by_default_and_look_the_same_whether_or_not_they_exist(tmp_path, transformer):
    real = tmp_path / "real.safetensors"
    save_file(diffusers_file(DIFFUSERS_MODULES), real)
    store = store_for(tmp_path, transformer)
    messages = []
    for path in (str(real), str(tmp_path / "missing.safetensors"), "/etc/passwd", "file:///etc/hostname"):
        with pytest.raises(LoraError) as e:
            store.load(path)
        messages.append(str(e.value).replace(path, "<path>").replace("/etc/hostname", "<path>"))
    assert len(set(messages)) == 1 and "local paths are not served" in messages[0]


def test_local_paths_only_inside_the_lora_folder(tmp_path, transformer):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(diffusers_file(DIFFUSERS_MODULES), folder / "style.safetensors")
    outside = tmp_path / "outside.safetensors"
    save_file(diffusers_file(DIFFUSERS_MODULES), outside)
    (folder / "link.safetensors").symlink_to(outside)
    store = store_for(tmp_path, transformer, local_dir=folder)
    assert store.load("style.safetensors")[1].factors
    assert store.load(str(folder / "style.safetensors"))[1].factors
    for escape in (str(outside), "../outside.safetensors", "link.safetensors", "/etc/passwd"):
        with pytest.raises(LoraError, match="is not a file inside the LoRA folder"):
            store.load(escape)


def test_credentials_never_reach_the_log(web, tmp_path, transformer, caplog):
    web.routes["/x.safetensors"] = body(lora_bytes())
    store = store_for(tmp_path, transformer, web)
    url = f"http://user:hunter2@127.0.0.1:{web.server_port}/x.safetensors?token=tok_abc&v=1"
    with caplog.at_level(logging.INFO):  # the server's level (predict.py); urllib3 logs URLs at DEBUG
        shown, _ = store.load(url)
        with pytest.raises(LoraError) as e:
            store.load(url.replace("x.safetensors", "missing.safetensors"))
    text = caplog.text + str(e.value) + shown
    assert "hunter2" not in text and "tok_abc" not in text and "user" not in text
    assert "HTTP 404" in str(e.value) and "v=1" in shown
    assert (
        redact("https://a:b@h.com/p?sig=s&X-Amz-Signature=q")
        == "https://***@h.com/p?sig=***&X-Amz-Signature=***"
    )


@pytest.mark.slow
def test_cancel_during_a_slow_lora_download_frees_the_server(web, tmp_path, tiny_model_dir):
    """Over HTTP, with coglet: cancel answers 200 *and* the next prediction runs at once."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from cog_client import CogServer

    web.routes["/minute.safetensors"] = trickle(59.0)
    env = {"SVDQ_WEIGHTS_DIR": str(tmp_path / "w"), "SVDQ_MODEL": "tiny", "SVDQ_EGRESS_ALLOW": "127.0.0.0/8"}
    shutil.copytree(tiny_model_dir, tmp_path / "w" / "tiny")  # the session's tiny model
    with CogServer(env=env) as srv:
        assert srv.wait_ready()["status"] == "READY"
        body = {"input": {"prompt": "x", "lora_weights": f"{web.base}/minute.safetensors"}}
        status, _ = srv.request("PUT", "/predictions/slow-lora", body, headers={"Prefer": "respond-async"})
        assert status == 202
        deadline = time.monotonic() + 30
        while not any(p.startswith("/minute") for p, _ in web.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # blocked on the trickle now
        assert srv.request("POST", "/predictions/slow-lora/cancel")[0] == 200
        t0 = time.monotonic()
        status, resp = srv.predict(
            {"prompt": "next", "num_inference_steps": 1, "megapixels": "0.25"}, timeout=120
        )
        assert status == 200 and resp["status"] == "succeeded", resp
        assert time.monotonic() - t0 < 30
        assert not list((tmp_path / "w" / "loras").glob("*.part"))
