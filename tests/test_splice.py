"""The splice on real loopback sockets: both directions, half-close, limits."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

from syncproxy.splice import splice


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Return a connected (outside end, front end's non-blocking end) TCP pair."""
    listener = socket.create_server(("127.0.0.1", 0))
    outside = socket.create_connection(listener.getsockname())
    inside, _ = listener.accept()
    listener.close()
    inside.setblocking(False)
    return outside, inside


def test_bytes_flow_both_ways_with_half_close():
    client, client_inside = socket_pair()
    upstream, upstream_inside = socket_pair()

    def upstream_server():
        request = b""
        while chunk := upstream.recv(65536):
            request += chunk
        upstream.sendall(request[::-1])  # answers only after the client's half-close
        upstream.close()

    thread = threading.Thread(target=upstream_server)
    thread.start()

    async def scenario():
        task = asyncio.create_task(splice(client_inside, upstream_inside, idle_timeout=5))
        await asyncio.to_thread(client.sendall, b"hello upstream")
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := await asyncio.to_thread(client.recv, 65536):
            answer += chunk
        return answer, await task

    answer, result = asyncio.run(scenario())
    thread.join()
    assert answer == b"maertspu olleh"
    assert result.client_to_upstream == 14
    assert result.upstream_to_client == 14
    assert result.reason == "closed"


def test_slow_reader_holds_back_sender():
    client, client_inside = socket_pair()
    upstream, upstream_inside = socket_pair()
    upstream.setblocking(False)
    accepted = 0

    async def scenario():
        nonlocal accepted
        task = asyncio.create_task(splice(client_inside, upstream_inside, idle_timeout=5))
        chunk = bytes(1 << 20)
        stalled_since = None
        while accepted < 200 << 20:
            try:
                accepted += upstream.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
            await asyncio.sleep(0.001)
        client.close()
        upstream.close()
        await task

    asyncio.run(scenario())
    # Kernel socket buffers on both legs plus one 256 KiB splice buffer: a few
    # megabytes. Without backpressure all 200 MiB would be accepted.
    assert accepted < 32 << 20


def test_idle_connection_is_closed():
    client, client_inside = socket_pair()
    upstream, upstream_inside = socket_pair()

    async def scenario():
        started = time.monotonic()
        result = await splice(client_inside, upstream_inside, idle_timeout=0.3)
        return result, time.monotonic() - started

    result, elapsed = asyncio.run(scenario())
    assert result.reason == "idle_timeout"
    assert 0.3 <= elapsed < 2
    assert client.recv(10) == b""
    assert upstream.recv(10) == b""


def test_activity_postpones_idle_timeout():
    client, client_inside = socket_pair()
    upstream, upstream_inside = socket_pair()

    async def scenario():
        # Six sends 0.2 s apart span longer than the timeout; each one restarts it.
        task = asyncio.create_task(splice(client_inside, upstream_inside, idle_timeout=1.0))
        for _ in range(6):
            await asyncio.to_thread(client.sendall, b"x")
            await asyncio.sleep(0.2)
        assert not task.done()
        return await task

    result = asyncio.run(scenario())
    assert result.reason == "idle_timeout"
    assert result.client_to_upstream == 6


def test_reset_ends_both_sides():
    client, client_inside = socket_pair()
    upstream, upstream_inside = socket_pair()

    async def scenario():
        task = asyncio.create_task(splice(client_inside, upstream_inside, idle_timeout=5))
        await asyncio.sleep(0.05)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        upstream.close()
        return await asyncio.wait_for(task, 2)

    result = asyncio.run(scenario())
    assert "ConnectionResetError" in result.reason
    client.settimeout(2)
    assert client.recv(10) == b""
