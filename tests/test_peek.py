"""Peeking at a real socket: waiting for more bytes, deadlines, nothing consumed."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from syncproxy.clienthello import parse_client_hello
from syncproxy.peek import PeekClosed, PeekTimeout, peek_parsed
from test_clienthello import openssl_client_hello


@pytest.fixture
def connected_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.setblocking(False)
    listener.close()
    yield client, server
    client.close()
    server.close()


def peek_hello(server: socket.socket, timeout: float = 5.0):
    return peek_parsed(server, parse_client_hello, deadline=time.monotonic() + timeout, max_size=16384)


async def send_slowly(sock: socket.socket, data: bytes, piece: int, pause: float) -> None:
    for start in range(0, len(data), piece):
        await asyncio.to_thread(sock.sendall, data[start : start + piece])
        await asyncio.sleep(pause)


def test_hello_in_many_segments_is_read_whole(connected_pair):
    client, server = connected_pair
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = openssl_client_hello("www.test")

    async def scenario():
        sender = asyncio.create_task(send_slowly(client, hello, 50, 0.01))
        parsed = await peek_hello(server)
        await sender
        return parsed

    assert asyncio.run(scenario()).server_name == "www.test"
    server.setblocking(True)
    received = b""
    while len(received) < len(hello):
        received += server.recv(65536)
    assert received == hello


def test_waiting_does_not_spin(connected_pair):
    client, server = connected_pair
    hello = openssl_client_hello("www.test")
    client.sendall(hello[:20])

    async def scenario():
        cpu_before = time.process_time()
        with pytest.raises(PeekTimeout):
            await peek_hello(server, timeout=0.5)
        return time.process_time() - cpu_before

    assert asyncio.run(scenario()) < 0.1


def test_close_mid_hello_raises_closed(connected_pair):
    client, server = connected_pair
    client.sendall(openssl_client_hello("www.test")[:30])

    async def scenario():
        asyncio.get_running_loop().call_later(0.1, client.shutdown, socket.SHUT_WR)
        with pytest.raises(PeekClosed):
            await peek_hello(server)

    asyncio.run(scenario())


def test_low_water_mark_restored(connected_pair):
    client, server = connected_pair
    client.sendall(openssl_client_hello("www.test")[:30])
    with pytest.raises(PeekTimeout):
        asyncio.run(peek_hello(server, timeout=0.1))
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


def test_offset_skips_classified_bytes(connected_pair):
    client, server = connected_pair
    client.sendall(b"PROXY UNKNOWN\r\n" + openssl_client_hello("sync.test"))
    parsed = asyncio.run(
        peek_parsed(server, parse_client_hello, deadline=time.monotonic() + 5, max_size=16384, offset=15)
    )
    assert parsed.server_name == "sync.test"
