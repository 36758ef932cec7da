"""A deliberately slow HTTP/1.1 upstream on loopback, for timeout tests.

Written for the tests because the sync core cannot be made slow on demand. It reads the whole
request body, then answers by path:
- `/sync/trickle`: headers after one second, then one body byte per second for TRICKLE_BYTES s;
- `/sync/silent`: nothing at all for SILENT_SECONDS, then a normal answer;
- `/sync/big`: a large body sent as fast as the reader takes it;
- anything else: `200 ok` at once.
"""

from __future__ import annotations

import asyncio
import threading

TRICKLE_BYTES = 8
SILENT_SECONDS = 8
BIG_BODY_BYTES = 64 * 1024 * 1024


class SlowUpstream:
    """Run the slow upstream on a thread of its own; use as a context manager."""

    def __init__(self) -> None:
        self.port = 0
        self.bodies_received: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> SlowUpstream:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                await self._read_body(reader, head)
                await self._answer(path, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, head: bytes) -> None:
        headers = {line.split(b":")[0].strip().lower(): line.split(b":", 1)[1].strip()
                   for line in head.split(b"\r\n")[1:] if b":" in line}
        received = 0
        if b"content-length" in headers:
            received = len(await reader.readexactly(int(headers[b"content-length"])))
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                received += len(await reader.readexactly(size + 2)) - 2
                if size == 0:
                    break
        self.bodies_received.append(received)

    async def _answer(self, path: bytes, writer: asyncio.StreamWriter) -> None:
        if path == b"/sync/trickle":
            await asyncio.sleep(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TRICKLE_BYTES)
            for _ in range(TRICKLE_BYTES):
                await writer.drain()
                await asyncio.sleep(1)
                writer.write(b"t")
        elif path == b"/sync/silent":
            await asyncio.sleep(SILENT_SECONDS)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        elif path == b"/sync/big":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BODY_BYTES)
            block = b"b" * 65536
            for _ in range(BIG_BODY_BYTES // len(block)):
                writer.write(block)
                await writer.drain()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
