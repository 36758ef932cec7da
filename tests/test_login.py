"""Reading credentials from login requests, as real and legacy clients send them."""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading

import pytest
import zstandard
from anki.collection import Collection

from syncproxy.login import MAX_LOGIN_BODY_BYTES, LoginBodyError, read_credentials

PASSWORD = "pä:ss wörd {\"}"


def capture_client_login(tmp_path, username: str, password: str) -> tuple[dict[str, str], bytes]:
    """Let the real anki client log in against a loopback socket; return its headers and body."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    captured: dict = {}

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            reader = connection.makefile("rb")
            request_line = reader.readline()
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = b""
            if headers.get("transfer-encoding") == "chunked":
                while (size := int(reader.readline().split(b";")[0], 16)) > 0:
                    body += reader.read(size)
                    reader.readline()
                reader.readline()
            else:
                body = reader.read(int(headers.get("content-length", "0")))
            captured.update(request_line=request_line, headers=headers, body=body)
            connection.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    col = Collection(str(tmp_path / "client.anki2"))
    try:
        with pytest.raises(Exception):
            col.sync_login(username=username, password=password, endpoint=f"http://127.0.0.1:{port}/")
    finally:
        col.close()
        thread.join(timeout=10)
        listener.close()
    assert captured["request_line"].startswith(b"POST /sync/hostKey ")
    return captured["headers"], captured["body"]


def legacy_login_body(username: str, password: str, compress: bool = True) -> tuple[str, bytes]:
    """Build a login body in the multipart format of Anki 2.1 clients before the v11 protocol.

    No legacy client can run here, so this follows that client's request layout: a ``c``
    field, then a ``data`` file field holding the gzip-compressed JSON.
    """
    boundary = b"Anki-sync-boundary"
    payload = json.dumps({"u": username, "p": password}).encode("utf-8")
    data = io.BytesIO()
    if compress:
        with gzip.GzipFile(mode="wb", fileobj=data, compresslevel=6) as target:
            target.write(payload)
    else:
        data.write(payload)
    body = (
        b"--" + boundary + b"\r\n"
        + b'Content-Disposition: form-data; name="c"\r\n\r\n' + (b"1" if compress else b"0") + b"\r\n"
        + b"--" + boundary + b"\r\n"
        + b'Content-Disposition: form-data; name="data"; filename="data"\r\n'
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + data.getvalue() + b"\r\n"
        + b"--" + boundary + b"--\r\n"
    )
    return f"multipart/form-data; boundary={boundary.decode()}", body


def test_current_client_login_body(tmp_path):
    headers, body = capture_client_login(tmp_path, "alice", PASSWORD)

    credentials = read_credentials(headers, body)

    assert "anki-sync" in headers
    assert credentials.username == "alice"
    assert credentials.password == PASSWORD


def test_credentials_repr_hides_password():
    headers = {"anki-sync": "{}"}
    body = zstandard.ZstdCompressor().compress(json.dumps({"u": "bob", "p": "hunter2"}).encode())

    credentials = read_credentials(headers, body)

    assert "hunter2" not in repr(credentials)


@pytest.mark.parametrize("compress", [True, False])
def test_legacy_multipart_login(compress):
    content_type, body = legacy_login_body("bob", PASSWORD, compress=compress)

    credentials = read_credentials({"content-type": content_type}, body)

    assert credentials.username == "bob"
    assert credentials.password == PASSWORD


def test_zstd_bomb_rejected():
    huge = json.dumps({"u": "x", "p": "a" * (MAX_LOGIN_BODY_BYTES * 4)}).encode()
    body = zstandard.ZstdCompressor(write_content_size=False).compress(huge)
    assert len(body) < MAX_LOGIN_BODY_BYTES

    with pytest.raises(LoginBodyError):
        read_credentials({"anki-sync": "{}"}, body)


def test_gzip_bomb_rejected():
    content_type, body = legacy_login_body("x", "a" * (MAX_LOGIN_BODY_BYTES * 4))
    assert len(body) < MAX_LOGIN_BODY_BYTES

    with pytest.raises(LoginBodyError):
        read_credentials({"content-type": content_type}, body)


@pytest.mark.parametrize(
    "headers, body",
    [
        ({"anki-sync": "{}"}, b"not zstd"),
        ({"anki-sync": "{}"}, zstandard.ZstdCompressor().compress(b"[1, 2]")),
        ({"anki-sync": "{}"}, zstandard.ZstdCompressor().compress(b'{"u": "x"}')),
        ({"content-type": "application/json"}, b'{"u": "x", "p": "y"}'),
        ({"content-type": "multipart/form-data; boundary=zz"}, b"--zz\r\n\r\nno fields\r\n--zz--\r\n"),
        ({"anki-sync": "{}"}, b"\0" * (MAX_LOGIN_BODY_BYTES + 1)),
    ],
    ids=["not-zstd", "not-object", "no-password", "plain-json", "no-data-field", "oversize"],
)
def test_unreadable_login_bodies(headers, body):
    with pytest.raises(LoginBodyError):
        read_credentials(headers, body)
