"""Bare hypercorn over TLS returning a constant to every request: the ceiling for small requests.

It runs hypercorn the way syncproxy does (asyncio's default event loop, HTTP/1.1 only, no
access log), reads and drops any request body, and responds 200 with a two-byte body.

    python bench/constant_app.py --port 8443 --certfile server.pem --keyfile server-key.pem
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config

BODY = b"ok"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    args = parser.parse_args()

    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.certfile = args.certfile
    config.keyfile = args.keyfile
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.include_server_header = False

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await serve(app, config, shutdown_trigger=stopped.wait)


if __name__ == "__main__":
    asyncio.run(main())
