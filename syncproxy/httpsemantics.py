"""What HTTP says about forwarding, written once as data.

A proxy forwards end-to-end headers unchanged and drops hop-by-hop ones (RFC 9110 section 7.6.1):
the fixed list below, plus every header that the message's own `Connection` header names.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset({
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
})

# Set by the front end itself; a client's own values are never trusted or passed on.
FORWARDING_HEADERS = frozenset({
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
    b"forwarded",
})

# Response headers that hypercorn writes itself for every response.
SERVER_WRITTEN = frozenset({b"date", b"server"})


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Return the header names listed in the `Connection` header, lowercased."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return tokens


def end_to_end(
    headers: Iterable[tuple[bytes, bytes]], also_drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """Return `headers` without hop-by-hop headers and without the names in `also_drop`."""
    headers = list(headers)
    drop = HOP_BY_HOP | also_drop | connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def has_conflicting_framing(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Return True if a request carries both Transfer-Encoding and Content-Length.

    RFC 9112 section 6.1 lets a server reject such a request, and a proxy should: a server
    behind it that reads the other header would split the stream differently (request
    smuggling).
    """
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names
