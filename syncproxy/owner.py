"""Find whose request it is, so that a server with several sync cores can pick the user's core.

Where each protocol names the user (anki 26.9 clients and the legacy v8-v10 protocol):
- every current (v11) request: the host key `k` in the `anki-sync` header;
- a login, current or legacy: the user name in the body (see `login`), so the body is read
  ahead, at most `MAX_LOGIN_BODY_BYTES`;
- other legacy requests: the multipart field `k` (collection sync) or `sk` (media sync), which
  clients send before the `data` field, so only the first `LEGACY_PREFIX_BYTES` are read ahead;
- a legacy media start, `GET /msync/begin?k=...&v=...`: the query parameter `k`.

Nothing here decides whether a key or password is valid; the sync core still does that.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from .login import MAX_LOGIN_BODY_BYTES, LoginBodyError, is_login_request, read_credentials

LEGACY_PREFIX_BYTES = 4096
# A multipart part named k or sk whose value is a hex host key. Header lines other than
# Content-Disposition may sit between the name and the empty line.
_LEGACY_KEY_FIELD = re.compile(
    rb'name="s?k"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([0-9a-fA-F]{1,128})\r\n')


def legacy_form_host_key(prefix: bytes) -> str:
    """Return the host key in the start of a legacy multipart body, or ''."""
    match = _LEGACY_KEY_FIELD.search(prefix)
    return match.group(1).decode("ascii") if match else ""


def query_host_key(query_string: bytes) -> str:
    """Return the `k` parameter of a legacy media request's query string, or ''."""
    values = urllib.parse.parse_qs(query_string.decode("latin-1")).get("k")
    return values[0] if values else ""


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope["headers"]}


async def request_owner(exchange: Any, path: str, host_key: str) -> tuple[str, str | None]:
    """Return the host key and the user name that a request carries; '' and None if absent.

    `exchange` is the proxy's Exchange, and `host_key` the one from the `anki-sync` header.
    A body read here is kept and forwarded unchanged.
    """
    if host_key:
        return host_key, None
    scope = exchange.scope
    headers = _headers(scope)
    if is_login_request(scope["method"], path):
        body = await exchange.prefetch_body(MAX_LOGIN_BODY_BYTES)
        if body is None:
            return "", None
        try:
            return "", read_credentials(headers, body).username
        except LoginBodyError:
            return "", None
    if scope["query_string"]:
        key = query_host_key(scope["query_string"])
        if key:
            return key, None
    if headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return legacy_form_host_key(await exchange.peek_prefix(LEGACY_PREFIX_BYTES)), None
    return "", None
