"""A plain-HTTP upstream for bulk transfers, in place of the sync core, which limits bodies.

It reads and drops every request body (Content-Length or chunked), then responds 200 with `ok`.
To a GET whose query has `bytes=N` it responds with N bytes instead, sent with a Content-Length
in 1 MiB writes. Keep-alive connections are served until the client closes.

    python bench/bulk_upstream.py --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from urllib.parse import parse_qs, urlsplit

BLOCK = os.urandom(1024 * 1024)
READ_SIZE = 256 * 1024
STREAM_LIMIT = 1024 * 1024  # maximum request head size in bytes, and the read buffer's limit


async def discard(reader: asyncio.StreamReader, size: int) -> None:
    while size > 0:
        data = await reader.read(min(size, READ_SIZE))
        if not data:
            raise ConnectionError("client closed the connection inside the body")
        size -= len(data)


async def discard_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        await discard(reader, size + 2)  # the chunk and its CRLF
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the blank line
        pass


async def send_bytes(writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                 b"content-length: %d\r\n\r\n" % size)
    while size > 0:
        block = BLOCK if size >= len(BLOCK) else BLOCK[:size]
        writer.write(block)
        size -= len(block)
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip().lower()

            if "chunked" in headers.get("transfer-encoding", ""):
                await discard_chunked(reader)
            else:
                await discard(reader, int(headers.get("content-length", "0")))

            query = parse_qs(urlsplit(target).query)
            if method == "GET" and "bytes" in query:
                await send_bytes(writer, int(query["bytes"][0]))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                             b"content-length: 2\r\n\r\nok")
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, limit=STREAM_LIMIT)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    async with server:
        await stopped.wait()


if __name__ == "__main__":
    asyncio.run(main())
