"""One port for an HTTP/2 site and Anki sync: syncproxy routes by SNI in front of real nginx.

nginx serves www.test with its own certificate and HTTP/2 on loopback and requires a PROXY
protocol header; syncproxy terminates sync.test itself and passes every other name through,
still encrypted. The anki client needs sync.test to resolve to 127.0.0.1: it runs in a private
mount namespace whose /etc/hosts says so, which leaves the machine's /etc/hosts untouched.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from nginx_server import NGINX, Nginx
from support import AnkiClient, SyncProxy, add_user, free_port
from test_clienthello import refragment

PAGE = b"served by nginx over http/2\n"
BIG_SIZE = 16 * 1024 * 1024
USER, PASSWORD = "alice", "correct horse"
CURL_CLIENT_ADDRESS = "127.0.0.5"  # any loopback address other than syncproxy's own

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (apt-get install nginx)")


@pytest.fixture
def nginx() -> Iterator[Nginx]:
    with Nginx(trustme.CA()) as server:
        server.add_file("page.txt", PAGE)
        server.add_file("big.bin", random.Random(7).randbytes(BIG_SIZE))
        yield server


def start_shared(tmp_path: Path, nginx: Nginx, *extra: str) -> SyncProxy:
    data_dir = tmp_path / "data"
    add_user(data_dir, USER, PASSWORD)
    return SyncProxy(
        data_dir, "--sync-name", "sync.test", "--hostname", "sync.test",
        "--passthrough", f"127.0.0.1:{nginx.port}", *extra,
    ).start()


@pytest.fixture
def shared(tmp_path: Path, nginx: Nginx) -> Iterator[SyncProxy]:
    server = start_shared(tmp_path, nginx, "--passthrough-proxy-protocol", "v1")
    try:
        yield server
    finally:
        server.stop()


def curl_www(port: int, nginx: Nginx, path: str) -> dict[str, str]:
    """Fetch https://www.test/PATH through ``port`` with HTTP/2, trusting only nginx's CA."""
    completed = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--http2", "--interface", CURL_CLIENT_ADDRESS,
            "--cacert", str(nginx.ca_file), "--connect-to", f"www.test:443:127.0.0.1:{port}",
            "--output", "/dev/null",
            "--write-out", "%{http_code} %{http_version} %{local_port} %{size_download}",
            f"https://www.test/{path}",
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    status, version, local_port, size = completed.stdout.split()
    return {"status": status, "version": version, "local_port": local_port, "size": size}


def private_hosts(tmp_path: Path) -> list[str]:
    """Return a command prefix that runs a program seeing sync.test as 127.0.0.1."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private /etc/hosts needs root and unshare (util-linux)")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost sync.test\n")
    return ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]


def tls_exchange(port: int, server_name: str, ca_file: Path, request: bytes,
                 split_hello: Callable[[bytes], list[bytes]]) -> bytes:
    """Connect, send the ClientHello in the pieces ``split_hello`` makes, finish TLS, return the response."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        for piece in split_hello(outgoing.read()):
            sock.sendall(piece)
            time.sleep(0.05)  # each piece leaves as its own TCP segment

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "connection closed during the handshake"
                incoming.write(data)
        tls.write(request)
        sock.sendall(outgoing.read())

        response = b""
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:
                    return response
                response += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return response
            data = sock.recv(65536)
            if not data:
                return response
            incoming.write(data)


def get(name: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


def three_segments(hello: bytes) -> list[bytes]:
    return [hello[:3], hello[3:60], hello[60:]]


def many_records(hello: bytes) -> list[bytes]:
    records = refragment(hello, 64)
    return [records[index : index + 100] for index in range(0, len(records), 100)]


def round_trip(tmp_path: Path, endpoint: str, ca_file: Path, wrapper: list[str]) -> None:
    uploader = AnkiClient(tmp_path / "client-a", endpoint, ca_file, wrapper)
    uploader.build(300, 3, label="shared-port")
    uploader.login(USER, PASSWORD)
    assert uploader.sync("--upload")["required"] == "FULL_UPLOAD"
    downloader = AnkiClient(tmp_path / "client-b", endpoint, ca_file, wrapper)
    downloader.login(USER, PASSWORD)
    assert downloader.sync("--download")["required"] == "FULL_DOWNLOAD"
    assert downloader.dump() == uploader.dump()


def test_http2_site_and_sync_share_port(tmp_path, nginx, shared):
    wrapper = private_hosts(tmp_path)
    downloads: list[dict[str, str]] = []
    errors: list[BaseException] = []
    syncing = threading.Event()

    def browse() -> None:
        try:
            while syncing.is_set() or not downloads:
                downloads.append(curl_www(shared.port, nginx, "big.bin"))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    syncing.set()
    browser = threading.Thread(target=browse)
    browser.start()
    try:
        round_trip(tmp_path, f"https://sync.test:{shared.port}/", shared.ca_file(), wrapper)
    finally:
        syncing.clear()
        browser.join(120)

    assert not errors, errors
    assert downloads
    for download in downloads:
        assert download["status"] == "200"
        assert download["version"] == "2"
        assert int(download["size"]) == BIG_SIZE

    entries = nginx.access_log()
    assert len(entries) == len(downloads)
    assert {entry.proxy_protocol_addr for entry in entries} == {CURL_CLIENT_ADDRESS}
    assert {entry.proxy_protocol_port for entry in entries} == {d["local_port"] for d in downloads}
    assert {entry.server_protocol for entry in entries} == {"HTTP/2.0"}
    assert {entry.ssl_server_name for entry in entries} == {"www.test"}

    log = shared.log()
    assert "request client=127.0.0.1 method=POST path=/sync/upload status=200" in log
    assert "request client=127.0.0.1 method=POST path=/sync/download status=200" in log
    assert f"passthrough start client={CURL_CLIENT_ADDRESS}:" in log


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_passthrough_sends_proxy_header(tmp_path, nginx, version):
    server = start_shared(tmp_path, nginx, "--passthrough-proxy-protocol", version)
    try:
        download = curl_www(server.port, nginx, "page.txt")
    finally:
        server.stop()
    assert download["version"] == "2"
    [entry] = nginx.access_log()
    assert entry.proxy_protocol_addr == CURL_CLIENT_ADDRESS
    assert entry.proxy_protocol_port == download["local_port"]


@pytest.mark.parametrize("split_hello", [three_segments, many_records])
def test_split_hello_routes_right(nginx, shared, split_hello):
    page = tls_exchange(shared.port, "www.test", nginx.ca_file, get("www.test", "/page.txt"), split_hello)
    assert page.startswith(b"HTTP/1.1 200")
    assert page.endswith(PAGE)

    health = tls_exchange(shared.port, "sync.test", shared.ca_file(),
                          get("sync.test", "/_syncproxy/health"), split_hello)
    assert health.startswith(b"HTTP/1.1 200")


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return True


def test_garbage_closed_others_unaffected(nginx, shared):
    hello = tls_hello("www.test")
    slow = socket.create_connection(("127.0.0.1", shared.port))
    slow.sendall(hello[:40])  # and never the rest

    results: list[dict[str, str]] = []
    download = threading.Thread(target=lambda: results.append(curl_www(shared.port, nginx, "big.bin")))
    download.start()

    garbage_inputs = [
        b"\x16\x03\x01\x00\x20" + b"\x02" + bytes(31),  # a handshake record but not a ClientHello
        b"\x16\x03\x01\x00\x08\x01\x00\xff\xff" + bytes(4),  # ClientHello longer than the cap
        bytes([0x00, 0xFF, 0x13, 0x37]) * 8,
        hello[:5] + b"\x01\x00\x00\x30" + b"\xee" * 200,  # corrupt body
    ]
    for garbage in garbage_inputs:
        with socket.create_connection(("127.0.0.1", shared.port)) as sock:
            sock.sendall(garbage)
            assert closed_by_server(sock, 5), garbage

    page = tls_exchange(shared.port, "www.test", nginx.ca_file, get("www.test", "/page.txt"), lambda h: [h])
    assert page.endswith(PAGE)
    health = tls_exchange(shared.port, "sync.test", shared.ca_file(),
                          get("sync.test", "/_syncproxy/health"), lambda h: [h])
    assert health.startswith(b"HTTP/1.1 200")
    download.join(60)
    [download_result] = results
    assert download_result["version"] == "2"
    assert int(download_result["size"]) == BIG_SIZE

    assert closed_by_server(slow, 15)
    slow.close()
    log = shared.log()
    # Three malformed ClientHellos and the stalled one; the fourth input is not TLS at all.
    assert log.count("connection closed before tls") == 4
    assert "connection closed: not tls client=127.0.0.1 first_byte=0x00" in log
    assert "timed out waiting for the first bytes" in log


def tls_hello(server_name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_accepts_proxy_header_from_trusted_peer(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, USER, PASSWORD)
    with SyncProxy(data_dir, "--proxy-protocol-from", "127.0.0.0/8") as server:
        ca_file = server.ca_file()
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n"
        response = tls_exchange(server.port, "localhost", ca_file, get("localhost", "/_syncproxy/health"),
                                lambda hello: [header + hello[:10], hello[10:]])
        assert response.startswith(b"HTTP/1.1 200")
        plain = tls_exchange(server.port, "localhost", ca_file, get("localhost", "/_syncproxy/health"),
                             lambda hello: [hello])
        assert plain.startswith(b"HTTP/1.1 200")
    log = server.log()
    assert "request client=192.0.2.7 method=GET path=/_syncproxy/health status=200" in log
    assert "request client=127.0.0.1 method=GET path=/_syncproxy/health status=200" in log


def test_rejects_proxy_header_from_untrusted_peer(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, USER, PASSWORD)
    with SyncProxy(data_dir, "--proxy-protocol-from", "10.0.0.0/8") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n" + tls_hello("localhost"))
            assert closed_by_server(sock, 5)
    assert "proxy protocol header from untrusted peer client=127.0.0.1" in server.log()
    assert "192.0.2.7" not in server.log()


def test_stop_closes_idle_passthrough(tmp_path, nginx):
    server = start_shared(tmp_path, nginx, "--passthrough-proxy-protocol", "v1")
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        context = ssl.create_default_context(cafile=str(nginx.ca_file))
        idle_tls = context.wrap_socket(idle, server_hostname="www.test")  # nginx's handshake
        assert idle_tls.version() is not None

        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 15  # far below the 300 s shutdown grace
        assert closed_by_server(idle_tls, 5)
    finally:
        idle.close()
    assert "closing passed-through connections count=1" in server.log()


def test_route_by_name_and_dead_route(tmp_path, nginx):
    dead_port = free_port()  # nothing listens there
    data_dir = tmp_path / "data"
    add_user(data_dir, USER, PASSWORD)
    server = SyncProxy(
        data_dir, "--sync-name", "sync.test", "--route", f"www.test=127.0.0.1:{nginx.port}",
        "--passthrough", f"127.0.0.1:{dead_port}", "--passthrough-proxy-protocol", "v2",
    ).start()
    try:
        assert curl_www(server.port, nginx, "page.txt")["version"] == "2"
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(tls_hello("other.test"))
            assert closed_by_server(sock, 15)
    finally:
        server.stop()
    assert "passthrough connect failed client=127.0.0.1:" in server.log()
    assert f"sni=other.test route=127.0.0.1:{dead_port}" in server.log()
