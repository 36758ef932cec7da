"""The front end's accept loop: every connection is looked at before TLS, then handed to hypercorn.

hypercorn's own `serve()` wraps sockets in TLS as soon as they are accepted. syncproxy accepts
them itself so it can decide first, from the bytes the client sent (peeked, not consumed):
- a TLS ClientHello (first byte 0x16) goes through the TLS handshake to hypercorn;
- plain HTTP sent to the TLS port gets a readable 400 that says to use https;
- anything else is closed.
After that, each connection is served by hypercorn's `TCPServer` with the HTTP/1.1-only protocol
from `http1only`.

Two limits live here because they concern connections, not requests: past `max_connections`
a new connection is closed at once (a plain-HTTP listener first sends a 503), and a connection
whose client reads nothing of a pending response for `client_idle_timeout` is aborted, since
closing it politely would wait for that client forever.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from hypercorn.utils import wrap_app

from . import http1only
from .metrics import Metrics

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

PLAIN_HTTP_ON_TLS_PORT = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 77\r\n"
    b"\r\n"
    b"This port speaks HTTPS. Use an https:// URL for this server, not http://.\r\n\r\n"
)
assert PLAIN_HTTP_ON_TLS_PORT.endswith(b"\r\n" * 2) and len(
    PLAIN_HTTP_ON_TLS_PORT.split(b"\r\n\r\n", 1)[1]) == 77


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


async def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Wait until `sock` has data (or EOF); return False on timeout."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def peek(sock: socket.socket, size: int, timeout: float) -> bytes:
    """Return up to `size` bytes the client sent, without consuming them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await wait_readable(sock, remaining):
                raise TimeoutError("no data from client") from None


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
        max_connections: int | None = None,
        write_idle_timeout: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        http1only.install()
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
            context = None
            if self.ssl_context is not None:
                context = self.ssl_context()
                if not await self._is_tls(sock):
                    return
            reader, writer = await self._open_streams(sock, context)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError) as error:
            log.debug("connection closed before http error=%r", str(error))
            sock.close()
            return
        watchdog = None
        if self.write_idle_timeout is not None:
            watchdog = asyncio.create_task(self._abort_stalled_reader(writer.transport))
        try:
            await TCPServer(self.app, asyncio.get_running_loop(), self.config, self.context,
                            self.state, reader, writer)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _reject_connection(self, sock: socket.socket) -> None:
        """Close a connection over the limit; a plain-HTTP listener says why first."""
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

    async def _is_tls(self, sock: socket.socket) -> bool:
        """Answer or close connections that do not start with a TLS handshake."""
        first = await peek(sock, 8, FIRST_BYTES_TIMEOUT)
        if first and first[0] == TLS_HANDSHAKE_RECORD:
            return True
        if first.startswith(HTTP_METHOD_PREFIXES) or first[:4].isalpha():
            with contextlib.suppress(OSError):
                sock.sendall(PLAIN_HTTP_ON_TLS_PORT)
                sock.shutdown(socket.SHUT_WR)
            log.info("plain http on tls port client=%s", _peer(sock))
        sock.close()
        return False

    async def _open_streams(
        self, sock: socket.socket, context: ssl.SSLContext | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=context,
            ssl_handshake_timeout=self.handshake_timeout if context else None,
        )
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
        if self.connections:
            done, pending = await asyncio.wait(set(self.connections), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("closed connections still busy after grace period count=%d",
                            len(pending))
                await asyncio.wait(pending, timeout=5)


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "-"


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "-"
