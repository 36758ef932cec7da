"""A small HTTP/1.1 upstream for forwarding tests, standing in where the sync core cannot.

The sync core accepts only valid sync traffic, so tests that need to see exactly what the front
end forwarded (raw bytes, headers, timing) point `--upstream` at this server instead. It parses
with h11 and answers every request with JSON describing what it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading

import h11


class UpstreamServer:
    """Run on 127.0.0.1 in a background thread; `requests` records what arrived."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UpstreamServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = None
                digest = hashlib.sha256()
                size = 0
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        connection.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        digest.update(event.data)
                        size += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                record = {
                    "method": request.method.decode(),
                    "target": request.target.decode(),
                    "headers": [[k.decode(), v.decode("latin-1")] for k, v in request.headers],
                    "size": size,
                    "sha256": digest.hexdigest(),
                }
                self.requests.append(record)
                body = json.dumps(record).encode()
                writer.write(connection.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                    ("anki-original-size", str(len(body))),
                ])))
                writer.write(connection.send(h11.Data(data=body)))
                writer.write(connection.send(h11.EndOfMessage()))
                await writer.drain()
                connection.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()
