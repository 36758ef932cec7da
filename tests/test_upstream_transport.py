"""The upstream side: httpx's transport on syncproxy's asyncio network backend.

Each test runs the transport that syncproxy forwards with against a real server on loopback. The
servers are written here to misbehave on purpose (respond late, stop mid-body, set cookies), and
each test checks what a forwarded request would see.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trustme

from syncproxy.upstream_client import UpstreamTransports

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler, context: ssl.SSLContext | None = None) -> asyncio.Server:
    return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)


def url_of(server: asyncio.Server, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def fetch(transports: UpstreamTransports, url: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> tuple[httpx.Response, bytes]:
    request = httpx.Request("GET", url, headers=headers or [],
                            extensions={"timeout": transports.timeouts})
    async with transports.borrow() as transport:
        response = await transport.handle_async_request(request)
        try:
            body = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
    return response, body


def test_keeps_no_cookies_between_requests() -> None:
    seen_heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen_heads.append(await read_head(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=alice; Path=/\r\n"
                         b"Content-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await serve(handler)
        transports = UpstreamTransports(5, 5, tls=False)
        first, _ = await fetch(transports, url_of(server) + "/sync/meta")
        await fetch(transports, url_of(server) + "/sync/meta")
        await transports.aclose()
        server.close()
        # The upstream's Set-Cookie reaches the client unchanged...
        assert first.headers["set-cookie"] == "session=alice; Path=/"

    asyncio.run(scenario())
    # ...but the front end never sends it back on its own: another user may be next.
    assert len(seen_heads) == 2
    assert b"cookie" not in seen_heads[1].lower().replace(b"set-cookie", b"")


def test_silent_upstream_raises_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(5)
        writer.close()

    async def scenario() -> float:
        server = await serve(handler)
        transports = UpstreamTransports(5, 0.5, tls=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout):
            await fetch(transports, url_of(server) + "/sync/meta")
        elapsed = loop.time() - started
        await transports.aclose()
        server.close()
        return elapsed

    assert 0.4 < asyncio.run(scenario()) < 3


def test_body_cut_short_raises_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await serve(handler)
        transports = UpstreamTransports(5, 5, tls=False)
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transports, url_of(server) + "/sync/download")
        await transports.aclose()
        server.close()

    asyncio.run(scenario())


def test_refused_connection_raises_connect_error() -> None:
    async def scenario() -> None:
        server = await serve(lambda reader, writer: asyncio.sleep(0))
        url = url_of(server)
        server.close()
        await server.wait_closed()
        transports = UpstreamTransports(5, 5, tls=False)
        with pytest.raises(httpx.ConnectError):
            await fetch(transports, url + "/sync/meta")
        await transports.aclose()

    asyncio.run(scenario())


def test_slow_reader_holds_back_a_fast_upstream() -> None:
    """A large download read slowly must wait in the kernel, not in the front end's memory."""
    total = 64 * 1024 * 1024
    block = b"d" * (256 * 1024)
    progress = {"written": 0, "read": 0, "widest_gap": 0}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while progress["written"] < total:
            writer.write(block)
            progress["written"] += len(block)
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await serve(handler)
        transports = UpstreamTransports(5, 10, tls=False)
        request = httpx.Request("GET", url_of(server) + "/sync/download",
                                extensions={"timeout": transports.timeouts})
        async with transports.borrow() as transport:
            response = await transport.handle_async_request(request)
            async for chunk in response.aiter_raw():
                progress["read"] += len(chunk)
                gap = progress["written"] - progress["read"]
                progress["widest_gap"] = max(progress["widest_gap"], gap)
                await asyncio.sleep(0.001)
            await response.aclose()
        await transports.aclose()
        server.close()

    asyncio.run(scenario())
    assert progress["read"] == total
    # Data written but not yet read sits in socket buffers (a few MB on loopback) and, at most
    # READ_BUFFER_HIGH_BYTES of it, in the backend. Without backpressure the gap nears 64 MB.
    assert progress["widest_gap"] < 16 * 1024 * 1024


def test_https_upstream() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server_context)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[int, bytes]:
        server = await serve(handler, server_context)
        transports = UpstreamTransports(5, 5, tls=True)
        # The pools share one context. Trusting the test CA in it is the test's replacement for
        # an upstream certificate signed by a public CA.
        for transport in transports._transports:
            ca.configure_trust(transport._pool._ssl_context)
        response, body = await fetch(transports, url_of(server, "https") + "/sync/meta")
        await transports.aclose()
        server.close()
        return response.status_code, body

    assert asyncio.run(scenario()) == (200, b"hello")
