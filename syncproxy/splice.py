"""Copy raw bytes both ways between two connected sockets.

A spliced connection is one the front end does not terminate: its TLS bytes
go unchanged to another server. The rules that keep this cheap and safe:

- Each direction owns one fixed buffer and never reads again before the last
  read has been written, so a slow receiver stops the sender through TCP flow
  control (backpressure) and memory does not grow with the transfer.
- End of stream in one direction becomes ``shutdown(SHUT_WR)`` on the other
  socket (half-close); the other direction goes on until it ends as well.
- The connection is closed when no byte has moved either way for
  ``idle_timeout`` seconds, or at once when either side resets.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["DEFAULT_BUFFER_SIZE", "DEFAULT_IDLE_TIMEOUT", "SpliceResult", "splice"]


DEFAULT_BUFFER_SIZE = 256 * 1024
# Matches nginx's stream proxy_timeout default: long enough for an idle
# HTTP/2 or WebSocket connection that the site behind keeps open on purpose.
DEFAULT_IDLE_TIMEOUT = 600.0


@dataclass
class SpliceResult:
    """Byte counts per direction and why the splice ended.

    ``reason`` is ``closed`` (both directions ended), ``idle_timeout``, or the
    class name of the socket error that ended it, such as ``ConnectionResetError``.
    """

    client_to_upstream: int = 0
    upstream_to_client: int = 0
    reason: str = "closed"


class _Activity:
    """The monotonic time of the last byte moved in either direction."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


async def _pump(
    loop: asyncio.AbstractEventLoop,
    source: socket.socket,
    target: socket.socket,
    buffer_size: int,
    activity: _Activity,
    count_moved: Callable[[int], None],
) -> None:
    """Copy ``source`` to ``target`` until end of stream, then half-close ``target``."""
    buffer = bytearray(buffer_size)
    view = memoryview(buffer)
    while True:
        count = await loop.sock_recv_into(source, buffer)
        if count == 0:
            break
        activity.touch()
        await loop.sock_sendall(target, view[:count])
        activity.touch()
        count_moved(count)
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is already gone, which the other direction will see


async def _watch_idle(activity: _Activity, idle_timeout: float) -> None:
    while True:
        remaining = activity.last + idle_timeout - time.monotonic()
        if remaining <= 0:
            return
        await asyncio.sleep(remaining)


async def splice(
    client: socket.socket,
    upstream: socket.socket,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> SpliceResult:
    """Copy bytes between ``client`` and ``upstream`` until both directions end.

    Both sockets must be connected and non-blocking. They are closed on return,
    whatever the outcome; cancelling the task closes them too.
    """
    loop = asyncio.get_running_loop()
    activity = _Activity()
    result = SpliceResult()

    def count_forward(count: int) -> None:
        result.client_to_upstream += count

    def count_backward(count: int) -> None:
        result.upstream_to_client += count

    forward = asyncio.ensure_future(_pump(loop, client, upstream, buffer_size, activity, count_forward))
    backward = asyncio.ensure_future(_pump(loop, upstream, client, buffer_size, activity, count_backward))
    idle = asyncio.ensure_future(_watch_idle(activity, idle_timeout))

    try:
        waiting = {forward, backward, idle}
        while not (forward.done() and backward.done()):
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if idle in done:
                result.reason = "idle_timeout"
                break
            failed = [task.exception() for task in done if task.exception() is not None]
            if failed:
                result.reason = failed[0].__class__.__name__
                break
    finally:
        for task in (forward, backward, idle):
            task.cancel()
        await asyncio.gather(forward, backward, idle, return_exceptions=True)
        client.close()
        upstream.close()
    return result
