"""Reading the user name and password from a client's login request (`POST /sync/hostKey`).

The front end reads the password of one kind of request only: the login of a user whose
password hash is still the one imported from ankisyncd. It checks the password against that
hash, stores a PHC hash the sync core accepts and restarts the core with the user. Then it
forwards the original request body unchanged, so the core issues the host key as for any user.

Two request formats reach `/sync/hostKey`:

- the current protocol (v11: Anki 2.1.57 and later, AnkiDroid 2.16 and later): an ``anki-sync``
  header and a body that is one zstd frame of the JSON ``{"u": USER, "p": PASSWORD}``;
- the legacy protocol (v8 to v10): a ``multipart/form-data`` body whose ``data`` field holds the
  same JSON, gzip-compressed when the field ``c`` is ``1``.

A login body is a few dozen bytes, so anything larger than `MAX_LOGIN_BODY_BYTES`, before or
after decompression, is not a login this module reads.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser

import zstandard

LOGIN_PATH = "/sync/hostKey"
MAX_LOGIN_BODY_BYTES = 64 * 1024


class LoginBodyError(ValueError):
    """A login request body that cannot be read."""


@dataclass(frozen=True)
class Credentials:
    """A user name and password from a login request; the password stays out of repr()."""

    username: str
    password: str = field(repr=False)


def _decode_json(payload: bytes) -> Credentials:
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoginBodyError(f"login body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise LoginBodyError("login body is not a JSON object")
    username, password = document.get("u"), document.get("p")
    if not isinstance(username, str) or not isinstance(password, str):
        raise LoginBodyError("login body lacks the string fields 'u' and 'p'")
    return Credentials(username=username, password=password)


def _read_current(body: bytes) -> Credentials:
    try:
        payload = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_LOGIN_BODY_BYTES)
    except zstandard.ZstdError as error:
        raise LoginBodyError(f"login body is not a zstd frame of at most "
                             f"{MAX_LOGIN_BODY_BYTES} bytes: {error}") from None
    return _decode_json(payload)


def _gunzip_bounded(data: bytes) -> bytes:
    # wbits 16 + MAX_WBITS: expect a gzip header, as gzip.GzipFile writes it.
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        payload = decompressor.decompress(data, MAX_LOGIN_BODY_BYTES + 1)
    except zlib.error as error:
        raise LoginBodyError(f"login data field is not gzip: {error}") from None
    if len(payload) > MAX_LOGIN_BODY_BYTES or decompressor.unconsumed_tail:
        raise LoginBodyError(f"login data field expands beyond {MAX_LOGIN_BODY_BYTES} bytes")
    return payload


def _read_legacy(content_type: str, body: bytes) -> Credentials:
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise LoginBodyError("multipart login body has no parts; is the boundary right?")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = part.get_payload(decode=True) or b""
    if "data" not in fields:
        raise LoginBodyError("multipart login body has no 'data' field")

    data = fields["data"]
    if fields.get("c", b"0").strip() == b"1":
        data = _gunzip_bounded(data)
    return _decode_json(data)


def is_login_request(method: str, path: str) -> bool:
    """Return whether a request is a client's login, given its method and path without prefix."""
    return method == "POST" and path == LOGIN_PATH


def read_credentials(headers: Mapping[str, str], body: bytes) -> Credentials:
    """Return the user name and password in a login request body.

    `headers` maps lower-case header names to values. Raise LoginBodyError for a body in
    neither format, or one larger than `MAX_LOGIN_BODY_BYTES`.
    """
    if len(body) > MAX_LOGIN_BODY_BYTES:
        raise LoginBodyError(f"login body is {len(body)} bytes; at most {MAX_LOGIN_BODY_BYTES} "
                             f"are read")
    if "anki-sync" in headers:
        return _read_current(body)
    content_type = headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        return _read_legacy(content_type, body)
    raise LoginBodyError(f"login request has neither an anki-sync header nor a multipart body "
                         f"(content-type {content_type!r})")

