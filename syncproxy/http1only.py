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

A third change keeps a connection from hanging. hypercorn hands request body chunks to the app
through a queue of 10 and waits while it is full. So once the app has responded without reading
the whole body (an early 413, 403 or 502), a client that kept sending blocked that connection
forever, and the final `http.disconnect` could block the app's own last send. A closed stream
now drops the body chunks still queued and accepts no more.

The same protocol class adds two things hypercorn lacks: a deadline for the request head once
its first byte has arrived (hypercorn bounds only the idle time before it), and error responses
whose body states what was wrong (hypercorn sends them empty).
"""

from __future__ import annotations

import asyncio
import contextlib
from http import HTTPStatus
from importlib.metadata import version

import h11
import hypercorn.asyncio.tcp_server
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
import hypercorn.protocol.h11
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol, H11SendableEvent
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

TESTED_HYPERCORN = ("0.18.",)

PREFACE_REJECTION = b"HTTP/2 is not supported here; this server speaks HTTP/1.1 only.\n"


class FrontEndConfig(Config):
    """hypercorn's settings plus the request head deadline, in seconds (None: no deadline)."""

    request_head_timeout: float | None = None


def error_text(status: int, config: Config) -> bytes:
    """Return the body of an error the protocol layer sends before any app sees the request."""
    if status == 400:
        text = "Bad request: the request is not valid HTTP/1.1."
    elif status == 408:
        timeout = getattr(config, "request_head_timeout", None)
        text = (f"Request timeout: the request line and headers did not arrive within "
                f"{timeout:g} s (setting request_head_timeout).")
    elif status == 431:
        text = (f"Request header fields too large: the request line and headers exceed "
                f"{config.h11_max_incomplete_size // 1024} KiB (setting max_head_kb).")
    elif status == 505:
        text = "HTTP version not supported: use HTTP/1.1."
    elif status == 501:
        text = "Not implemented: the only transfer coding accepted is chunked."
    else:
        text = "The request could not be served."
    return (text + "\n").encode("utf-8")


class ClosingHTTPStream(HTTPStream):
    """hypercorn's HTTP stream that stops queueing request body chunks once it is closed."""

    async def handle(self, event: StreamEvent) -> None:
        # Only after the app has sent its whole response: a stream closed by the client while
        # the response was still being sent is left to hypercorn's own handling.
        # NOTE: discarding on every close broke real-client downloads, for a reason not yet
        # found; a client that closes mid-response while still sending may hang its connection.
        if isinstance(event, StreamClosed) and self.state is ASGIHTTPState.CLOSED:
            self._discard_queued_body()
        await super().handle(event)

    def _discard_queued_body(self) -> None:
        # hypercorn 0.18 gives the stream only the queue's bound `put` method.
        queue = getattr(getattr(self, "app_put", None), "__self__", None)
        # Only a full queue can block; a queue with room keeps hypercorn's own behaviour.
        if isinstance(queue, asyncio.Queue) and queue.full():
            while not queue.empty():
                queue.get_nowait()


def without_upgrade(request: h11.Request) -> h11.Request:
    """Return the request without its Upgrade header, so hypercorn never starts a WebSocket.

    The sync protocol has no use for upgrades. Like `Upgrade: h2c`, the header is ignored and
    the request is served as plain HTTP/1.1 (RFC 9110 section 7.8).
    """
    headers = request.headers.raw_items()
    if not any(name.lower() == b"upgrade" for name, _ in headers):
        return request
    return h11.Request(
        method=request.method,
        target=request.target,
        headers=[(name, value) for name, value in headers if name.lower() != b"upgrade"],
        http_version=request.http_version,
    )


def head_size(request: h11.Request) -> int:
    """Return the size of a request line and headers as sent, give or take whitespace."""
    size = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n\r\n")
    for name, value in request.headers.raw_items():
        size += len(name) + len(value) + len(b": \r\n")
    return size


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
        if isinstance(event, h11.Response):
            # The head is held back and sent with the first piece of the body (or the end of
            # the message): one TLS record and one system call per small response, not two.
            try:
                self._held_head = self.connection.send(event)
            except h11.LocalProtocolError:
                if self.connection.their_state != h11.ERROR:
                    raise
            return
        if self._held_head is not None:
            head, self._held_head = self._held_head, None
            try:
                data = self.connection.send(event) or b""  # ConnectionClosed gives None
            except h11.LocalProtocolError:
                if self.connection.their_state != h11.ERROR:
                    raise
                data = b""
            await self.send(RawData(data=head + data))
            return
        await super()._send_h11_event(event)

    _held_head: bytes | None = None

    _head_deadline: asyncio.TimerHandle | None = None
    _head_expiry: asyncio.Task | None = None  # kept so that the task is not collected

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData):
            self._start_head_deadline(event)
        elif isinstance(event, Closed):
            self._cancel_head_deadline()
        await super().handle(event)
        if isinstance(event, Closed):
            # The client has gone. hypercorn's TCPServer would keep the connection, and its
            # slot under max_connections, until the keep-alive timer ran out; closing from
            # here stops that timer at once.
            await self.send(Closed())

    def _start_head_deadline(self, event: RawData) -> None:
        timeout = getattr(self.config, "request_head_timeout", None)
        waiting_for_head = (self.stream is None and isinstance(self.connection, h11.Connection)
                            and self.connection.their_state is h11.IDLE)
        if timeout and event.data and waiting_for_head and self._head_deadline is None:
            # A timer, not a task: most heads arrive in time, and creating and cancelling a
            # task for every request showed up in profiles of small requests.
            self._head_deadline = asyncio.get_running_loop().call_later(
                timeout, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        self._head_expiry = asyncio.create_task(self._expire_head())

    async def _expire_head(self) -> None:
        if self.stream is None and self.connection.our_state is h11.IDLE:
            with contextlib.suppress(h11.LocalProtocolError):
                await self._send_error_response(408)
        await self.send(Closed())

    async def _create_stream(self, request: h11.Request) -> None:
        self._cancel_head_deadline()
        # h11 checks the size only of a head that is still incomplete, so a large head that
        # arrives in one read would pass. This check applies the limit to complete heads too.
        if head_size(request) > self.config.h11_max_incomplete_size:
            await self._send_error_response(431)
            await self.send(Closed())
            return
        if request.http_version not in (b"1.0", b"1.1"):
            await self._send_error_response(505)
            await self.send(Closed())
            return
        await super()._create_stream(without_upgrade(request))

    async def _send_error_response(self, status_code: int) -> None:
        body = error_text(status_code, self.config)
        await self._send_h11_event(
            h11.Response(
                status_code=status_code,
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *self.config.response_headers("h11"),
                ],
            )
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

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
    hypercorn.protocol.h11.HTTPStream = ClosingHTTPStream
