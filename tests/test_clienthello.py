"""ClientHello parsing on real hellos made by OpenSSL and on broken input."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncproxy.clienthello import MAX_CLIENT_HELLO_SIZE, MalformedClientHello, parse_client_hello
from syncproxy.peek import Incomplete


def openssl_client_hello(server_name: str | None) -> bytes:
    """Return the first flight Python's ssl module sends for ``server_name``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, record_size: int) -> bytes:
    """Split the handshake payload of a one-record hello into records of ``record_size`` bytes."""
    header, payload = hello[:5], hello[5:]
    assert struct.unpack("!H", header[3:5])[0] == len(payload)
    records = b""
    for start in range(0, len(payload), record_size):
        fragment = payload[start : start + record_size]
        records += header[:3] + struct.pack("!H", len(fragment)) + fragment
    return records


def test_reads_server_name():
    hello = openssl_client_hello("sync.test")
    parsed = parse_client_hello(hello)
    assert parsed.server_name == "sync.test"
    assert parsed.size == len(hello)


def test_no_sni_gives_none():
    assert parse_client_hello(openssl_client_hello(None)).server_name is None


def test_name_is_lowercased_without_trailing_dot():
    assert parse_client_hello(openssl_client_hello("WWW.Test.")).server_name == "www.test"


def test_trailing_bytes_after_hello_ignored():
    hello = openssl_client_hello("sync.test")
    assert parse_client_hello(hello + b"\x17\x03\x03garbage").server_name == "sync.test"


def test_every_prefix_asks_for_more():
    hello = openssl_client_hello("www.test")
    for end in range(len(hello)):
        with pytest.raises(Incomplete) as more:
            parse_client_hello(hello[:end])
        assert end < more.value.needed <= len(hello), end


@pytest.mark.parametrize("record_size", [1, 2, 3, 7, 100, 511])
def test_hello_split_over_records(record_size):
    hello = refragment(openssl_client_hello("sync.test"), record_size)
    assert parse_client_hello(hello).server_name == "sync.test"
    for end in range(0, len(hello), 97):
        with pytest.raises(Incomplete) as more:
            parse_client_hello(hello[:end])
        assert end < more.value.needed <= len(hello)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: sync.test\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x80\x2e\x01\x03\x01",  # SSL 2.0-compatible hello
        b"\x17\x03\x03\x00\x05hello",  # application data, not a handshake
        b"\x16\x02\x00\x00\x05hello",  # record version 2.0
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x40\x01",  # record longer than 2^14
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
    ],
)
def test_rejects_what_is_not_a_client_hello(data):
    with pytest.raises(MalformedClientHello):
        parse_client_hello(data)


def test_rejects_wrong_type_before_record_completes():
    with pytest.raises(MalformedClientHello):
        parse_client_hello(b"\x16\x03\x01\x02\x00\x0b\x00\x01")


def test_rejects_oversized_hello():
    length = MAX_CLIENT_HELLO_SIZE
    data = b"\x16\x03\x01\x40\x00\x01" + length.to_bytes(3, "big")
    with pytest.raises(MalformedClientHello):
        parse_client_hello(data)


def build_hello(extensions: bytes, *, session_id: bytes = b"") -> bytes:
    body = b"\x03\x03" + bytes(32) + bytes([len(session_id)]) + session_id
    body += b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(extensions)) + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(message)) + message


def sni_extension(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes([kind]) + struct.pack("!H", len(name)) + name for kind, name in entries)
    data = struct.pack("!H", len(names)) + names
    return struct.pack("!HH", 0, len(data)) + data


def test_handmade_hello_parses():
    assert parse_client_hello(build_hello(sni_extension((0, b"sync.test")))).server_name == "sync.test"


@pytest.mark.parametrize(
    "extensions",
    [
        sni_extension((0, b"a.test"), (0, b"b.test")),  # two host names
        sni_extension((0, b"a.test")) + sni_extension((0, b"a.test")),  # extension twice
        sni_extension((0, b"bad name.test")),
        sni_extension((0, b"\xffbad.test")),
        sni_extension((0, b"")),
        sni_extension((0, b"-bad.test")),
        struct.pack("!HH", 0, 10) + b"\x00",  # extension runs past the block
    ],
)
def test_rejects_bad_server_name_extension(extensions):
    with pytest.raises(MalformedClientHello):
        parse_client_hello(build_hello(extensions))


def test_rejects_long_session_id():
    with pytest.raises(MalformedClientHello):
        parse_client_hello(build_hello(b"", session_id=bytes(33)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data):
    try:
        parse_client_hello(data)
    except (Incomplete, MalformedClientHello):
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_real_hello_never_crashes(data):
    hello = bytearray(openssl_client_hello("sync.test"))
    for _ in range(data.draw(st.integers(1, 4))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    try:
        parse_client_hello(bytes(hello))
    except (Incomplete, MalformedClientHello):
        pass
