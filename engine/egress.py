"""Outbound HTTP only to public addresses: the guard against server-side request forgery.

A LoRA URL is user input, and the container can reach what its users cannot: the loopback
interface (coglet's own port, /shutdown included), the cloud's metadata service
(169.254.169.254), private and carrier-grade NAT networks. So before every connection, for the
first request and for every redirect hop, the host is resolved and every address it resolves to
must be public; the connection is then made to the address that was checked, never to a second
lookup of the name (a DNS answer that changes between check and connect, "DNS rebinding",
cannot slip through). Refused: loopback, private (RFC 1918, unique local), link-local,
carrier-grade NAT (100.64.0.0/10), multicast, unspecified, reserved and documentation ranges,
and any IPv6 form that embeds such an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4,
Teredo, NAT64). Every spelling of an address the C resolver accepts (``127.1``, ``0x7f000001``,
``2130706433``, ``0177.0.0.1``) is judged by the address it resolves to, and ``user@host`` by its
host, since the check is on what is connected to, not on the text.

An allowlist of networks (:class:`EgressPolicy`) lets the development and test stand-ins on
loopback through; it is empty unless the operator sets ``SVDQ_EGRESS_ALLOW`` (read once, by the
service's setup). Errors say that the address is not public and nothing else: no port, no
path, no resolved address, so they cannot be used to map the inside. Proxies from the
environment are not used for guarded requests (the check would apply to the proxy, not the
target).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(ValueError):
    """A host that is not public (or does not resolve); the message names only the host."""


@dataclasses.dataclass(frozen=True)
class EgressPolicy:
    """Which addresses outbound requests may reach: public ones, and ``allow``'s networks.

    ``resolve(host, port)`` is ``socket.getaddrinfo``-like (injectable so that tests never
    query a real resolver for names).
    """

    allow: tuple[str, ...] = ()  # CIDR networks let through although not public (dev/tests only)
    resolve: Callable[..., list] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for net in self.allow:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"SVDQ_EGRESS_ALLOW: {net!r} is not a network (e.g. 127.0.0.0/8)") from None

    @classmethod
    def parse(cls, text: str) -> EgressPolicy:
        """From ``SVDQ_EGRESS_ALLOW``'s value: comma-separated networks; empty: public only."""
        return cls(tuple(n.strip() for n in text.split(",") if n.strip()))

    def allowed(self, ip: IPAddress) -> bool:
        """Whether ``ip`` may be connected to."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%")[0])
        if any(ip in ipaddress.ip_network(n, strict=False) for n in self.allow):
            return True
        return is_public(ip)

    def addresses(self, host: str, port: int) -> list[tuple[int, str]]:
        """``[(family, address)]`` of ``host``, all of them allowed; else AddressRefused."""
        resolve = self.resolve or socket.getaddrinfo
        host = host.strip("[]")
        try:  # numeric forms first: no query leaves the machine for them
            infos = resolve(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            try:
                infos = resolve(host, port, 0, socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                raise AddressRefused(f"{host!r} does not resolve") from None
        found = [(family, sockaddr[0]) for family, _, _, _, sockaddr in infos]
        if not found:
            raise AddressRefused(f"{host!r} does not resolve")
        for _, address in found:
            if not self.allowed(ipaddress.ip_address(address.split("%")[0])):
                raise AddressRefused(
                    f"{host!r} is not a public address; only public hosts are fetched "
                    "(loopback, private, link-local, shared and reserved addresses are refused)"
                )
        return found


def is_public(ip: IPAddress) -> bool:
    """A globally routable unicast address, also for the IPv4 address inside an IPv6 form."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(inner)
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or ip in _CGNAT
        or not ip.is_global
    )


def session(policy: EgressPolicy):
    """A ``requests`` session whose every connection (redirect hops included) obeys ``policy``."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def guarded(base: type) -> type:
        class Guarded(base):
            def _new_conn(self) -> socket.socket:
                name, error = self._dns_host, None
                try:
                    for _, address in policy.addresses(name, self.port):
                        self._dns_host = address  # connect to the checked address, not the name again
                        try:
                            return super()._new_conn()
                        except OSError as e:  # the next address, as create_connection would
                            error = e
                        finally:
                            self._dns_host = name
                finally:
                    self._dns_host = name
                raise error

        Guarded.__name__ = f"Guarded{base.__name__}"
        return Guarded

    class Pool(HTTPConnectionPool):
        ConnectionCls = guarded(HTTPConnection)

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = guarded(HTTPSConnection)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    s = requests.Session()
    s.trust_env = False  # no proxies from the environment: the check is on the real target
    s.mount("http://", Adapter())
    s.mount("https://", Adapter())
    return s
