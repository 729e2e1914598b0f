# ruff: noqa: F811 - the fixtures web and transformer come from tests/test_hostile.py
"""Cached LoRAs from mutable sources are revalidated on every use (issue 24, part 4).

Loopback stand-ins for an origin, the hub (API + ``resolve`` redirecting to a CDN) and civitai,
each counting the requests and the conditional headers it gets. What is checked: 304 serves the
cache; new bytes replace it (never half-written, the partial counted in the bound); a failed
revalidation serves the cached copy with one log line, a 404 fails; immutable sources are never
asked again; the hub token never reaches another host, redirects and revalidations included.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time

import pytest
import torch

from engine.egress import EgressPolicy
from engine.lora import LoraError

from .test_hostile import body, cache_files, lora_bytes, standin, store_for, transformer, web  # noqa: F401

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Versioned:
    """A file whose bytes a test replaces, served as an origin does: a strong ETag per version
    (or a weak one, or none) and a Last-Modified date (or none); a matching If-None-Match, else a
    matching If-Modified-Since, is answered 304 unless ``honour`` is False."""

    def __init__(self, data: bytes, *, etag: str = "strong", last_modified: bool = True, honour: bool = True):
        self.data, self.version = data, 0
        self.kind, self.with_date, self.honour = etag, last_modified, honour

    def replace(self, data: bytes) -> None:
        self.data, self.version = data, self.version + 1

    @property
    def etag(self) -> str | None:
        tag = f'"v{self.version}"'
        return {"strong": tag, "weak": f"W/{tag}", "none": None}[self.kind]

    @property
    def date(self) -> str | None:
        return (
            email.utils.formatdate(1_700_000_000 + 60 * self.version, usegmt=True) if self.with_date else None
        )

    def __call__(self, h) -> None:
        inm, ims = h.headers.get("If-None-Match"), h.headers.get("If-Modified-Since")
        same = inm == self.etag if inm is not None else ims is not None and ims == self.date
        h.send_response(304 if self.honour and same else 200)
        if self.etag:
            h.send_header("ETag", self.etag)
        if self.date:
            h.send_header("Last-Modified", self.date)
        if self.honour and same:
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(self.data)))
        h.end_headers()
        h.wfile.write(self.data)


def status(code: int):
    def route(h):
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def redirect(to: str):
    def route(h):
        h.send_response(302)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def asked(server, path: str) -> list[dict]:
    """The headers of every request ``server`` got for ``path`` (query ignored)."""
    return [headers for p, headers in server.seen if p.split("?")[0] == path]


def same_factors(a, b) -> bool:
    return len(a.factors) == len(b.factors) and all(
        torch.equal(x.down, y.down) and torch.equal(x.up, y.up)
        for x, y in zip(a.factors, b.factors, strict=True)
    )


@pytest.fixture()
def cdn():
    """A second stand-in beside ``web``: the hub's CDN, another host."""
    with standin() as srv:
        yield srv


def test_every_use_asks_if_none_match_304_serves_the_cache_200_replaces_it(web, tmp_path, transformer):
    origin = Versioned(lora_bytes(seed=1))
    web.routes["/a.safetensors"] = origin
    url = f"{web.base}/a.safetensors"
    store = store_for(tmp_path, transformer, web)
    first = store.load(url)[1]
    assert store.load(url)[1] is first  # 304: the parsed copy in memory
    again = store_for(tmp_path, transformer, web).load(url)[1]  # a restart: the record on disk
    assert same_factors(again, first)
    origin.replace(lora_bytes(seed=2))
    changed = store.load(url)[1]
    assert not same_factors(changed, first)
    assert store.load(url)[1] is changed
    tags = [(h.get("If-None-Match"), h.get("If-Modified-Since")) for h in asked(web, "/a.safetensors")]
    assert tags == [(None, None), ('"v0"', None), ('"v0"', None), ('"v0"', None), ('"v1"', None)]
    (final,) = store.root.glob("*.safetensors")
    assert final.read_bytes() == origin.data
    assert json.loads(final.with_suffix(".json").read_text())["etag"] == '"v1"'


def test_without_a_strong_etag_last_modified_then_the_ttl(web, tmp_path, transformer):
    web.routes["/lm.safetensors"] = dated = Versioned(lora_bytes(seed=1), etag="weak")
    web.routes["/bare.safetensors"] = Versioned(lora_bytes(seed=2), etag="weak", last_modified=False)
    store = store_for(tmp_path, transformer, web)
    for _ in range(2):
        store.load(f"{web.base}/lm.safetensors")
        store.load(f"{web.base}/bare.safetensors")
    lm = [(h.get("If-None-Match"), h.get("If-Modified-Since")) for h in asked(web, "/lm.safetensors")]
    assert lm == [(None, None), (None, dated.date)]  # a weak ETag is not recorded
    assert len(asked(web, "/bare.safetensors")) == 1  # nothing to revalidate with: kept for the TTL
    expired = store_for(tmp_path, transformer, web, mutable_ttl_s=0.0)
    expired.load(f"{web.base}/bare.safetensors")
    bare = asked(web, "/bare.safetensors")
    assert len(bare) == 2 and "If-None-Match" not in bare[1] and "If-Modified-Since" not in bare[1]


def test_a_server_ignoring_the_condition_but_naming_the_same_etag_is_not_downloaded_again(
    web, tmp_path, transformer
):
    web.routes["/a.safetensors"] = Versioned(lora_bytes(), honour=False)
    store = store_for(tmp_path, transformer, web)
    store.load(f"{web.base}/a.safetensors")
    (final,) = store.root.glob("*.safetensors")
    before = final.stat().st_mtime_ns
    store_for(tmp_path, transformer, web).load(f"{web.base}/a.safetensors")
    assert asked(web, "/a.safetensors")[1]["If-None-Match"] == '"v0"'
    assert final.stat().st_mtime_ns == before  # the 200's body was not written


@pytest.mark.parametrize("failure", ["server down", "HTTP 503", "address refused", "timeout"])
def test_a_failed_revalidation_serves_the_cached_copy_with_one_line(
    failure, web, tmp_path, transformer, caplog
):
    web.routes["/a.safetensors"] = Versioned(lora_bytes())
    url = f"{web.base}/a.safetensors?token=s3cret"
    first = store_for(tmp_path, transformer, web).load(url)[1]
    kw = {}
    if failure == "server down":
        web.shutdown()
        web.server_close()
    elif failure == "HTTP 503":
        web.routes["/a.safetensors"] = status(503)
    elif failure == "address refused":
        kw["egress"] = EgressPolicy()  # public addresses only: loopback refused before connecting
    else:
        web.routes["/a.safetensors"] = lambda h: time.sleep(3)
        kw["idle_s"] = 0.5
    store = store_for(tmp_path, transformer, web, **kw)
    n = len(web.seen)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="engine.lora.store"):
        got = store.load(url)[1]
    assert same_factors(got, first) and time.monotonic() - t0 < 5
    lines = [r.getMessage() for r in caplog.records if "could not revalidate" in r.getMessage()]
    assert len(lines) == 1 and "serving the copy fetched" in lines[0] and "s3cret" not in lines[0], lines
    assert len(web.seen) == n + (failure in ("HTTP 503", "timeout"))


def test_a_definite_refusal_fails_the_request(web, tmp_path, transformer):
    web.routes["/a.safetensors"] = Versioned(lora_bytes())
    store = store_for(tmp_path, transformer, web)
    store.load(f"{web.base}/a.safetensors")
    web.routes["/a.safetensors"] = status(404)
    with pytest.raises(LoraError, match="HTTP 404"):
        store.load(f"{web.base}/a.safetensors")


def test_immutable_sources_are_never_revalidated(web, tmp_path, transformer):
    web.routes[f"/o/r/resolve/{COMMIT}/l.safetensors"] = Versioned(lora_bytes(seed=1))
    web.routes["/api/download/models/7"] = Versioned(lora_bytes(seed=2))
    sources = [
        f"https://huggingface.co/o/r/resolve/{COMMIT}/l.safetensors",
        "https://civitai.com/models/3?modelVersionId=7",
    ]
    for store in (store_for(tmp_path, transformer, web), store_for(tmp_path, transformer, web)):
        for text in sources:
            store.load(text)
            store.load(text)
    assert [p.split("?")[0] for p, _ in web.seen] == [
        f"/o/r/resolve/{COMMIT}/l.safetensors",
        "/api/download/models/7",
    ]


def test_the_hub_token_goes_to_the_hub_only_and_conditions_follow_the_redirect(
    web, cdn, tmp_path, transformer
):
    """huggingface.co answers ``resolve/main`` with a redirect to its CDN, as the real hub does for
    LFS files: the token stays with the hub, the conditional header goes on to the CDN."""
    blob = Versioned(lora_bytes(seed=1))
    cdn.routes["/xet/l"] = blob
    web.routes["/o/r/resolve/main/l.safetensors"] = redirect(f"{cdn.base}/xet/l?sig=1")
    web.routes["/api/models/o/r"] = body(json.dumps({"siblings": [{"rfilename": "l.safetensors"}]}).encode())
    store = store_for(tmp_path, transformer, web, hf_token="hf_s3cret")
    first = store.load("o/r/l.safetensors")[1]  # hub resolve/main: mutable
    store.load("o/r/l.safetensors")
    store.load("o/r")  # the repository's only file, listed by the API on every use
    store.load("o/r")
    store.load(f"{cdn.base}/xet/l")  # the CDN's URL given directly: not the hub, no token
    blob.replace(lora_bytes(seed=2))
    changed = store.load("o/r")[1]
    assert not same_factors(changed, first)
    assert all(h.get("Authorization") == "Bearer hf_s3cret" for _, h in web.seen)
    assert not any("Authorization" in h for _, h in cdn.seen)
    assert len(asked(web, "/api/models/o/r")) == 3 and len(asked(web, "/o/r/resolve/main/l.safetensors")) == 5
    tags = [h.get("If-None-Match") for h in asked(cdn, "/xet/l")]
    assert tags == [None, '"v0"', None, '"v0"', None, '"v0"']  # per source: first fetch, then revalidations


def test_a_civitai_model_is_revalidated_through_its_api(web, tmp_path, transformer):
    def answer(version: int) -> bytes:
        url = f"https://civitai.com/api/download/models/{version}"
        return json.dumps(
            {"modelVersions": [{"files": [{"name": "l.safetensors", "downloadUrl": url}]}]}
        ).encode()

    web.routes["/api/v1/models/3"] = body(answer(7))
    web.routes["/api/download/models/7"] = Versioned(lora_bytes(seed=1))
    web.routes["/api/download/models/8"] = Versioned(lora_bytes(seed=2))
    store = store_for(tmp_path, transformer, web)
    first = store.load("https://civitai.com/models/3")[1]
    assert store_for(tmp_path, transformer, web).load("https://civitai.com/models/3")[1] is not None
    web.routes["/api/v1/models/3"] = body(answer(8))  # a new latest version
    assert not same_factors(store.load("https://civitai.com/models/3")[1], first)
    paths = [p for p, _ in web.seen]
    assert paths == [
        "/api/v1/models/3",
        "/api/download/models/7",
        "/api/v1/models/3",
        "/api/v1/models/3",
        "/api/download/models/8",
    ]


def test_a_replacement_is_never_half_visible_and_its_partial_counts_in_the_bound(web, tmp_path, transformer):
    old, new = lora_bytes(seed=1), lora_bytes(seed=2)
    gate, halfway = threading.Event(), threading.Event()

    def slow_new_version(h):
        if h.headers.get("If-None-Match") == '"v0"' and not gate.is_set():
            h.send_response(200)
            h.send_header("ETag", '"v1"')
            h.send_header("Content-Length", str(len(new)))
            h.end_headers()
            h.wfile.write(new[: len(new) // 2])
            h.wfile.flush()
            halfway.set()
            gate.wait(10)
            h.wfile.write(new[len(new) // 2 :])
        else:
            Versioned(old)(h)

    web.routes["/a.safetensors"] = slow_new_version
    store = store_for(
        tmp_path, transformer, web, cache_bytes=int(1.5 * len(old)), max_download_bytes=2 * len(old)
    )
    store.load(f"{web.base}/a.safetensors")
    (final,) = store.root.glob("*.safetensors")
    worker = threading.Thread(target=store.load, args=(f"{web.base}/a.safetensors",))
    worker.start()
    assert halfway.wait(10)
    deadline = time.monotonic() + 5
    while not any(p.name.endswith(".part") for p in store.root.iterdir()):  # the new body started
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # mid-download: the stale copy is gone, no final name holds part of the new one, and the
    # partial is within the bound
    assert not final.exists() and store.disk_bytes <= store.config.cache_bytes
    gate.set()
    worker.join(10)
    assert final.read_bytes() == new and cache_files(store) == [final.stem + ".json", final.name]


def test_an_interrupted_replacement_leaves_nothing_and_the_next_use_fetches_again(web, tmp_path, transformer):
    web.routes["/a.safetensors"] = origin = Versioned(lora_bytes(seed=1))
    store = store_for(tmp_path, transformer, web)
    store.load(f"{web.base}/a.safetensors")
    new = lora_bytes(seed=2)

    def truncated(h):
        h.send_response(200)
        h.send_header("ETag", '"v1"')
        h.send_header("Content-Length", str(len(new)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(new[:100])

    web.routes["/a.safetensors"] = truncated
    with pytest.raises(LoraError, match="truncated"):
        store.load(f"{web.base}/a.safetensors")
    assert cache_files(store) == []  # the stale copy went when the new body started; nothing half-written
    origin.replace(new)
    web.routes["/a.safetensors"] = origin
    store.load(f"{web.base}/a.safetensors")
    assert "If-None-Match" not in asked(web, "/a.safetensors")[-1]


def test_records_without_their_file_go_at_start_and_a_mismatched_record_is_ignored(
    web, tmp_path, transformer
):
    web.routes["/a.safetensors"] = Versioned(lora_bytes())
    store = store_for(tmp_path, transformer, web)
    store.load(f"{web.base}/a.safetensors")
    (final,) = store.root.glob("*.safetensors")
    (store.root / ("f" * 32 + ".json")).write_text("{}")  # its file evicted by hand
    final.write_bytes(final.read_bytes())  # rewritten: the record no longer describes it
    store = store_for(tmp_path, transformer, web)
    assert cache_files(store) == [final.stem + ".json", final.name]
    store.load(f"{web.base}/a.safetensors")  # unrecorded and young: kept for the TTL, not asked
    assert len(asked(web, "/a.safetensors")) == 1
