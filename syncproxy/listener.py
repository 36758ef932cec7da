"""The front end's accept loop: every connection is looked at before TLS, then handed to hypercorn.

hypercorn's own `serve()` wraps sockets in TLS as soon as they are accepted. syncproxy accepts
them itself so it can decide first, from the bytes the client sent. `_classify` is the one place
that decides, in this order:
- a PROXY protocol header is read and consumed, but only from a peer in `proxy_protocol_from`.
  Its client address then replaces the peer's in logs and X-Forwarded-For;
- plain HTTP sent to the TLS port gets a readable 400 telling it to use https; anything else that
  does not start with a TLS handshake record (0x16) is closed;
- when routes are configured, the whole ClientHello is peeked and its server name picks the
  route; a malformed, oversized or slow ClientHello closes only that connection;
- a connection routed elsewhere is spliced there unread (`passthrough`); every other one goes
  through the TLS handshake to hypercorn's `TCPServer` with the HTTP/1.1-only protocol from
  `http1only`.
Everything before the split is peeked, never consumed, except the PROXY header.

Two limits live here because they concern connections, not requests: past `max_connections`
a new connection is closed at once (a plain-HTTP listener first sends a 503), and a connection
whose client reads nothing of a pending response for `client_idle_timeout` is aborted, since
closing it politely would wait for that client forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.utils import wrap_app

from . import http1only
from .clienthello import MAX_CLIENT_HELLO_SIZE, parse_client_hello
from .passthrough import PassthroughOptions, pass_through
from .peek import Incomplete, PeekClosed, peek_parsed
from .proxyheader import (
    MAX_PROXY_HEADER_SIZE,
    Address,
    IPNetwork,
    V1_SIGNATURE,
    V2_SIGNATURE,
    ProxyHeader,
    is_trusted,
    may_start_proxy_header,
    parse_proxy_header,
)
from .routing import Route, RoutingTable
from .metrics import Metrics

# Bytes read from a client connection at a time (hypercorn reads 64 KiB).
READ_BYTES = 256 * 1024

log = logging.getLogger("syncproxy.listener")

TLS_HANDSHAKE_RECORD = 0x16
FIRST_BYTES_TIMEOUT = 10.0
HTTP_METHOD_PREFIXES = (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN",
                        b"TRAC", b"PRI ")

TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 5\r\n"
    b"Content-Length: 64\r\n"
    b"\r\n"
    b"Too many connections (setting max_connections); try again soon.\n"
)
assert len(TOO_MANY_CONNECTIONS.split(b"\r\n\r\n", 1)[1]) == 64
# Rejections are logged at most this often, with the count since the last line.
REJECTION_LOG_INTERVAL = 10.0

_PLAIN_HTTP_BODY = b"This port speaks HTTPS. Use an https:// URL for this server, not http://.\n"
PLAIN_HTTP_ON_TLS_PORT = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_PLAIN_HTTP_BODY)).encode() + b"\r\n"
    b"\r\n" + _PLAIN_HTTP_BODY
)


def hypercorn_config(keep_alive_timeout: float, max_head_bytes: int = 64 * 1024,
                     request_head_timeout: float | None = None) -> Config:
    """Return the hypercorn settings the front end runs with."""
    config = http1only.FrontEndConfig()
    config.keep_alive_timeout = keep_alive_timeout
    config.request_head_timeout = request_head_timeout
    config.h11_max_incomplete_size = max_head_bytes
    config.include_server_header = False
    config.include_date_header = True
    config.accesslog = None  # syncproxy writes its own access log, without query strings
    config.errorlog = logging.getLogger("syncproxy.hypercorn")
    config.graceful_timeout = 5.0
    return config


class _TCPServer(TCPServer):
    """hypercorn's connection handler, with larger reads, quiet when a client leaves early."""

    async def _read_data(self) -> None:
        # hypercorn's own loop, reading READ_BYTES instead of 64 KiB at a time. Each read is
        # parsed and passed on as one message, so an upload makes a quarter as many messages.
        while not self.reader.at_eof():
            try:
                data = await asyncio.wait_for(self.reader.read(READ_BYTES),
                                              self.config.read_timeout)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                break
            await self.protocol.handle(RawData(data))
        await self.protocol.handle(Closed())

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData) and self.writer.transport.is_closing():
            # asyncio's TLS transport raises AttributeError, not ConnectionError, when written to
            # after the connection is lost. hypercorn catches only ConnectionError and RuntimeError,
            # so every client that left with a request in flight logged an error with a traceback.
            await self.protocol.handle(Closed())
            return
        await super().protocol_send(event)


class Listener:
    """Accept connections on one address and serve them with hypercorn."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        ssl_context: Callable[[], ssl.SSLContext] | None,
        config: Config,
        handshake_timeout: float = 30.0,
        routing: RoutingTable | None = None,
        passthrough: PassthroughOptions = PassthroughOptions(),
        trusted_proxies: tuple[IPNetwork, ...] = (),
        max_connections: int | None = None,
        write_idle_timeout: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        http1only.install()
        self.routing = routing
        self.passthrough = passthrough
        self.trusted_proxies = trusted_proxies
        self.max_connections = max_connections
        self.write_idle_timeout = write_idle_timeout
        self.metrics = metrics
        self._rejected_since_log = 0
        self._last_rejection_log = 0.0
        self.app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.config = config
        self.handshake_timeout = handshake_timeout
        self.context = WorkerContext(None)
        self.state: dict[str, Any] = {}
        self.connections: set[asyncio.Task] = set()
        self.spliced: set[asyncio.Task] = set()
        self._socket: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None

    @property
    def accepting(self) -> bool:
        return self._accept_task is not None and not self._accept_task.done()

    @property
    def bound_port(self) -> int:
        assert self._socket is not None
        return self._socket.getsockname()[1]

    def open(self) -> None:
        """Bind and listen; raise OSError with a readable message if the address is taken."""
        infos = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" serves IPv4 clients too, as mapped addresses.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(address)
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"cannot listen on {self.host}:{self.port}: "
                                       f"{error.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock

    def start(self) -> None:
        if self._socket is None:
            self.open()
        self._accept_task = asyncio.create_task(self._accept_loop(), name="accept")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._socket)
            except OSError as error:
                # EMFILE and friends: keep serving the connections we have, try again shortly.
                log.error("accept failed error=%r", str(error))
                await asyncio.sleep(0.1)
                continue
            if self.max_connections is not None and len(self.connections) >= self.max_connections:
                self._reject_connection(sock)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_connection(sock))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def _serve_connection(self, sock: socket.socket) -> None:
        try:
            arrival = await self._classify(sock)
        # ValueError covers MalformedProxyHeader and MalformedClientHello. TimeoutError is an
        # OSError, so it must be caught first.
        except (TimeoutError, ValueError) as error:
            log.info("connection closed before tls client=%s error=%r", _peer(sock), str(error))
            sock.close()
            return
        except OSError as error:
            # A TCP health probe connects and closes at once; that is not worth an info line.
            log.debug("connection closed before tls client=%s error=%r", _peer(sock), str(error))
            sock.close()
            return
        if arrival is None:
            return
        if isinstance(arrival.decision, Route):
            task = asyncio.current_task()
            assert task is not None
            self.spliced.add(task)
            try:
                await pass_through(sock, arrival.decision, client_address=arrival.client,
                                   server_name=arrival.server_name, options=self.passthrough)
            finally:
                self.spliced.discard(task)
            return

        try:
            context = self.ssl_context() if self.ssl_context is not None else None
            reader, writer = await self._open_streams(
                sock, context, arrival.client if arrival.proxied else None)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError) as error:
            log.debug("connection closed before http error=%r", str(error))
            sock.close()
            return
        watchdog = None
        if self.write_idle_timeout is not None:
            watchdog = asyncio.create_task(self._abort_stalled_reader(writer.transport))
        try:
            await _TCPServer(self.app, asyncio.get_running_loop(), self.config, self.context,
                            self.state, reader, writer)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _reject_connection(self, sock: socket.socket) -> None:
        """Close a connection over the limit; a plain-HTTP listener sends the reason first."""
        if self.ssl_context is None:
            with contextlib.suppress(OSError):
                sock.send(TOO_MANY_CONNECTIONS)
        sock.close()
        if self.metrics is not None:
            self.metrics.rejected_connections.labels(reason="max_connections").inc()
        self._rejected_since_log += 1
        now = time.monotonic()
        if now - self._last_rejection_log >= REJECTION_LOG_INTERVAL:
            log.warning("connection limit reached, closing new connections limit=%d "
                        "closed=%d", self.max_connections, self._rejected_since_log)
            self._rejected_since_log = 0
            self._last_rejection_log = now

    async def _abort_stalled_reader(self, transport: asyncio.BaseTransport) -> None:
        """Abort the connection once the client has read nothing for `write_idle_timeout`."""
        assert self.write_idle_timeout is not None
        loop = asyncio.get_running_loop()
        last_size = 0
        unchanged_since = loop.time()
        while not transport.is_closing():
            await asyncio.sleep(min(1.0, self.write_idle_timeout / 4))
            size = transport.get_write_buffer_size()
            if size == 0 or size != last_size:
                last_size = size
                unchanged_since = loop.time()
                continue
            if loop.time() - unchanged_since >= self.write_idle_timeout:
                log.info("client stopped reading, aborting connection client=%s pending=%d "
                         "idle_s=%g", _peer_of(transport), size, self.write_idle_timeout)
                # A reset, not a FIN: otherwise the kernel keeps the unsent data and keeps
                # offering it to a client that does not read, for minutes.
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                transport.abort()
                return

    async def _classify(self, sock: socket.socket) -> _Arrival | None:
        """Decide where a connection goes; return None if it was answered or closed here."""
        deadline = time.monotonic() + FIRST_BYTES_TIMEOUT
        arrival = _Arrival(client=Address.from_sockaddr(sock.getpeername()))
        if self.trusted_proxies and is_trusted(arrival.client, self.trusted_proxies):
            await self._read_proxy_header(sock, arrival, deadline)
        if self.ssl_context is None:
            return arrival

        first = await peek_parsed(sock, _some_bytes, deadline=deadline, max_size=8)
        if first[0] != TLS_HANDSHAKE_RECORD:
            self._reject_not_tls(sock, first, arrival.client)
            return None
        if self.routing is None or not self.routing.splices:
            return arrival

        hello = await peek_parsed(sock, parse_client_hello, deadline=deadline,
                                  max_size=MAX_CLIENT_HELLO_SIZE)
        arrival.server_name = hello.server_name
        arrival.decision = self.routing.decide(hello.server_name)
        return arrival

    async def _read_proxy_header(self, sock: socket.socket, arrival: _Arrival,
                                 deadline: float) -> None:
        """Consume a PROXY header if the trusted peer sent one; a peer may also connect without."""
        header = await peek_parsed(sock, _proxy_header_or_none, deadline=deadline,
                                   max_size=MAX_PROXY_HEADER_SIZE)
        if header is None:
            return
        consumed = 0
        while consumed < header.size:
            # The bytes are queued already (peeked above), so this recv returns at once.
            chunk = sock.recv(header.size - consumed)
            if not chunk:
                raise PeekClosed("connection closed inside its PROXY protocol header")
            consumed += len(chunk)
        if header.source is not None:
            log.debug("proxy protocol peer=%s client=%s", arrival.client, header.source)
            arrival.client = header.source
            arrival.proxied = True

    def _reject_not_tls(self, sock: socket.socket, first: bytes, client: Address) -> None:
        """Answer plain HTTP with a readable 400; close anything else."""
        if first.startswith((V1_SIGNATURE, V2_SIGNATURE[:8])):
            log.warning("connection closed: proxy protocol header from untrusted peer client=%s; "
                        "list the sender in proxy_protocol_from to accept it", client.host)
        elif first.startswith(HTTP_METHOD_PREFIXES) or first[:4].isalpha():
            with contextlib.suppress(OSError):
                sock.sendall(PLAIN_HTTP_ON_TLS_PORT)
                sock.shutdown(socket.SHUT_WR)
            log.info("plain http on tls port client=%s", client.host)
        else:
            log.info("connection closed: not tls client=%s first_byte=0x%02x", client.host,
                     first[0])
        sock.close()

    async def _open_streams(
        self, sock: socket.socket, context: ssl.SSLContext | None,
        reported_client: Address | None = None,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=context,
            ssl_handshake_timeout=self.handshake_timeout if context else None,
        )
        if reported_client is not None:
            writer: asyncio.StreamWriter = _ReportedPeerWriter(transport, protocol, reader, loop,
                                                               reported_client)
        else:
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    async def close(self, grace: float) -> None:
        """Stop accepting, let connections finish their requests for up to `grace` seconds."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._socket is not None:
            self._socket.close()
        # Tells hypercorn to close each keep-alive connection after its current request.
        await self.context.terminated.set()
        pending: set[asyncio.Task] = set()
        served = self.connections - self.spliced
        if served:
            _, pending = await asyncio.wait(served, timeout=grace)
        if pending:
            log.warning("closed connections still busy after grace period count=%d",
                        len(pending))
        # A browser may keep an idle HTTP/2 connection to the passed-through site open for
        # minutes. Waiting for it would hold the stop for the whole grace period, and the
        # browser reconnects anyway, so spliced connections end once the served ones have.
        spliced = {task for task in self.spliced if not task.done()}
        if spliced:
            log.info("closing passed-through connections count=%d", len(spliced))
        for task in pending | spliced:
            task.cancel()
        if pending or spliced:
            await asyncio.wait(pending | spliced, timeout=5)


@dataclasses.dataclass
class _Arrival:
    """The facts `_classify` gathered about a connection from peeked bytes and a PROXY header."""

    client: Address
    proxied: bool = False
    server_name: str | None = None
    decision: Route | None = None


def _proxy_header_or_none(data: bytes) -> ProxyHeader | None:
    if not data:
        raise Incomplete(1)
    if not may_start_proxy_header(data):
        return None
    return parse_proxy_header(data)


def _some_bytes(data: bytes) -> bytes:
    if not data:
        raise Incomplete(1)
    return data


class _ReportedSocket:
    """A stand-in for the transport's socket that reports the PROXY header's client as peer."""

    def __init__(self, sock: Any, client: Address) -> None:
        self._sock = sock
        self._client = client
        self.family = socket.AF_INET6 if ":" in client.host else socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return (self._client.host, self._client.port)

    def getsockname(self) -> Any:
        return self._sock.getsockname()


class _ReportedPeerWriter(asyncio.StreamWriter):
    """A StreamWriter whose peer is the client named in a trusted PROXY header.

    hypercorn takes the ASGI scope's client from `get_extra_info("socket").getpeername()`,
    and the proxy app's logs and X-Forwarded-For come from that scope.
    """

    def __init__(self, transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol,
                 reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop,
                 client: Address) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._client = client

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = super().get_extra_info(name, default)
        if name == "socket" and value is not None:
            return _ReportedSocket(value, self._client)
        if name == "peername":
            return (self._client.host, self._client.port)
        return value


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "-"


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "-"
