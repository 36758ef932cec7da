"""The connection limit holds without harm, and the metrics listener reports without leaking."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

import rawhttp
from support import AnkiClient, SyncProxy, add_user, free_port

MAX_CONNECTIONS = 20


def health_recovers(server: SyncProxy, timeout: float = 20.0) -> bool:
    """Return True once the health check answers 200: closed connections free their slots
    only when the server notices the close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            url = server.endpoint + "_syncproxy/health"
            if httpx.get(url, verify=False, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def test_connection_limit_plain(tmp_path: Path) -> None:
    with SyncProxy(tmp_path / "data", "--max-connections", str(MAX_CONNECTIONS),
                   tls=False) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
        try:
            reply = rawhttp.exchange(server.port, False, b"GET /_syncproxy/health HTTP/1.1\r\n"
                                                         b"Host: h\r\n\r\n")
            assert reply.status == 503
            assert b"max_connections" in reply.body
        finally:
            for sock in held:
                sock.close()
        assert health_recovers(server)
    assert "connection limit reached" in server.log()


def test_connection_limit_tls(tmp_path: Path) -> None:
    with SyncProxy(tmp_path / "data", "--max-connections", str(MAX_CONNECTIONS)) as server:
        held = [socket.create_connection(("127.0.0.1", server.port))
                for _ in range(MAX_CONNECTIONS * 3)]
        try:
            extra = socket.create_connection(("127.0.0.1", server.port))
            assert rawhttp.is_closed(extra, timeout=5)
        finally:
            for sock in held:
                sock.close()
        assert health_recovers(server)


def scrape(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    return response.text


def test_metrics_count_requests_without_secrets(tmp_path: Path) -> None:
    password = "metrics-password-Kx9"
    data_dir = tmp_path / "data"
    add_user(data_dir, "metrics-user", password)
    metrics_port = free_port()
    with SyncProxy(data_dir, "--metrics-port", str(metrics_port), "--max-body-mb", "1") as server:
        client = AnkiClient(tmp_path / "client", server.endpoint, server.ca_file())
        client.build(20, 1)
        client.login("metrics-user", password)
        client.sync("--upload")
        httpx.get(server.endpoint + "no/such/path?k=" + client.hkey, verify=False)
        httpx.post(server.endpoint + "sync/upload", content=b"x" * (2 * 1024 * 1024),
                   verify=False, timeout=60)
        text = scrape(metrics_port)
        not_found = httpx.get(f"http://127.0.0.1:{metrics_port}/other")

    assert 'syncproxy_requests_total{endpoint="/sync/hostKey",status="200"} 1.0' in text
    assert 'syncproxy_requests_total{endpoint="/sync/upload",status="200"} 1.0' in text
    assert 'syncproxy_requests_total{endpoint="other",status="404"} 1.0' in text
    assert 'syncproxy_rejected_requests_total{reason="body_too_large"} 1.0' in text
    assert 'syncproxy_request_duration_seconds_count{endpoint="/sync/upload"}' in text
    assert "syncproxy_certificate_days_left" in text
    assert "syncproxy_core_restarts_total 0.0" in text
    assert "syncproxy_active_syncs" in text
    assert client.hkey not in text
    assert password not in text
    assert "metrics-user" not in text
    assert not_found.status_code == 404
    assert client.hkey not in server.log()
    assert password not in server.log()


def test_metrics_off_by_default(tmp_path: Path) -> None:
    with SyncProxy(tmp_path / "data") as server:
        pass
    assert "metrics listening" not in server.log()
