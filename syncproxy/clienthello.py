"""Read the server name (SNI) from a TLS ClientHello without consuming it.

The front end must decide where a connection goes before any TLS library
touches it, so this module parses the raw bytes a client sent first. It is
pure: it takes the bytes peeked so far and either returns the result, raises
the count of bytes it needs before it can go on, or rejects the input.

What it accepts (RFC 8446 section 4.1.2, RFC 5246 section 6.2, RFC 6066
section 3):

- one ClientHello handshake message, carried in one or more TLS records of
  content type 22 (handshake); a record may hold as little as one byte of it;
- record versions 3.x, as every TLS version writes them;
- at most one ``server_name`` extension with at most one ``host_name`` entry,
  a DNS name of letters, digits, hyphens, underscores and dots (an IP literal or anything
  else is invalid there and rejected).

The old SSL 2.0-compatible hello (first byte 0x80) carries no extensions and
is rejected like any other input that is not a TLS handshake.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .peek import Incomplete

__all__ = [
    "MAX_CLIENT_HELLO_SIZE",
    "ClientHello",
        "MalformedClientHello",
    "parse_client_hello",
]

# A browser's ClientHello with post-quantum key shares and padding is about
# 2 KB (an estimate for current Chrome and Firefox). The cap leaves ample room
# and bounds what one slow client can make the kernel buffer for it.
MAX_CLIENT_HELLO_SIZE = 16 * 1024

_RECORD_HEADER = struct.Struct("!BBBH")
_RECORD_HEADER_SIZE = _RECORD_HEADER.size
_CONTENT_TYPE_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_MAX_RECORD_PAYLOAD = 2**14
_EXTENSION_SERVER_NAME = 0
_NAME_TYPE_HOST_NAME = 0
_MAX_DNS_NAME = 253
# Underscores are not valid in host names but appear in real internal names;
# accepting them routes such a client instead of closing its connection.
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class MalformedClientHello(ValueError):
    """The bytes are not the start of a valid TLS ClientHello."""


@dataclass(frozen=True)
class ClientHello:
    """The fields of a ClientHello that routing uses.

    ``server_name`` is the SNI host name in lower case without a trailing dot,
    or None when the client sent none. ``size`` counts the record bytes that
    carried the message.
    """

    server_name: str | None
    size: int


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello:
    """Parse the ClientHello at the start of ``data``.

    Raises :class:`Incomplete` when ``data`` ends before the message does and
    :class:`MalformedClientHello` when it cannot be a ClientHello, including
    one larger than :data:`MAX_CLIENT_HELLO_SIZE`.
    """
    message, size = _reassemble_handshake(memoryview(data))
    return ClientHello(server_name=_server_name(message), size=size)


def _reassemble_handshake(data: memoryview) -> tuple[bytes, int]:
    """Join record payloads until one whole handshake message is present."""
    payload = bytearray()
    offset = 0
    message_length: int | None = None

    while True:
        if len(data) < offset + _RECORD_HEADER_SIZE:
            raise Incomplete(offset + _RECORD_HEADER_SIZE)
        content_type, major, _minor, length = _RECORD_HEADER.unpack_from(data, offset)
        if content_type != _CONTENT_TYPE_HANDSHAKE:
            raise MalformedClientHello(f"record content type {content_type} is not handshake (22)")
        if major != 3:
            raise MalformedClientHello(f"record version major {major} is not 3")
        if length == 0 or length > _MAX_RECORD_PAYLOAD:
            raise MalformedClientHello(f"record length {length} is outside 1..{_MAX_RECORD_PAYLOAD}")

        record_end = offset + _RECORD_HEADER_SIZE + length
        if record_end > MAX_CLIENT_HELLO_SIZE:
            raise MalformedClientHello(f"ClientHello exceeds {MAX_CLIENT_HELLO_SIZE} bytes")

        # Validate the handshake header as soon as its bytes are present, so a
        # wrong message type is rejected without waiting for the whole record.
        available = min(len(data), record_end)
        payload += data[offset + _RECORD_HEADER_SIZE : available]
        if payload and payload[0] != _HANDSHAKE_CLIENT_HELLO:
            raise MalformedClientHello(f"handshake type {payload[0]} is not ClientHello (1)")
        if message_length is None and len(payload) >= 4:
            message_length = int.from_bytes(payload[1:4], "big")
            if message_length + 4 > MAX_CLIENT_HELLO_SIZE:
                raise MalformedClientHello(f"ClientHello length {message_length} exceeds {MAX_CLIENT_HELLO_SIZE} bytes")

        if message_length is not None and len(payload) >= message_length + 4:
            return bytes(payload[4 : 4 + message_length]), record_end
        if len(data) < record_end:
            # Ask only for bytes the client must send, never the rest of the
            # record, so a waiting reader cannot stall on bytes that never come.
            known_total = 4 if message_length is None else message_length + 4
            raise Incomplete(min(record_end, len(data) + known_total - len(payload)))
        offset = record_end


class _Reader:
    """Bounds-checked reads over one ClientHello body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, field: str) -> bytes:
        if self.pos + count > len(self.data):
            raise MalformedClientHello(f"{field} runs past the end of the ClientHello")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def integer(self, width: int, field: str) -> int:
        return int.from_bytes(self.take(width, field), "big")

    def vector(self, length_width: int, field: str) -> bytes:
        return self.take(self.integer(length_width, f"{field} length"), field)

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def _server_name(message: bytes) -> str | None:
    body = _Reader(message)
    body.take(2, "legacy_version")
    body.take(32, "random")
    if len(body.vector(1, "legacy_session_id")) > 32:
        raise MalformedClientHello("legacy_session_id is longer than 32 bytes")
    cipher_suites = body.vector(2, "cipher_suites")
    if not cipher_suites or len(cipher_suites) % 2:
        raise MalformedClientHello(f"cipher_suites length {len(cipher_suites)} is not a positive even number")
    if not body.vector(1, "legacy_compression_methods"):
        raise MalformedClientHello("legacy_compression_methods is empty")
    if body.at_end():
        return None  # a hello without extensions (TLS 1.2 and older)

    extensions = _Reader(body.vector(2, "extensions"))
    if not body.at_end():
        raise MalformedClientHello("bytes follow the extensions block")
    seen: set[int] = set()
    server_name: str | None = None
    while not extensions.at_end():
        extension_type = extensions.integer(2, "extension type")
        extension_data = extensions.vector(2, f"extension {extension_type}")
        if extension_type in seen:
            raise MalformedClientHello(f"extension {extension_type} appears twice")
        seen.add(extension_type)
        if extension_type == _EXTENSION_SERVER_NAME:
            server_name = _host_name(extension_data)
    return server_name


def _host_name(extension_data: bytes) -> str | None:
    names = _Reader(extension_data)
    server_name_list = _Reader(names.vector(2, "server_name_list"))
    if not names.at_end():
        raise MalformedClientHello("bytes follow server_name_list")

    host_name: str | None = None
    while not server_name_list.at_end():
        name_type = server_name_list.integer(1, "server name type")
        name = server_name_list.vector(2, "server name")
        if name_type != _NAME_TYPE_HOST_NAME:
            continue  # RFC 6066 defines no other type; clients must not send one we cannot skip
        if host_name is not None:
            raise MalformedClientHello("server_name carries two host names")
        host_name = _normalize_host_name(name)
    return host_name


def _normalize_host_name(raw: bytes) -> str:
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise MalformedClientHello("server name is not ASCII") from None
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_DNS_NAME:
        raise MalformedClientHello(f"server name length {len(raw)} is outside 1..{_MAX_DNS_NAME}")
    if not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise MalformedClientHello(f"server name {name!r} is not a DNS host name")
    return name
