"""PROXY protocol v1 and v2 headers: building, parsing, and the size caps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncproxy.peek import Incomplete
from syncproxy.proxyheader import (
    MAX_PROXY_HEADER_SIZE,
    Address,
    MalformedProxyHeader,
    build_proxy_header,
    may_start_proxy_header,
    parse_proxy_header,
)

CLIENT4 = Address("192.0.2.10", 51234)
SERVER4 = Address("127.0.0.1", 443)
CLIENT6 = Address("2001:db8::10", 51234)
SERVER6 = Address("::1", 443)


def test_v1_bytes_match_specification():
    assert build_proxy_header(1, CLIENT4, SERVER4) == b"PROXY TCP4 192.0.2.10 127.0.0.1 51234 443\r\n"
    assert build_proxy_header(1, CLIENT6, SERVER6) == b"PROXY TCP6 2001:db8::10 ::1 51234 443\r\n"


def test_v2_bytes_match_specification():
    header = build_proxy_header(2, CLIENT4, SERVER4)
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert header[12] == 0x21  # version 2, PROXY command
    assert header[13] == 0x11  # AF_INET, STREAM
    assert header[14:16] == b"\x00\x0c"
    assert header[16:] == bytes([192, 0, 2, 10, 127, 0, 0, 1]) + (51234).to_bytes(2, "big") + (443).to_bytes(2, "big")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("client,server", [(CLIENT4, SERVER4), (CLIENT6, SERVER6)])
def test_round_trip(version, client, server):
    header = build_proxy_header(version, client, server)
    parsed = parse_proxy_header(header + b"\x16\x03\x01rest")
    assert parsed.source == client
    assert parsed.size == len(header)


def test_mixed_families_use_unspecified_destination():
    header = build_proxy_header(1, CLIENT6, SERVER4)
    assert header == b"PROXY TCP6 2001:db8::10 :: 51234 443\r\n"


def test_ipv4_mapped_address_is_unmapped():
    assert Address.from_sockaddr(("::ffff:192.0.2.1", 80, 0, 0)) == Address("192.0.2.1", 80)


@pytest.mark.parametrize("version", [1, 2])
def test_every_prefix_asks_for_more(version):
    header = build_proxy_header(version, CLIENT6, SERVER6)
    for end in range(len(header)):
        assert may_start_proxy_header(header[:end])
        with pytest.raises(Incomplete) as more:
            parse_proxy_header(header[:end])
        assert end < more.value.needed <= len(header)


def test_unknown_and_local_carry_no_address():
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n").source is None
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    parsed = parse_proxy_header(local)
    assert parsed.source is None
    assert parsed.size == 16


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.10 127.0.0.1 99999 443\r\n",
        b"PROXY TCP4 not-an-ip 127.0.0.1 1 443\r\n",
        b"PROXY TCP5 192.0.2.10 127.0.0.1 1 443\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 1\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 1 443\n",
        b"PROXY " + b"x" * 120,
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),  # version 3
        b"\x16\x03\x01\x02\x00",
    ],
)
def test_rejects_invalid_headers(data):
    with pytest.raises(MalformedProxyHeader):
        parse_proxy_header(data)


def test_rejects_oversized_v2():
    data = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + (MAX_PROXY_HEADER_SIZE).to_bytes(2, "big")
    with pytest.raises(MalformedProxyHeader):
        parse_proxy_header(data)


def test_tls_and_http_do_not_look_like_proxy():
    assert not may_start_proxy_header(b"\x16\x03\x01")
    assert not may_start_proxy_header(b"GET / HTTP/1.1")
    assert not may_start_proxy_header(b"PROXZ")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data):
    for prefix in (b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n", b""):
        try:
            parse_proxy_header(prefix + data)
        except (Incomplete, MalformedProxyHeader):
            pass


def test_trusted_networks():
    from syncproxy.proxyheader import is_trusted, parse_trusted_networks

    networks = parse_trusted_networks(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert is_trusted(Address("10.1.2.3", 1), networks)
    assert is_trusted(Address("127.0.0.1", 1), networks)
    assert is_trusted(Address("::1", 1), networks)
    assert not is_trusted(Address("127.0.0.2", 1), networks)
    assert not is_trusted(Address("192.0.2.1", 1), networks)
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        parse_trusted_networks(["10.0.0.0/33"])
