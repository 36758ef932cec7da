"""Hand a connection the front end does not terminate to its route, unchanged.

Connects to the route, writes a PROXY protocol header first if configured,
then splices. The client's bytes, ClientHello included, are still unread in
the accepted socket's receive queue, so the route receives the TLS stream exactly
as the client sent it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

from .proxyheader import Address, ProxyVersion, build_proxy_header
from .routing import Route
from .splice import DEFAULT_BUFFER_SIZE, DEFAULT_IDLE_TIMEOUT, splice

__all__ = ["CONNECT_TIMEOUT", "PassthroughOptions", "pass_through"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class PassthroughOptions:
    """Settings every spliced connection shares."""

    proxy_protocol: ProxyVersion | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    buffer_size: int = DEFAULT_BUFFER_SIZE


async def _connect(route: Route, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
    last_error: OSError | None = None
    for family, kind, protocol, _name, address in infos:
        upstream = socket.socket(family, kind, protocol)
        upstream.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(upstream, address), timeout)
        except (OSError, asyncio.TimeoutError) as error:
            upstream.close()
            last_error = error if isinstance(error, OSError) else TimeoutError(f"connect to {route} timed out after {timeout} s")
            continue
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream
    raise last_error or OSError(f"{route.host} resolved to no address")


async def pass_through(
    client: socket.socket,
    route: Route,
    *,
    client_address: Address,
    server_name: str | None,
    options: PassthroughOptions,
) -> None:
    """Splice ``client`` to ``route`` and log the outcome; closes ``client`` on return.

    ``client_address`` is the address reported to the route (from a trusted
    PROXY header when there was one, else the socket's peer).
    """
    started = time.monotonic()
    try:
        upstream = await _connect(route, options.connect_timeout)
    except OSError as error:
        log.warning(
            "passthrough connect failed client=%s sni=%s route=%s error=%r", client_address, server_name, route, error
        )
        client.close()
        return

    try:
        if options.proxy_protocol is not None:
            local = Address.from_sockaddr(client.getsockname())
            header = build_proxy_header(options.proxy_protocol, client_address, local)
            await asyncio.get_running_loop().sock_sendall(upstream, header)
    except OSError as error:
        log.warning("passthrough header failed client=%s route=%s error=%r", client_address, route, error)
        client.close()
        upstream.close()
        return

    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    log.info("passthrough start client=%s sni=%s route=%s", client_address, server_name, route)
    result = await splice(client, upstream, idle_timeout=options.idle_timeout, buffer_size=options.buffer_size)
    log.info(
        "passthrough end client=%s sni=%s route=%s sent=%d received=%d seconds=%.3f reason=%s",
        client_address,
        server_name,
        route,
        result.client_to_upstream,
        result.upstream_to_client,
        time.monotonic() - started,
        result.reason,
    )
