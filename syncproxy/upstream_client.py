"""The httpx transports that carry requests to the upstream.

httpcore 1.0's connection pool rescans every pooled connection for every request event, and each
check asks anyio for socket attributes, so one shared pool gets slower with concurrency: with 32
concurrent requests more than half of the forwarding time went to that scan. Several small
pools, each request taking the least busy one, keep every scan short, and the pools run on
`upstream_backend.AsyncioBackend`, which answers the scan's question from a buffer.

Requests go to httpx's transport directly, not through `httpx.AsyncClient`: a forwarding proxy
needs none of the client's layers (authentication, redirects, cookies, default headers), and
a py-spy profile put them at about a tenth of the forwarding time. Without the client no cookie jar exists, so one
user's Set-Cookie can never reach another.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import anyio
import httpcore
import httpx

from .upstream_backend import AsyncioBackend

POOLS = 8
KEEPALIVE_PER_POOL = 4


class Transport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on the asyncio network backend."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        # httpx's own __init__ does nothing but build a pool, and has no argument for
        # httpcore's network backend, so it is not called: this builds the pool instead
        # (httpx is pinned to the range tested). No proxy is configured: proxy variables in
        # a container must not reroute the upstream.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=None,
            max_keepalive_connections=KEEPALIVE_PER_POOL,
            network_backend=AsyncioBackend(),
        )


class UpstreamTransports:
    """A fixed set of transports; `borrow()` yields the one with the fewest requests.

    `timeouts` goes into each request's extensions, where httpx's transport reads it.
    """

    def __init__(self, connect_timeout: float, idle_timeout: float, tls: bool) -> None:
        self.timeouts = {"connect": connect_timeout, "read": idle_timeout,
                         "write": idle_timeout, "pool": None}
        # One context for all pools, and none for an http upstream such as the bundled core:
        # loading the certifi roots takes 25 ms and about a megabyte per context.
        context = httpx.create_ssl_context(trust_env=False) if tls else None
        self._transports = [Transport(context) for _ in range(POOLS)]
        self._in_flight = [0] * POOLS

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[Transport]:
        index = min(range(POOLS), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            yield self._transports[index]
        finally:
            self._in_flight[index] -= 1

    async def load_on_first_use_modules(self) -> None:
        """Import what httpcore would otherwise import during the first request.

        httpcore's locks and events come from anyio, which imports its asyncio backend when the
        first one is made. That took 40 ms of the first request after every start (a login,
        usually), so it is done before the front end listens.
        """
        anyio.Event()

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()
