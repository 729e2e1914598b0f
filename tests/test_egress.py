"""Outbound requests reach only public addresses (issue 24, part 2).

No traffic leaves the machine: the refused addresses are checked with the resolver and the
connection layer stubbed (a stub that fails the test if anything connects), and the
end-to-end cases run against loopback servers that must see no request.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest
import urllib3.util.connection

from engine.download import DownloadError, DownloadLimits, download
from engine.egress import AddressRefused, EgressPolicy, is_public
from engine.lora import LoraError, LoraStore, StoreConfig

from .test_hostile import _Handler, body

MiB = 2**20
LIMITS = DownloadLimits(max_bytes=MiB, deadline_s=10)

NOT_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "224.0.0.1", "239.1.1.1", "255.255.255.255",
    "192.0.2.1", "198.18.0.1", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "fd12::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::a00:1",
    "2001:db8::1",
]  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))
    assert not EgressPolicy().allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert is_public(ipaddress.ip_address(address))


def numeric_only(host, port, family=0, type=0, proto=0, flags=0):
    """The real C resolver for numeric hosts only: a name would be a DNS query, which fails the test."""
    if not flags & socket.AI_NUMERICHOST:
        raise AssertionError(f"a DNS query for {host!r} was attempted")
    return socket.getaddrinfo(host, port, family, type, proto, flags)


@pytest.mark.parametrize(
    "host", ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0", "[::1]", "::ffff:127.0.0.1", "127.0.1"]
)
def test_every_spelling_of_loopback_is_judged_by_its_address(host):
    """The C resolver reads these as 127.0.0.1 / ::1 (inet_aton); the check sees what it connects to."""
    with pytest.raises(AddressRefused, match="is not a public address"):
        EgressPolicy(resolve=numeric_only).addresses(host, 80)


@pytest.fixture()
def servers():
    """Two loopback servers: 127.0.0.1 (the stand-in allowed by the dev allowlist) and 127.0.0.2."""
    out = []
    for host in ("127.0.0.1", "127.0.0.2"):
        srv = ThreadingHTTPServer((host, 0), _Handler)
        srv.daemon_threads = True
        srv.routes, srv.seen = {}, []
        srv.base = f"http://{host}:{srv.server_port}"
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        out.append(srv)
    yield out
    for srv in out:
        srv.shutdown()
        srv.server_close()


def test_loopback_urls_in_every_spelling_are_refused_before_connecting(servers, tmp_path):
    web = servers[0]
    web.routes["/secret"] = body(b"internal")
    port = web.server_port
    for url in (
        f"http://127.0.0.1:{port}/secret",
        f"http://127.1:{port}/secret",
        f"http://0x7f000001:{port}/secret",
        f"http://2130706433:{port}/secret",
        f"http://0177.0.0.1:{port}/secret",
        f"http://[::ffff:127.0.0.1]:{port}/secret",
        f"http://huggingface.co@127.0.0.1:{port}/secret",
        f"http://huggingface.co:x@127.1:{port}/secret",
    ):
        with pytest.raises(DownloadError) as e:
            download(url, tmp_path / "x.part", limits=LIMITS, policy=EgressPolicy(resolve=numeric_only))
        assert "is not a public address" in str(e.value), url
        assert str(port) not in str(e.value) and "secret" not in str(e.value)  # no port, no path
    assert web.seen == []  # not one request reached it
    # The development allowlist lets the stand-in through, unchanged.
    got = download(
        f"{web.base}/secret", tmp_path / "y.part", limits=LIMITS, policy=EgressPolicy(("127.0.0.1/32",))
    )
    assert got == len(b"internal")


def test_every_redirect_hop_is_checked(servers, tmp_path):
    allowed, inner = servers
    inner.routes["/admin"] = body(b"internal")

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", f"{inner.base}/admin")
        h.send_header("Content-Length", "0")
        h.end_headers()

    allowed.routes["/lora.safetensors"] = redirect
    with pytest.raises(DownloadError, match="is not a public address"):
        download(
            f"{allowed.base}/lora.safetensors",
            tmp_path / "x.part",
            limits=LIMITS,
            policy=EgressPolicy(("127.0.0.1/32",)),
        )
    assert [p for p, _ in allowed.seen] == ["/lora.safetensors"] and inner.seen == []


def test_the_checked_address_is_the_one_connected_to(servers, tmp_path):
    """DNS rebinding: a name whose second answer differs is never looked up a second time."""
    allowed, inner = servers
    allowed.routes["/f"] = body(b"from the checked address")
    inner.routes["/f"] = body(b"rebound")
    answers = []

    def rebinding(host, port, family=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        ip = "127.0.0.1" if not answers else "127.0.0.2"  # first answer passes, later ones would not
        answers.append(ip)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    part = tmp_path / "x.part"
    policy = EgressPolicy(("127.0.0.1/32",), resolve=rebinding)
    download(f"http://lora.example:{allowed.server_port}/f", part, limits=LIMITS, policy=policy)
    assert part.read_bytes() == b"from the checked address" and answers == ["127.0.0.1"]
    assert inner.seen == []


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "10.0.0.5",
        "100.64.1.1",
        "192.168.1.1",
        "172.16.0.1",
        "fd00::1",
        "224.0.0.1",
        "0.0.0.0",
    ],
)
def test_names_resolving_to_internal_addresses_never_connect(address, tmp_path, monkeypatch):
    """The cloud metadata service, private and shared ranges: refused with the network stubbed."""

    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", no_connection)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def resolve(host, port, fam=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    with pytest.raises(DownloadError, match=r"^refused: 'metadata\.internal' is not a public address"):
        download(
            "http://metadata.internal/latest/meta-data/", tmp_path / "x.part", limits=LIMITS,
            policy=EgressPolicy(resolve=resolve),
        )  # fmt: skip


def test_a_public_address_is_connected_to_as_checked(tmp_path, monkeypatch):
    """With the connection layer stubbed: the socket is opened to the checked public address."""
    tried = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise ConnectionRefusedError("stubbed")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)

    def resolve(host, port, fam=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    with pytest.raises(DownloadError, match="failed"):
        download("https://cdn.example/x.safetensors", tmp_path / "x.part", limits=LIMITS,
                 policy=EgressPolicy(resolve=resolve))  # fmt: skip
    assert tried == [("93.184.216.34", 443)]


def test_lora_store_refuses_internal_urls_by_default(servers, tmp_path):
    web = servers[0]
    store = LoraStore(StoreConfig(root=tmp_path / "cache"), parse=lambda state: None)
    for url in (f"http://127.1:{web.server_port}/x.safetensors", f"http://[::1]:{web.server_port}/x"):
        with pytest.raises(LoraError, match="is not a public address") as e:
            store.load(url)
        assert str(web.server_port) not in str(e.value)
    assert web.seen == []
    with pytest.raises(ValueError, match="SVDQ_EGRESS_ALLOW: 'nope' is not a network"):
        EgressPolicy.parse("127.0.0.0/8, nope")
