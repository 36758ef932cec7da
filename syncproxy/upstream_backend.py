"""The network layer under httpcore, on asyncio's own transports instead of anyio's streams.

httpcore talks to the network through a pluggable backend (`httpcore.AsyncNetworkBackend`). Its
default on asyncio goes through anyio, which costs a cancel scope per read and write and a
`getpeername` and `select` system call for every pooled connection whenever the pool looks for an
idle one ("is_readable"). On loopback, with small requests, a py-spy profile put that at about a
fifth of the forwarding time. This backend keeps the same interface on a plain asyncio protocol: reads come
from a buffer the event loop fills, and "is_readable" is a look at that buffer.

HTTP itself stays with httpcore and h11. This module only moves bytes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any

import httpcore

# Reading from the socket pauses while this much received data waits to be read.
READ_BUFFER_HIGH_BYTES = 256 * 1024


def _expire(waiter: asyncio.Future[None], error: Exception) -> None:
    if not waiter.done():
        waiter.set_exception(error)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: received bytes wait in a buffer until read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        # Why the connection ended, if it did not end cleanly.
        self.error: Exception | None = None
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # Event loop callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio's classes.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > READ_BUFFER_HIGH_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # closes the transport; the server has nothing more to say

    def connection_lost(self, error: Exception | None) -> None:
        self._eof = True
        self.error = error
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(httpcore.WriteError(str(error or "connection closed")))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # What the stream calls.

    @property
    def readable(self) -> bool:
        """True if a read would not wait: data is buffered or the connection has ended."""
        return bool(self._buffer) or self._eof

    def take(self, max_bytes: int) -> bytes:
        if not self._buffer:
            return b""
        chunk = self._buffer.popleft()
        if len(chunk) > max_bytes:
            self._buffer.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= READ_BUFFER_HIGH_BYTES // 4:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return chunk

    async def wait_readable(self, timeout: float | None) -> None:
        waiter = self._loop.create_future()
        self._read_waiter = waiter
        await self._wait(waiter, timeout, httpcore.ReadTimeout)

    async def drain(self, timeout: float | None) -> None:
        if not self._writing_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        await self._wait(waiter, timeout, httpcore.WriteTimeout)

    async def _wait(self, waiter: asyncio.Future[None], timeout: float | None,
                    error: type[Exception]) -> None:
        if timeout is None:
            await waiter
            return
        timer = self._loop.call_later(timeout, _expire, waiter, error(f"no data for {timeout} s"))
        try:
            await waiter
        finally:
            timer.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        connection = self._connection
        if not connection.readable:
            await connection.wait_readable(timeout)
        chunk = connection.take(max_bytes)
        if not chunk and connection.error is not None:
            raise httpcore.ReadError(str(connection.error))
        return chunk

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        transport = self._connection.transport
        if transport is None or transport.is_closing():
            raise httpcore.WriteError("connection closed")
        transport.write(buffer)
        await self._connection.drain(timeout)

    async def aclose(self) -> None:
        transport = self._connection.transport
        if transport is not None:
            transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        connection = self._connection
        assert connection.transport is not None
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(connection.transport, connection, ssl_context,
                               server_hostname=server_hostname),
                timeout)
        except (asyncio.TimeoutError, TimeoutError) as error:
            await self.aclose()
            raise httpcore.ConnectTimeout(str(error) or "TLS handshake timed out") from error
        except (OSError, ssl.SSLError) as error:
            await self.aclose()
            raise httpcore.ConnectError(str(error)) from error
        connection.transport = transport
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._connection.transport
        if info == "is_readable":
            return self._connection.readable
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend on asyncio transports (TCP, optionally TLS)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple[int, int, Any]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        connection = _Connection(loop)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: connection, host, port,
                    local_addr=(local_address, 0) if local_address else None),
                timeout)
        except (asyncio.TimeoutError, TimeoutError) as error:
            raise httpcore.ConnectTimeout(str(error) or "connect timed out") from error
        except OSError as error:
            raise httpcore.ConnectError(str(error)) from error
        # uvloop may report connection_made only after create_connection has returned.
        connection.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncioStream(connection)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[tuple[int, int, Any]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported as an upstream")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
