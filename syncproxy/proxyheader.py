"""PROXY protocol headers: build them for routes, read them from trusted peers.

The PROXY protocol (HAProxy's specification, versions 1 and 2) puts the
original client and server addresses in front of a TCP stream, so a server
behind a relay can log and act on the real client address. The encoding and
decoding is done by the ``proxy-protocol`` package. This module adds what a
front end needs around it: a size cap, the header's byte count (so exactly the
header is consumed and nothing after it), and one address type.

Only TCP over IPv4 and IPv6 is carried. A v1 ``UNKNOWN`` header or a v2
``LOCAL`` command (what health checks send) yields no address, and the
caller keeps the socket's own peer address.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from proxyprotocol import ProxyProtocolChecksumError, ProxyProtocolIncompleteError, ProxyProtocolSyntaxError
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, is_ipv4, is_ipv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from .peek import Incomplete

__all__ = [
    "MAX_PROXY_HEADER_SIZE",
    "Address",
    "IPNetwork",
    "MalformedProxyHeader",
    "ProxyHeader",
    "build_proxy_header",
    "is_trusted",
    "parse_trusted_networks",
    "may_start_proxy_header",
    "parse_proxy_header",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The specification limits a v1 line to 107 bytes. A v2 header may carry up to
# 64 KiB of TLVs; relays in practice send a few hundred bytes at most.
MAX_V1_SIZE = 107
MAX_PROXY_HEADER_SIZE = 4096

_V2_LENGTH = struct.Struct("!H")
_V1 = ProxyProtocolV1()
_V2 = ProxyProtocolV2()

ProxyVersion = Literal[1, 2]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Address:
    """An IP address and TCP port, with IPv4-mapped IPv6 addresses unmapped."""

    host: str
    port: int

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple) -> Address:
        ip = ipaddress.ip_address(sockaddr[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(str(ip), int(sockaddr[1]))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class MalformedProxyHeader(ValueError):
    """The bytes start like a PROXY protocol header but are not a valid one."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header: the client address (None for UNKNOWN or LOCAL) and its size."""

    source: Address | None
    size: int


def may_start_proxy_header(data: bytes) -> bool:
    """Return True if ``data`` is, or could grow into, a PROXY protocol signature."""
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        common = min(len(data), len(signature))
        if data[:common] == signature[:common]:
            return True
    return False


def parse_proxy_header(data: bytes) -> ProxyHeader:
    """Parse the PROXY protocol header at the start of ``data``.

    Raises :class:`~syncproxy.peek.Incomplete` with the total byte count
    needed when ``data`` ends inside the header, and :class:`MalformedProxyHeader`
    when it is invalid or longer than :data:`MAX_PROXY_HEADER_SIZE`.
    """
    if not data:
        raise Incomplete(1)
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        raise Incomplete(16)
    if data.startswith(V2_SIGNATURE):
        size = 16 + _V2_LENGTH.unpack_from(data, 14)[0]
        if size > MAX_PROXY_HEADER_SIZE:
            raise MalformedProxyHeader(f"v2 header of {size} bytes exceeds {MAX_PROXY_HEADER_SIZE}")
        if len(data) < size:
            raise Incomplete(size)
        return ProxyHeader(_unpack(_V2, data[:size]), size)

    head = data[: len(V1_SIGNATURE)]
    if head != V1_SIGNATURE[: len(head)]:
        raise MalformedProxyHeader("data starts with neither PROXY protocol signature")
    end = data.find(b"\n", 0, MAX_V1_SIZE)
    if end < 0:
        if len(data) >= MAX_V1_SIZE:
            raise MalformedProxyHeader(f"v1 header has no line end within {MAX_V1_SIZE} bytes")
        raise Incomplete(len(data) + 1)
    return ProxyHeader(_unpack(_V1, data[: end + 1]), end + 1)


def _unpack(version: ProxyProtocolV1 | ProxyProtocolV2, header: bytes) -> Address | None:
    try:
        result = version.unpack(header)
    except ProxyProtocolIncompleteError:
        raise MalformedProxyHeader("header ends early") from None
    except (ProxyProtocolSyntaxError, ProxyProtocolChecksumError, ValueError) as error:
        raise MalformedProxyHeader(f"invalid header: {error or error.__class__.__name__}") from None
    if not result.proxied:
        return None
    if is_ipv4(result) or is_ipv6(result):
        return Address(str(result.source[0]), result.source[1])
    return None


def build_proxy_header(version: ProxyVersion, source: Address, destination: Address) -> bytes:
    """Build a header telling the next server ``source`` connected to ``destination``.

    A header must carry one address family. If the two differ (a client that
    reached a relay over IPv6 and then this front end over IPv4), the
    destination becomes the unspecified address of the client's family.
    """
    source_ip = ipaddress.ip_address(source.host)
    destination_ip = ipaddress.ip_address(destination.host)
    if source_ip.version != destination_ip.version:
        destination_ip = ipaddress.ip_address("0.0.0.0" if source_ip.version == 4 else "::")

    # Without an explicit protocol the v2 header would say "unspecified";
    # HAProxy and nginx write and expect STREAM for TCP.
    addresses = ((source_ip, source.port), (destination_ip, destination.port))
    if source_ip.version == 4:
        result: ProxyResultIPv4 | ProxyResultIPv6 = ProxyResultIPv4(*addresses, protocol=socket.SOCK_STREAM)
    else:
        result = ProxyResultIPv6(*addresses, protocol=socket.SOCK_STREAM)
    if version == 1:
        return _V1.pack(result)
    if version == 2:
        return _V2.pack(result)
    raise ValueError(f"PROXY protocol version {version!r} is not 1 or 2")



def parse_trusted_networks(values: list[str] | tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Parse addresses and CIDR blocks allowed to send a PROXY header, raising ValueError."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"trusted PROXY protocol source {value!r} is not an IP address or CIDR block (such as 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def is_trusted(address: Address, networks: tuple[IPNetwork, ...]) -> bool:
    """Return True if ``address`` lies in one of ``networks``."""
    ip = ipaddress.ip_address(address.host)
    return any(ip in network for network in networks)
