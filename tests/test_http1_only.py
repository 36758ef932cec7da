"""The front end never speaks HTTP/2: not through ALPN, not through h2c, not through the preface."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from support import SyncProxy, add_user, tls_client_context

HTTP2_FRAME_HEADER_SETTINGS = b"\x00\x00"  # any SETTINGS frame starts with a short length field


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("h1") / "data"
    add_user(data_dir, "alice", "secret")
    with SyncProxy(data_dir) as running:
        running.trust = running.ca_file()
        yield running


def tls_connect(server: SyncProxy, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLSocket:
    context = tls_client_context(server.trust, alpn)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_alpn_offering_h2_gets_http11(server: SyncProxy) -> None:
    with tls_connect(server, ("h2", "http/1.1")) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"


def test_alpn_offering_only_h2_gets_no_h2(server: SyncProxy) -> None:
    try:
        with tls_connect(server, ("h2",)) as sock:
            assert sock.selected_alpn_protocol() != "h2"
    except ssl.SSLError as error:
        # OpenSSL may also refuse the handshake with no_application_protocol.
        assert "application protocol" in str(error).lower()


def test_h2c_upgrade_is_served_as_http11(server: SyncProxy) -> None:
    with tls_connect(server) as sock:
        sock.sendall(
            b"GET /_syncproxy/health HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b" 101 " not in answer
    assert b"upgrade: h2c" not in answer.lower()


def test_h2c_upgrade_over_sync_path_reaches_core(server: SyncProxy) -> None:
    with tls_connect(server) as sock:
        sock.sendall(
            b"POST /sync/hostKey HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n"
            b"Connection: Upgrade, HTTP2-Settings, close\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        answer = read_all(sock)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), answer[:200]
    assert b" 101 " not in status_line


def test_prior_knowledge_preface_gets_400_and_no_frames(server: SyncProxy) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    with tls_connect(server) as sock:
        sock.sendall(preface + settings_frame)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"HTTP/2 is not supported")
    assert b"\x00\x00\x00\x04" not in answer  # no SETTINGS frame was sent back


def test_plain_http_to_tls_port_is_told_to_use_https(server: SyncProxy) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"https://" in answer
