"""The ASGI app that forwards sync requests to the upstream, streaming both ways.

Large bodies are never held in memory. The request body goes to the upstream as it arrives
from the client, and the response body goes back as it arrives from the upstream, byte for byte.
`aiter_raw` relays it, so the zstd bodies of the sync protocol are never decoded. Only idle time is
limited (no bytes moving), never a whole request, because a full upload on slow hardware can
legitimately take minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import httpx

from .gate import GateTimeout, RequestGate
from .httpsemantics import (
    FORWARDING_HEADERS,
    SERVER_WRITTEN,
    end_to_end,
    has_conflicting_framing,
)
from .login import MAX_LOGIN_BODY_BYTES, LoginBodyError, is_login_request, read_credentials
from .metrics import Metrics
from .owner import request_owner
from .upstream_client import UpstreamTransports
from .throttle import LoginThrottle

log = logging.getLogger("syncproxy.proxy")
access_log = logging.getLogger("syncproxy.access")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SYNC_PREFIXES = ("/sync/", "/msync/")
# Path starts a client sends when its sync URL already ends in /sync/ or /msync/.
DOUBLED_PREFIXES = tuple(outer + inner[1:] for outer in SYNC_PREFIXES for inner in SYNC_PREFIXES)
CORE_HEALTH_PATH = "/health"
# How long a request may wait while the sync core restarts before it gets 503.
GATE_WAIT_SECONDS = 120.0
# Request bodies up to this size are read whole and sent with Content-Length; larger ones stream
# chunked. The sync core (anki 26.9) can respond to a chunked request and close the connection
# without reading the final zero-length chunk. The kernel then resets the connection, which can
# destroy the end of the response in flight. Small bodies (most sync requests) avoid that race.
SMALL_BODY_BYTES = 256 * 1024
# Response bodies up to this size are read whole and sent with Content-Length (relay_response).
SMALL_RESPONSE_BYTES = 64 * 1024

# After an early 413 the rest of the body is read and discarded, so that a client still writing
# it does not meet a reset before it reads the response. These bound that work per request.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_SECONDS = 30.0
DRAIN_IDLE_SECONDS = 5.0


class Upstream(Protocol):
    """The destination of forwarded requests: the bundled sync core or an existing server."""

    @property
    def url(self) -> str: ...

    def unavailable_reason(self) -> str | None: ...

    def upstream_failed(self, path: str, error: Exception) -> None:
        """Report a sync request that lost its upstream connection before any response."""


class HostKeys(Protocol):
    """The host keys that are currently valid, or None when the upstream decides alone."""

    def valid_host_keys(self) -> frozenset[str] | None: ...


class CoreRouter(Protocol):
    """Several upstreams that each serve a fixed share of the users (`--cores N`)."""

    def route(self, host_key: str, user: str | None) -> tuple[Upstream, RequestGate]:
        """Return the upstream and gate of the user with this host key or name."""


class LegacyLogins(Protocol):
    """Users imported from ankisyncd whose first login replaces the old password hash."""

    def has_pending_users(self) -> bool: ...

    async def upgrade_legacy_login(self, name: str, password: str) -> bool | None: ...


if sys.version_info >= (3, 11):
    async def receive_within(receive: Receive, seconds: float) -> dict[str, Any]:
        """Await the next ASGI message; raise asyncio.TimeoutError after `seconds`."""
        # asyncio.timeout sets one timer; wait_for would also create a task per message.
        async with asyncio.timeout(seconds):
            return await receive()
else:
    async def receive_within(receive: Receive, seconds: float) -> dict[str, Any]:
        """Await the next ASGI message; raise asyncio.TimeoutError after `seconds`."""
        return await asyncio.wait_for(receive(), seconds)


class BodyTooLarge(Exception):
    """The request body crossed the configured limit while it was being forwarded."""


class ClientStalled(Exception):
    """The client sent no request body bytes for the client idle timeout."""


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI server's lifespan events; syncproxy's apps need no setup."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def header_value(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


def sync_host_key(scope: Scope) -> str:
    """Return the host key from the `anki-sync` header of the current protocol, or ''."""
    raw = header_value(scope, b"anki-sync")
    if not raw:
        return ""
    try:
        document = json.loads(raw)
    except ValueError:
        return ""
    key = document.get("k") if isinstance(document, dict) else None
    return key if isinstance(key, str) else ""


class ProxyApp:
    """Forward /sync/ and /msync/ requests to the upstream; answer the health check itself."""

    def __init__(
        self,
        upstream: Upstream,
        gate: RequestGate,
        host_keys: HostKeys,
        *,
        max_body_bytes: int,
        connect_timeout: float,
        idle_timeout: float,
        health_path: str,
        scheme: str,
        health: Callable[[], tuple[bool, str]],
        legacy_logins: LegacyLogins | None = None,
        client_idle_timeout: float = 120.0,
        metrics: Metrics | None = None,
        login_throttle: LoginThrottle | None = None,
        path_prefix: str = "/",
        router: CoreRouter | None = None,
    ) -> None:
        self.path_prefix = path_prefix
        self.upstream = upstream
        self.router = router
        self.legacy_logins = legacy_logins
        self.login_throttle = login_throttle
        self.gate = gate
        self.host_keys = host_keys
        self.max_body_bytes = max_body_bytes
        self.health_path = health_path
        self.scheme = scheme
        self.health = health
        self.transports = UpstreamTransports(connect_timeout, idle_timeout,
                                             tls=upstream.url.startswith("https://"))
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.client_idle_timeout = client_idle_timeout
        self.metrics = metrics

    async def aclose(self) -> None:
        await self.transports.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return

        exchange = Exchange(scope, receive, send, self.client_idle_timeout)
        try:
            await self._handle(exchange)
        finally:
            exchange.log()
            if self.metrics is not None:
                exchange.record(self.metrics, self.health_path)

    async def _handle(self, exchange: Exchange) -> None:
        path = exchange.scope["path"]
        log.debug("request started client=%s method=%s path=%s", exchange.client_address(),
                  exchange.scope["method"], path)
        if path == self.health_path:
            healthy, detail = self.health()
            await exchange.respond(200 if healthy else 503, detail + "\n")
            return
        path = self._strip_prefix(exchange)
        if (path is None or path.startswith(DOUBLED_PREFIXES)
                or not (path.startswith(SYNC_PREFIXES) or path == CORE_HEALTH_PATH)):
            shown = exchange.scope["path"] if path is None else path
            base = f"{self.scheme}://{exchange.host()}{self.path_prefix}"
            await exchange.respond(
                404,
                f"Not found: {shown}\nThis is an Anki sync server. Set the client's sync server "
                f"to the base URL {base} (the client adds /sync/ and /msync/ itself).\n",
            )
            return

        if (self.login_throttle is not None and self.login_throttle.enabled
                and is_login_request(exchange.scope["method"], path)):
            if not await self._admit_login(exchange, self.login_throttle):
                return

        refresh = getattr(self.upstream, "refresh", None)
        if refresh is not None and is_login_request(exchange.scope["method"], path):
            await refresh()

        if (self.legacy_logins is not None and self.legacy_logins.has_pending_users()
                and is_login_request(exchange.scope["method"], path)):
            if not await self._check_legacy_login(exchange):
                return

        host_key = sync_host_key(exchange.scope)
        valid = self.host_keys.valid_host_keys()
        if host_key and valid is not None and host_key not in valid:
            # The user was removed or its password changed: the key is dead even if the sync
            # core has not restarted yet.
            await exchange.respond(403, "Host key is not valid: log in to sync again.\n")
            return

        if has_conflicting_framing(exchange.scope["headers"]):
            exchange.reject_reason = "conflicting_framing"
            await exchange.respond(400, "Bad request: the request has both Content-Length and "
                                        "Transfer-Encoding; send only one.\n",
                                   [(b"connection", b"close")])
            return

        content_length = exchange.content_length()
        if content_length is not None and content_length > self.max_body_bytes:
            exchange.reject_reason = "body_too_large"
            await exchange.respond_too_large(self.max_body_bytes)
            return

        upstream, gate = self.upstream, self.gate
        if self.router is not None:
            # Only with several cores: a login or a legacy request is read ahead for its user.
            key, user = await request_owner(exchange, path, host_key)
            upstream, gate = self.router.route(key, user)

        try:
            # Checked after the gate: a request that arrives while the sync core restarts for
            # a user change waits for it instead of getting 503.
            async with gate.admit(host_key, path, GATE_WAIT_SECONDS):
                reason = upstream.unavailable_reason()
                if reason:
                    await exchange.respond(503, f"Sync server unavailable: {reason}\n")
                    return
                await self._forward(exchange, upstream)
        except GateTimeout:
            await exchange.respond(503, "Sync server is restarting; try again shortly.\n")

    async def _check_legacy_login(self, exchange: Exchange) -> bool:
        """Upgrade an imported user's password at login; return False if already answered.

        The body is read here and replayed to the upstream unchanged, so the sync core still
        issues the host key.
        """
        body = await exchange.prefetch_body(MAX_LOGIN_BODY_BYTES)
        if body is None:
            return True
        headers = {key.decode("latin-1").lower(): value.decode("latin-1")
                   for key, value in exchange.scope["headers"]}
        try:
            credentials = read_credentials(headers, body)
        except LoginBodyError as error:
            log.info("login body unreadable, forwarding it client=%s error=%r",
                     exchange.client_address(), str(error))
            return True
        matched = await self.legacy_logins.upgrade_legacy_login(credentials.username,
                                                                credentials.password)
        if matched is False:
            if exchange.on_upstream_status is not None:
                await exchange.on_upstream_status(403)  # counts as a failed login
            await exchange.respond(403, "Login failed: wrong user name or password.\n")
            return False
        return True

    async def _reject_stalled(self, exchange: Exchange) -> None:
        exchange.reject_reason = "client_body_timeout"
        log.info("request body stalled client=%s path=%s idle_s=%g",
                 exchange.client_address(), exchange.scope["path"], self.client_idle_timeout)
        await exchange.respond(
            408, f"Request timeout: the client sent no request body bytes for "
                 f"{self.client_idle_timeout:g} s (setting client_idle_timeout).\n",
            [(b"connection", b"close")])

    async def _admit_login(self, exchange: Exchange, throttle: LoginThrottle) -> bool:
        """Refuse a throttled login, or arrange to count its outcome; False if answered."""
        address = exchange.client_address()
        name = await login_user_name(exchange)
        refusal = throttle.check(address, name)
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.refused_logins.labels(reason="throttled").inc()
            subject = "from this address" if refusal.scope == "client" else "for this user name"
            minutes = max(1, round(refusal.retry_after / 60))
            await exchange.respond(
                503, f"Too many failed logins {subject}. Try again in {minutes} minutes.\n",
                [(b"retry-after", str(refusal.retry_after).encode())],
            )
            return False

        async def count_outcome(status: int) -> None:
            if status == 403:
                await asyncio.sleep(throttle.record_failure(address, name))
            elif status == 200:
                throttle.record_success(address, name)

        exchange.on_upstream_status = count_outcome
        return True

    def _strip_prefix(self, exchange: Exchange) -> str | None:
        """Remove path_prefix from the request's path; return None if the path lacks it."""
        path = exchange.scope["path"]
        if self.path_prefix == "/":
            return path
        if not path.startswith(self.path_prefix):
            return None
        scope = exchange.scope
        scope["path"] = path[len(self.path_prefix) - 1:]
        raw_prefix = self.path_prefix.encode("latin-1")
        if scope["raw_path"].startswith(raw_prefix):
            scope["raw_path"] = scope["raw_path"][len(raw_prefix) - 1:]
        return scope["path"]

    async def _answer_failed_send(self, exchange: Exchange, error: Exception,
                                  upstream: Upstream) -> None:
        """Answer a request whose exchange with the upstream failed before any response."""
        url = upstream.url
        if isinstance(error, BodyTooLarge):
            exchange.reject_reason = "body_too_large"
            await exchange.respond_too_large(self.max_body_bytes)
        elif isinstance(error, ClientStalled):
            await self._reject_stalled(exchange)
        elif isinstance(error, httpx.ConnectTimeout):
            log.warning("upstream connect timed out url=%s timeout_s=%g", url,
                        self.connect_timeout)
            await exchange.respond(502, f"Upstream unreachable: no connection to {url} within "
                                        f"{self.connect_timeout:g} s "
                                        f"(setting upstream_connect_timeout).\n")
        elif isinstance(error, httpx.ConnectError):
            log.warning("upstream unreachable url=%s error=%r", url, str(error))
            await exchange.respond(502, f"Upstream unreachable: cannot connect to {url} "
                                        f"({error}).\n")
        elif isinstance(error, httpx.TimeoutException):
            log.warning("upstream timed out url=%s idle_s=%g", url, self.idle_timeout)
            await exchange.respond(504, f"Upstream timed out: no data from {url} for "
                                        f"{self.idle_timeout:g} s "
                                        f"(setting upstream_idle_timeout).\n")
        elif not exchange.client_gone:
            log.warning("upstream failed url=%s error=%r", url, str(error))
            upstream.upstream_failed(exchange.scope["path"], error)
            await exchange.respond(502, f"Upstream failed: {type(error).__name__} from {url}; "
                                        f"the sync core may have restarted, try again.\n")

    async def _forward(self, exchange: Exchange, upstream: Upstream) -> None:
        scope = exchange.scope
        target = upstream.url + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")

        try:
            prefix, complete = await exchange.read_prefix(SMALL_BODY_BYTES, self.max_body_bytes)
        except (BodyTooLarge, ClientStalled) as error:
            await self._answer_failed_send(exchange, error, upstream)
            return
        except httpx.ReadError:
            return  # the client went away before sending its whole body
        if complete:
            content: bytes | AsyncIterator[bytes] = prefix
        else:
            content = exchange.body(self.max_body_bytes)

        headers = end_to_end(scope["headers"],
                             also_drop=FORWARDING_HEADERS | {b"host", b"content-length"})
        if not complete and exchange.content_length() is not None:
            # Streaming with the client's length keeps the body un-chunked, as the client sent it.
            headers.append((b"content-length", str(exchange.content_length()).encode()))
        headers += [
            (b"x-forwarded-for", exchange.client_address().encode()),
            (b"x-forwarded-proto", self.scheme.encode()),
            (b"x-forwarded-host", exchange.host().encode("latin-1")),
        ]
        # Built directly, not with client.build_request: that would add httpx's own Accept,
        # Accept-Encoding and User-Agent headers to what the client sent.
        request = httpx.Request(scope["method"], target, headers=headers, content=content,
                                extensions={"timeout": self.transports.timeouts})

        async with self.transports.borrow() as transport:
            try:
                response = await transport.handle_async_request(request)
            except (BodyTooLarge, ClientStalled, httpx.TransportError) as error:
                await self._answer_failed_send(exchange, error, upstream)
                return

            try:
                if exchange.on_upstream_status is not None:
                    await exchange.on_upstream_status(response.status_code)
                await relay_response(exchange, response)
            except httpx.TransportError as error:
                # The status line has gone out, so the only signal left is to end the response
                # short: returning without its last chunk makes the front end close the connection.
                log.warning("upstream failed mid-response url=%s path=%s sent=%d error=%s",
                            upstream.url, scope["path"], exchange.bytes_out,
                            type(error).__name__)
            finally:
                await response.aclose()


async def relay_response(exchange: Exchange, response: httpx.Response) -> None:
    """Send the upstream's response to the client; a small body goes out with Content-Length.

    Up to SMALL_RESPONSE_BYTES of the body are read before the response starts. A body that
    ends within them, as every sync response but downloads does, goes out in one write with
    the head. Relayed chunked, the final zero-length chunk went out in a TLS record of its own.
    The Anki client had by then stopped reading, so it closed the connection and made a new
    one, with a new TLS handshake, for its next request. A larger body is streamed chunked.
    """
    headers = end_to_end(response.headers.raw, also_drop=SERVER_WRITTEN)
    chunks = response.aiter_raw()
    prefix_chunks: list[bytes] = []
    prefix_bytes = 0
    async for chunk in chunks:
        prefix_chunks.append(chunk)
        prefix_bytes += len(chunk)
        if prefix_bytes > SMALL_RESPONSE_BYTES:
            break
    else:
        body = b"".join(prefix_chunks)
        if response.headers.get("content-length") is None and has_body(exchange, response):
            headers.append((b"content-length", str(len(body)).encode()))
        await exchange.start_response(response.status_code, headers)
        await exchange.send_last_body(body)
        return
    await exchange.start_response(response.status_code, headers)
    await exchange.send_body(b"".join(prefix_chunks))
    async for chunk in chunks:  # the same generator, resumed after the break
        await exchange.send_body(chunk)
    await exchange.end_response()


def has_body(exchange: Exchange, response: httpx.Response) -> bool:
    """Return True if the response's framing includes a body (RFC 9112, section 6.3)."""
    status = response.status_code
    return not (exchange.scope["method"] == "HEAD" or status < 200 or status in (204, 304))


class Exchange:
    """One request and its response, with the counters the access log needs."""

    def __init__(self, scope: Scope, receive: Receive, send: Send,
                 idle_timeout: float = 120.0) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.idle_timeout = idle_timeout
        self.reject_reason = ""
        self.request_done = False
        self.stalled = False
        self.started = time.monotonic()
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_gone = False
        self.response_started = False
        self._prefetched: list[bytes] = []
        # Awaited with the upstream's status before the response starts.
        self.on_upstream_status: Callable[[int], Awaitable[None]] | None = None

    def client_address(self) -> str:
        client = self.scope.get("client")
        return client[0] if client else "-"

    def host(self) -> str:
        value = header_value(self.scope, b"host")
        return value.decode("latin-1") if value else "localhost"

    def content_length(self) -> int | None:
        value = header_value(self.scope, b"content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def _receive_within_idle_timeout(self) -> dict[str, Any]:
        try:
            message = await receive_within(self._receive, self.idle_timeout)
        except asyncio.TimeoutError:
            self.stalled = True
            raise ClientStalled from None
        if message["type"] == "http.disconnect":
            self.client_gone = True
        elif not message.get("more_body", False):
            self.request_done = True
        return message

    async def _receive_chunk(self, limit: int) -> bytes:
        """Return the next piece of the request body; raise BodyTooLarge past `limit` bytes."""
        message = await self._receive_within_idle_timeout()
        if message["type"] == "http.disconnect":
            raise httpx.ReadError("client disconnected")
        chunk = message.get("body", b"")
        self.bytes_in += len(chunk)
        if self.bytes_in > limit:
            raise BodyTooLarge
        return chunk

    async def read_prefix(self, size: int, limit: int) -> tuple[bytes, bool]:
        """Read at least `size` bytes of the body, or all of it, and keep them for `body()`.

        Returns what was read so far and whether that is the whole body.
        """
        while not self.request_done and self.bytes_in < size:
            chunk = await self._receive_chunk(limit)
            if chunk:
                self._prefetched.append(chunk)
        return b"".join(self._prefetched), self.request_done

    async def prefetch_body(self, limit: int) -> bytes | None:
        """Read the whole request body if it is at most `limit` bytes, else return None."""
        try:
            body, complete = await self.read_prefix(limit + 1, limit)
        except (BodyTooLarge, httpx.ReadError, ClientStalled):
            return None
        return body if complete else None

    async def peek_prefix(self, size: int) -> bytes:
        """Return at least the first `size` bytes of the body (or all of it), kept for `body()`.

        Returns what arrived so far if the client stalls or goes away, because forwarding then
        meets the same failure and sends the error response.
        """
        with contextlib.suppress(BodyTooLarge, httpx.ReadError, ClientStalled):
            await self.read_prefix(size, sys.maxsize)
        return b"".join(self._prefetched)

    async def body(self, limit: int) -> AsyncIterator[bytes]:
        """Yield the request body, what was read ahead first; raise BodyTooLarge past `limit`."""
        if self.bytes_in > limit:
            raise BodyTooLarge
        for chunk in self._prefetched:
            yield chunk
        while not self.request_done:
            chunk = await self._receive_chunk(limit)
            if chunk:
                yield chunk

    async def drain(self) -> int:
        """Read and discard the rest of the request body, within DRAIN_* limits."""
        drained = 0
        deadline = time.monotonic() + DRAIN_MAX_SECONDS
        while (not (self.request_done or self.client_gone or self.stalled)
               and drained < DRAIN_MAX_BYTES):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(self._receive(),
                                                 min(remaining, DRAIN_IDLE_SECONDS))
            except asyncio.TimeoutError:
                break
            if message["type"] == "http.disconnect":
                self.client_gone = True
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.request_done = True
        return drained

    async def start_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.response_started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def send_body(self, chunk: bytes) -> None:
        self.bytes_out += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def send_last_body(self, chunk: bytes) -> None:
        self.bytes_out += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": False})

    async def end_response(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def respond(self, status: int, text: str,
                      extra_headers: list[tuple[bytes, bytes]] = ()) -> int:
        """Send a whole text response, then drain any unread request body; return its size.

        The status and body go out at once, but the response ends only after the drain.
        Ending it while the client is still sending makes the front end close the connection,
        and the client would then meet a reset instead of reading the response.
        """
        body = text.encode("utf-8")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            *extra_headers,
        ]
        await self.start_response(status, headers)
        await self.send_body(body)
        drained = await self.drain()
        await self.end_response()
        return drained

    async def respond_too_large(self, limit: int) -> None:
        megabytes = limit // (1024 * 1024)
        drained = await self.respond(
            413,
            f"Request body too large: the limit is {megabytes} MiB. Raise it with the "
            f"max_body_mb setting (--max-body-mb or SYNCPROXY_MAX_BODY_MB), which also sets "
            f"the sync core's limit.\n",
            [(b"connection", b"close")],
        )
        log.info("request body too large client=%s path=%s limit_mib=%d drained=%d",
                 self.client_address(), self.scope["path"], megabytes, drained)

    def record(self, metrics: Metrics, health_path: str) -> None:
        metrics.observe_request(self.scope["path"], health_path, self.status,
                                time.monotonic() - self.started, self.bytes_in, self.bytes_out)
        if self.reject_reason:
            metrics.rejected_requests.labels(reason=self.reject_reason).inc()

    def log(self) -> None:
        # The path only: a legacy media request carries the host key in its query string.
        access_log.info(
            "request client=%s method=%s path=%s status=%d in=%d out=%d ms=%d",
            self.client_address(), self.scope["method"], self.scope["path"],
            self.status, self.bytes_in, self.bytes_out,
            (time.monotonic() - self.started) * 1000,
        )


async def login_user_name(exchange: Exchange) -> str | None:
    """Return the user name a login request carries, or None if its body cannot be read."""
    body = await exchange.prefetch_body(MAX_LOGIN_BODY_BYTES)
    if body is None:
        return None
    headers = {key.decode("latin-1").lower(): value.decode("latin-1")
               for key, value in exchange.scope["headers"]}
    try:
        return read_credentials(headers, body).username
    except LoginBodyError:
        return None
