"""Read the first bytes of an accepted connection without consuming them.

The front end classifies a connection (PROXY protocol header, TLS ClientHello
and its server name, plain HTTP) before anything reads from the socket, so
that the next reader (the TLS layer or a splice) receives every byte the
client sent. ``recv(MSG_PEEK)`` returns the same bytes again until
more arrive, and the socket stays readable while any byte waits. To sleep
until the bytes a parser asked for are there, instead of spinning, the wait
sets ``SO_RCVLOWAT`` to that count: Linux then reports the socket readable
only once that many bytes are queued, or on end of stream or an error.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable, TypeVar

__all__ = ["Incomplete", "PeekClosed", "PeekTimeout", "peek_parsed"]

T = TypeVar("T")


class Incomplete(Exception):
    """More bytes are needed; ``needed`` is the total (not the extra) count."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need {needed} bytes")
        self.needed = needed


class PeekClosed(ConnectionError):
    """The peer ended the stream or reset it before the parser had enough bytes."""


class PeekTimeout(TimeoutError):
    """The parser still lacked bytes when the deadline passed."""


async def peek_parsed(
    sock: socket.socket,
    parse: Callable[[bytes], T],
    *,
    deadline: float,
    max_size: int,
    offset: int = 0,
) -> T:
    """Return ``parse(peeked)`` once it stops raising :class:`Incomplete`.

    ``sock`` must be non-blocking and not registered with the event loop.
    ``deadline`` is a :func:`time.monotonic` time. ``offset`` skips bytes a
    previous step has already classified (but not consumed). The parser's own
    errors propagate; ``SO_RCVLOWAT`` is back at 1 on return.
    """
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                data = sock.recv(offset + max_size, socket.MSG_PEEK)
            except BlockingIOError:
                data = b""
            except OSError as error:
                raise PeekClosed(f"connection failed while waiting for its first bytes: {error}") from error
            try:
                return parse(data[offset:])
            except Incomplete as more:
                needed = offset + more.needed
            if needed > offset + max_size:
                raise ValueError(f"parser needs {needed - offset} bytes, more than the {max_size}-byte cap")

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)
            await _wait_readable(loop, sock, deadline)
            if len(sock.recv(needed, socket.MSG_PEEK)) < needed:
                # Readable below the low-water mark means end of stream or an error.
                raise PeekClosed("connection closed before its first bytes were complete")
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            pass  # the socket is closed or broken and is about to be dropped


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise PeekTimeout("timed out waiting for the first bytes")
    readable = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await asyncio.wait_for(readable, remaining)
    except asyncio.TimeoutError:
        raise PeekTimeout(f"timed out waiting for the first bytes after {remaining:.1f} s") from None
    finally:
        loop.remove_reader(sock.fileno())
