"""The httpx clients that carry requests to the upstream.

httpcore 1.0's connection pool rescans every pooled connection for every request event, and each
check asks anyio for socket attributes, so one shared pool gets slower with concurrency: with 32
concurrent requests more than half of the forwarding time went to that scan. Several small
pools, each request taking the least busy one, keep every scan short.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

POOLS = 8
KEEPALIVE_PER_POOL = 4


class UpstreamClients:
    """A fixed set of httpx clients; `borrow()` yields the one with the fewest requests."""

    def __init__(self, connect_timeout: float, idle_timeout: float) -> None:
        self._clients = [
            httpx.AsyncClient(
                trust_env=False,  # proxy variables in a container must not reroute the upstream
                timeout=httpx.Timeout(connect=connect_timeout, read=idle_timeout,
                                      write=idle_timeout, pool=None),
                limits=httpx.Limits(max_connections=None,
                                    max_keepalive_connections=KEEPALIVE_PER_POOL),
                follow_redirects=False,
                # A proxy keeps no cookies: one user's Set-Cookie must never reach another.
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            )
            for _ in range(POOLS)
        ]
        self._in_flight = [0] * POOLS

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[httpx.AsyncClient]:
        index = min(range(POOLS), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            yield self._clients[index]
        finally:
            self._in_flight[index] -= 1

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
