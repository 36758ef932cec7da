"""Only idle time is limited, never a whole request, and each timeout names its cause."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import rawhttp
from slow_upstream import SILENT_SECONDS, TRICKLE_BYTES, SlowUpstream
from support import SyncProxy

IDLE_TIMEOUT = 3


@pytest.fixture(scope="module")
def upstream() -> Iterator[SlowUpstream]:
    with SlowUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: SlowUpstream) -> Iterator[SyncProxy]:
    data_dir = tmp_path_factory.mktemp("timeouts") / "data"
    with SyncProxy(data_dir, "--upstream", f"http://127.0.0.1:{upstream.port}",
                   "--upstream-idle-timeout", str(IDLE_TIMEOUT),
                   "--client-idle-timeout", str(IDLE_TIMEOUT)) as proxy:
        yield proxy


def test_slow_answer_longer_than_idle_timeout(server: SyncProxy, upstream: SlowUpstream) -> None:
    body = b"u" * (1024 * 1024)
    started = time.monotonic()
    response = httpx.post(server.endpoint + "sync/trickle", content=body, verify=False,
                          timeout=60)
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert response.content == b"t" * TRICKLE_BYTES
    assert elapsed > 2 * IDLE_TIMEOUT
    assert len(body) in upstream.bodies_received


def test_silent_upstream_gets_504(server: SyncProxy) -> None:
    started = time.monotonic()
    response = httpx.post(server.endpoint + "sync/silent", content=b"{}", verify=False,
                          timeout=60)
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert "upstream_idle_timeout" in response.text
    assert elapsed < SILENT_SECONDS


def test_stalled_request_body_gets_408(server: SyncProxy) -> None:
    with rawhttp.connect(server.port, tls=True) as sock:
        rawhttp.send_all(sock, b"POST /sync/meta HTTP/1.1\r\nHost: h\r\n"
                               b"Content-Length: 1000\r\n\r\n0123456789")
        reply = rawhttp.read_response(sock, timeout=IDLE_TIMEOUT + 10)

    assert reply.status == 408
    assert b"client_idle_timeout" in reply.body


def test_client_that_stops_reading_is_cut_off(server: SyncProxy) -> None:
    with rawhttp.connect(server.port, tls=True) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rawhttp.send_all(sock, b"GET /sync/big HTTP/1.1\r\nHost: h\r\n\r\n")
        time.sleep(IDLE_TIMEOUT + 4)
        # Whatever was buffered before the stall can still be read; then the stream must end.
        received = 0
        sock.settimeout(10)
        try:
            while data := sock.recv(1024 * 1024):
                received += len(data)
        except (ConnectionResetError, OSError):
            pass

    assert received < 64 * 1024 * 1024
    assert "client stopped reading" in server.log()
    assert httpx.get(server.endpoint + "_syncproxy/health", verify=False).status_code == 200


def test_client_gone_before_its_response_leaves_no_error(server: SyncProxy) -> None:
    """Clients that leave with a request in flight (a closed app, a lost network) are normal."""
    for _ in range(5):
        with rawhttp.connect(server.port, tls=True) as sock:
            sock.sendall(b"POST /sync/trickle HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Length: 2\r\n\r\n{}")
    time.sleep(1 + TRICKLE_BYTES + 1)  # the upstream's response arrives and ends meanwhile

    assert "Traceback" not in server.log()
    assert "ERROR" not in server.log()


def test_upstream_connect_timeout_gets_502(tmp_path: Path) -> None:
    # A listener that never accepts, with its one-slot queue filled: further connection
    # attempts get no answer at all, which is what an unreachable host looks like.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(blackhole.getsockname())
            fillers.append(filler)
        port = blackhole.getsockname()[1]
        try:
            with SyncProxy(tmp_path / "data", "--upstream", f"http://127.0.0.1:{port}",
                           "--upstream-connect-timeout", "1") as proxy:
                started = time.monotonic()
                response = httpx.post(proxy.endpoint + "sync/meta", content=b"{}",
                                      verify=False, timeout=30)
                elapsed = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()

    assert response.status_code == 502
    assert "upstream_connect_timeout" in response.text
    assert elapsed < 10
