"""Keep hypercorn on HTTP/1.1: the one place where syncproxy changes hypercorn's behaviour.

hypercorn 0.18 leaves HTTP/1.1 for HTTP/2 in two ways that no setting turns off, even when ALPN
offers only http/1.1:
- a request with `Upgrade: h2c` and no body gets `101 Switching Protocols` and HTTP/2 SETTINGS;
- a connection that opens with the prior-knowledge preface `PRI * HTTP/2.0` becomes HTTP/2.
Old OkHttp clients (AnkiDroid 2.15 and earlier) fail media sync over HTTP/2, so here the upgrade
header is ignored (the request is served as HTTP/1.1) and the preface gets a 400 and a close.

Both paths live in `hypercorn/protocol/h11.py` (`H11Protocol._check_protocol`) and
`hypercorn/protocol/__init__.py` (`ProtocolWrapper`). Checked against hypercorn 0.18.0; the
pyproject pin keeps other versions out until this module is checked against them.
"""

from __future__ import annotations

from http import HTTPStatus
from importlib.metadata import version

import h11
import hypercorn.asyncio.tcp_server
from hypercorn.events import Closed, Event
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol, H11SendableEvent

TESTED_HYPERCORN = ("0.18.",)

PREFACE_REJECTION = b"HTTP/2 is not supported here; this server speaks HTTP/1.1 only.\n"


class Http1OnlyProtocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without its two switches to HTTP/2."""

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        # hypercorn sends status lines with an empty reason phrase ("HTTP/1.1 200 "). RFC 9112
        # allows that, but some HTTP/1.1 clients reject it, so the standard phrase is added.
        if isinstance(event, (h11.Response, h11.InformationalResponse)) and not event.reason:
            try:
                phrase = HTTPStatus(event.status_code).phrase.encode("ascii")
            except ValueError:
                phrase = b""
            event = type(event)(status_code=event.status_code, headers=event.headers,
                                reason=phrase)
        await super()._send_h11_event(event)

    async def _check_protocol(self, event: h11.Request) -> None:
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            raise H2ProtocolAssumedError(b"")
        # An `Upgrade: h2c` header is deliberately not acted on: the request continues as an
        # ordinary HTTP/1.1 request, which RFC 9110 section 7.8 allows a server to do.

    async def reject_h2_preface(self) -> None:
        await self._send_h11_event(
            h11.Response(
                status_code=400,
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(PREFACE_REJECTION)).encode()),
                    (b"connection", b"close"),
                ],
            )
        )
        await self._send_h11_event(h11.Data(data=PREFACE_REJECTION))
        await self._send_h11_event(h11.EndOfMessage())


class Http1OnlyProtocolWrapper(ProtocolWrapper):
    """hypercorn's protocol wrapper that always speaks HTTP/1.1, whatever ALPN chose."""

    def __init__(self, app, config, context, task_group, state, ssl, client, server, send,
                 alpn_protocol=None) -> None:  # noqa: ANN001 - hypercorn's own signature
        self.app = app
        self.config = config
        self.context = context
        self.task_group = task_group
        self.ssl = ssl
        self.client = client
        self.server = server
        self.send = send
        self.state = state
        self.protocol = Http1OnlyProtocol(
            app, config, context, task_group, state, ssl, client, server, send
        )

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError:
            await self.protocol.reject_h2_preface()
            await self.send(Closed())


def install() -> None:
    """Make hypercorn's asyncio TCP server use the HTTP/1.1-only protocol wrapper."""
    installed = version("hypercorn")
    if not installed.startswith(TESTED_HYPERCORN):
        raise RuntimeError(
            f"syncproxy's HTTP/1.1-only patch was tested with hypercorn "
            f"{', '.join(v + 'x' for v in TESTED_HYPERCORN)}, not {installed}; "
            f"install a tested version (pip install 'hypercorn>=0.18,<0.19')"
        )
    hypercorn.asyncio.tcp_server.ProtocolWrapper = Http1OnlyProtocolWrapper
