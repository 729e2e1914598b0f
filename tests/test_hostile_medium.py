# ruff: noqa: F811 - the fixtures web and transformer come from tests/test_hostile.py
"""Serving under hostile input, part 2 (issue 24, part 4): the medium findings, each as a test.

Loopback only (the stand-in servers of tests/test_hostile.py), bounded in count and time.
"""

from __future__ import annotations

import io
import shutil
import socket
import struct
import subprocess
import tarfile
import time

import pytest
import torch
from safetensors.torch import save

from engine.lora import LoraError, parse_lora, resolve_source
from engine.lora.formats import MAX_KEYS
from engine.lora.store import MAX_TAR_MEMBERS
from engine.service.models import _online

from .test_hostile import body, cache_files, lora_bytes, store_for, tar_of, transformer, web  # noqa: F401
from .test_lora import DIFFUSERS_MODULES, diffusers_file

MiB = 2**20
KEY = "transformer.transformer_blocks.0.attn.to_q"


def test_huge_finite_factors_and_alpha_are_refused_naming_the_field(transformer):
    sd = diffusers_file(DIFFUSERS_MODULES)
    sd[f"{KEY}.lora_A.weight"] = torch.full_like(sd[f"{KEY}.lora_A.weight"], 1e30)
    with pytest.raises(LoraError, match=rf"^{KEY}: its factors .* times the layer's largest weight"):
        parse_lora(sd, transformer)
    sd = diffusers_file(DIFFUSERS_MODULES)
    sd[f"{KEY}.alpha"] = torch.tensor(3e38)
    with pytest.raises(LoraError, match=rf"^{KEY}\.alpha is 3e\+38"):
        parse_lora(sd, transformer)
    sd = diffusers_file(DIFFUSERS_MODULES)
    sd[f"{KEY}.lora_B.weight"] *= 1e6  # finite, moderate alpha, but a million times a trained LoRA
    with pytest.raises(LoraError, match=rf"^{KEY}: its factors"):
        parse_lora(sd, transformer)
    assert parse_lora(diffusers_file(DIFFUSERS_MODULES, amp=4.0), transformer).factors  # real ones pass


def test_header_size_and_key_count_are_capped_before_reading(web, tmp_path, transformer):
    junk = {f"junk.{i}": torch.zeros(1) for i in range(MAX_KEYS + 1)}
    web.routes["/keys.safetensors"] = body(save({**diffusers_file(DIFFUSERS_MODULES), **junk}))
    huge = struct.pack("<Q", 64 * MiB) + b"{" + b" " * (64 * MiB)  # a 64 MiB header
    web.routes["/header.safetensors"] = body(huge)
    store = store_for(tmp_path, transformer, web, max_download_bytes=128 * MiB)
    t0 = time.monotonic()
    with pytest.raises(LoraError, match=f"holds [0-9,]+ tensors, over the limit of {MAX_KEYS:,}"):
        store.load(f"{web.base}/keys.safetensors")
    with pytest.raises(LoraError, match="header is 67,108,864 bytes, over the limit"):
        store.load(f"{web.base}/header.safetensors")
    assert cache_files(store) == [] and time.monotonic() - t0 < 20


def test_tar_member_count_and_sparse_members(web, tmp_path, transformer):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(MAX_TAR_MEMBERS + 5):
            tar.addfile(tarfile.TarInfo(f"empty{i}"), io.BytesIO(b""))
        info = tarfile.TarInfo("lora.safetensors")
        data = lora_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    web.routes["/many.tar"] = body(buf.getvalue())
    store = store_for(tmp_path, transformer, web)
    with pytest.raises(LoraError, match=f"more than {MAX_TAR_MEMBERS} members; refused"):
        store.load(f"{web.base}/many.tar")
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse member")
    src = tmp_path / "sparse" / "lora.safetensors"
    src.parent.mkdir()
    with open(src, "wb") as f:
        f.truncate(64 * MiB)  # 64 MiB of holes: a few KiB as a sparse member
    subprocess.run(["tar", "-S", "-cf", str(tmp_path / "s.tar"), "-C", str(src.parent), src.name], check=True)
    packed = (tmp_path / "s.tar").read_bytes()
    assert len(packed) < MiB
    web.routes["/sparse.tar"] = body(packed)
    with pytest.raises(LoraError, match="sparse archive member"):
        store.load(f"{web.base}/sparse.tar")
    assert cache_files(store) == []


def test_every_partial_file_goes_at_start_and_counts_in_the_bound(web, tmp_path, transformer):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("a" * 32 + ".part", "b" * 32 + ".part.tarmember"):  # kill -9 mid-download / mid-unpack
        (cache / name).write_bytes(b"\0" * MiB)
    store = store_for(tmp_path, transformer, web, cache_bytes=4 * MiB, max_download_bytes=MiB)
    assert cache_files(store) == []
    (cache / ("c" * 32 + ".part.tarmember")).write_bytes(b"\0" * (3 * MiB))  # one in use now
    assert store.disk_bytes == 3 * MiB  # counted


def test_a_file_larger_than_the_cache_bound_is_refused_saying_so(web, tmp_path, transformer):
    data = lora_bytes()
    web.routes["/a.safetensors"] = body(data)
    store = store_for(tmp_path, transformer, web, cache_bytes=len(data) // 2, max_download_bytes=MiB)
    with pytest.raises(LoraError, match=r"over the download cap .* LoRA cache bound, SVDQ_LORA_CACHE_BYTES"):
        store.load(f"{web.base}/a.safetensors")
    assert store.disk_bytes == 0


def test_mutable_sources_are_fetched_again_after_the_ttl_immutable_ones_never(web, tmp_path, transformer):
    # body() sends no ETag or Last-Modified: the TTL applies (with them: tests/test_lora_revalidate.py)
    web.routes["/a.safetensors"] = body(lora_bytes(seed=1))
    commit = "0123456789abcdef0123456789abcdef01234567"
    web.routes[f"/o/r/resolve/{commit}/l.safetensors"] = body(lora_bytes(seed=2))
    store = store_for(tmp_path, transformer, web, mutable_ttl_s=0.0)
    for _ in range(2):
        store.load(f"{web.base}/a.safetensors")
        store.load(f"https://huggingface.co/o/r/resolve/{commit}/l.safetensors")
    paths = [p for p, _ in web.seen]
    assert paths.count("/a.safetensors") == 2  # changed or not: fetched again once stale
    assert paths.count(f"/o/r/resolve/{commit}/l.safetensors") == 1
    kept = store_for(tmp_path / "k", transformer, web)  # the default TTL: an hour
    kept.load(f"{web.base}/a.safetensors")
    kept.load(f"{web.base}/a.safetensors")
    assert [p for p, _ in web.seen].count("/a.safetensors") == 3
    assert resolve_source("o/r").immutable is False
    assert resolve_source(f"https://huggingface.co/o/r/tree/{commit}").immutable is True
    assert resolve_source("https://civitai.com/models/1?modelVersionId=2").immutable is True
    assert resolve_source("https://civitai.com/models/1").immutable is False


@pytest.mark.parametrize(
    "text",
    [
        "owner/repo/../../../api/whoami-v2",
        "owner/repo/a/../../x.safetensors",
        "../repo/x.safetensors",
        "owner/../x.safetensors",
        "https://huggingface.co/o/r/resolve/main/..%2F..%2Fapi%2Fwhoami",
        "https://huggingface.co/o/r/resolve/main/%2e%2e/%2e%2e/api/x",
        "https://huggingface.co/o/r/blob/main//x.safetensors",
    ],
)
def test_hub_paths_that_climb_are_refused(text, tmp_path):
    with pytest.raises(LoraError, match=r"may not hold '\.', '\.\.'|not a file inside|local paths"):
        resolve_source(text, local_dir=None)


def test_normal_hub_forms_still_resolve():
    assert resolve_source("https://huggingface.co/o/r/").kind == "hub_repo"  # a trailing slash is fine
    assert resolve_source("o/r/sub/x.safetensors").location.endswith("/o/r/resolve/main/sub/x.safetensors")


def test_online_probe_follows_hf_endpoint():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert _online(f"http://127.0.0.1:{port}", timeout=2)
    finally:
        listener.close()
    assert not _online(f"http://127.0.0.1:{port}", timeout=2)
