"""The plain-HTTP listener's app: ACME HTTP-01 challenges, and a redirect to https for the rest.

Only ``GET``/``HEAD /.well-known/acme-challenge/TOKEN`` is served, straight
from the webroot certbot writes into (RFC 8555 section 8.3). Every other
request is redirected to the same host and path on the TLS port, so nothing
reaches the sync core without TLS. Each challenge request is counted so a
failed issuance can say whether the CA ever reached this listener.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .proxy import serve_lifespan

log = logging.getLogger("syncproxy.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# ACME tokens are base64url without padding (RFC 8555 section 8.1); anything
# else cannot name a file certbot wrote, and rejecting it keeps paths inside
# the webroot.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,255}")
# A Host header value we are willing to echo into a Location header.
HOST_PATTERN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?")


@dataclass
class ChallengeRequests:
    """What the CA's validation requests looked like, for diagnosing failures."""

    total: int = 0
    served: int = 0
    last_at: Optional[float] = None
    last_client: str = ""

    def record(self, client: str, served: bool) -> None:
        self.total += 1
        self.served += int(served)
        self.last_at = time.time()
        self.last_client = client


@dataclass
class ChallengeApp:
    """ASGI app for the plain-HTTP listener."""

    webroot: Path
    https_port: int
    requests: ChallengeRequests = field(default_factory=ChallengeRequests)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return

        path = scope.get("path", "")
        client = (scope.get("client") or ("-", 0))[0]
        if path.startswith(CHALLENGE_PREFIX):
            await self._challenge(scope, send, path[len(CHALLENGE_PREFIX):], client)
        else:
            await self._redirect(scope, send)

    async def _challenge(self, scope, send, token: str, client: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"only GET and HEAD are served here\n", [(b"allow", b"GET, HEAD")])
            return
        body = None
        if TOKEN_PATTERN.fullmatch(token):
            try:
                body = (self.webroot / ".well-known" / "acme-challenge" / token).read_bytes()
            except OSError:
                body = None
        self.requests.record(client, body is not None)
        log.info("acme challenge request client=%s token=%s found=%s", client, token[:64], body is not None)
        if body is None:
            await _respond(send, 404, b"no such ACME challenge token\n")
            return
        await _respond(send, 200, body if scope["method"] == "GET" else b"",
                       content_length=len(body), content_type=b"application/octet-stream")

    async def _redirect(self, scope, send) -> None:
        host = _header(scope, b"host")
        match = HOST_PATTERN.fullmatch(host or "")
        if not match:
            await _respond(send, 400, b"this port only redirects to https, and needs a valid Host header\n")
            return
        hostname = match.group(1)
        port = "" if self.https_port == 443 else f":{self.https_port}"
        target = scope.get("raw_path") or scope["path"].encode()
        if isinstance(target, bytes):
            target = target.decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        location = f"https://{hostname}{port}{target}" + (f"?{query}" if query else "")
        # 308 keeps the method and body for a POST; GET and HEAD get the
        # classic 301 that every client follows.
        status = 301 if scope["method"] in ("GET", "HEAD") else 308
        await _respond(send, status, f"use {location}\n".encode(), [(b"location", location.encode("latin-1"))])


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _respond(send, status: int, body: bytes, headers=(), *, content_length: Optional[int] = None,
                   content_type: bytes = b"text/plain; charset=utf-8") -> None:
    length = len(body) if content_length is None else content_length
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(length).encode()),
                    (b"cache-control", b"no-store"), *headers],
    })
    await send({"type": "http.response.body", "body": body})
