"""A corpus of bad input, sent as raw bytes over TLS and plain TCP, each with its expected answer.

Two front ends run for the whole module, one with TLS and one with --no-tls (forwarding to the
first one's sync core), both with small limits so that every case ends within seconds. After the corpus a real client must still sync,
and the TLS front end's resident memory must be within 20 MB of where it was before the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rawhttp
from rawhttp import CLOSED, Reply
from support import AnkiClient, SyncProxy, add_user, free_port

USER = "corpus-user"
PASSWORD = "corpus-password-Zq7"
MAX_BODY_MB = 1
MIB = 1024 * 1024
HEAD_TIMEOUT = 2
IDLE_TIMEOUT = 3
SERVER_ARGS = ("--max-body-mb", str(MAX_BODY_MB), "--request-head-timeout", str(HEAD_TIMEOUT),
               "--client-idle-timeout", str(IDLE_TIMEOUT), "--keep-alive-timeout",
               str(IDLE_TIMEOUT))
RSS_GROWTH_LIMIT_KIB = 20 * 1024


@dataclasses.dataclass
class Servers:
    tls: SyncProxy
    plain: SyncProxy
    client: AnkiClient
    rss_before_kib: int

    def port(self, transport: str) -> int:
        return self.tls.port if transport == "tls" else self.plain.port


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("corpus")
    add_user(root / "tls-data", USER, PASSWORD)
    core_port = free_port()
    tls = SyncProxy(root / "tls-data", *SERVER_ARGS, "--core-port", str(core_port)).start()
    # The plain front end forwards to the TLS one's sync core, so one host key works on both.
    plain = SyncProxy(root / "plain-data", *SERVER_ARGS, "--upstream",
                      f"http://127.0.0.1:{core_port}", tls=False).start()
    try:
        client = AnkiClient(root / "client", tls.endpoint, tls.ca_file())
        client.build(200, 3, label="corpus")
        client.login(USER, PASSWORD)
        client.sync("--upload")
        # Warm up the code paths the corpus uses, so that first-use allocations are not
        # counted as growth.
        for _ in range(3):
            rawhttp.exchange(tls.port, True, oversized_with_length(tls_hkey=client.hkey))
            client.sync()
        assert plain.process is not None and tls.process is not None
        yield Servers(tls, plain, client, rawhttp.vm_rss_kib(tls.process.pid))
    finally:
        plain.stop()
        tls.stop()


def request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


def health(extra: str = "") -> bytes:
    return request(f"GET /_syncproxy/health HTTP/1.1\nHost: h\n{extra}")


def sync_header(hkey: str) -> str:
    return "anki-sync: " + json.dumps({"v": 11, "k": hkey, "c": "corpus", "s": "s1"})


def oversized_with_length(tls_hkey: str = "") -> bytes:
    body = b"x" * (MAX_BODY_MB * MIB + MIB)
    return request(f"POST /sync/upload HTTP/1.1\nHost: h\n{sync_header(tls_hkey)}\n"
                   f"Content-Length: {len(body)}\n", body)


def zstd_frame(data: bytes) -> bytes:
    """Wrap `data` in a valid zstd frame of uncompressed blocks, as the sync core expects."""
    block_size = 128 * 1024
    frame = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x38])  # magic; no checksum; 128 KiB window
    for start in range(0, len(data), block_size):
        block = data[start:start + block_size]
        last = start + block_size >= len(data)
        frame += (len(block) << 3 | int(last)).to_bytes(3, "little") + block
    return frame


def oversized_chunked(hkey: str) -> bytes:
    body = rawhttp.chunked(zstd_frame(b"y" * (MAX_BODY_MB * MIB + MIB)))
    return request(f"POST /sync/upload HTTP/1.1\nHost: h\n{sync_header(hkey)}\n"
                   f"Transfer-Encoding: chunked\n", body)


# Actions get (port, tls, servers) and return what came back.
Action = Callable[[int, bool, Servers], Reply]


def send(data: bytes) -> Action:
    return lambda port, tls, servers: rawhttp.exchange(port, tls, data)


def send_then_half_close(data: bytes) -> Action:
    def action(port: int, tls: bool, servers: Servers) -> Reply:
        with rawhttp.connect(port, tls) as sock:
            rawhttp.send_all(sock, data)
            if not tls:
                sock.shutdown(socket.SHUT_WR)
            return rawhttp.read_response(sock, timeout=IDLE_TIMEOUT + 8)
    return action


def trickle(data: bytes, interval: float, max_seconds: float = 30.0) -> Action:
    """Send one byte every `interval` seconds for at most `max_seconds`, then read the answer."""
    def action(port: int, tls: bool, servers: Servers) -> Reply:
        started = time.monotonic()
        with rawhttp.connect(port, tls) as sock:
            for byte in data:
                if time.monotonic() - started > max_seconds:
                    break
                if not rawhttp.send_all(sock, bytes([byte])):
                    break
                time.sleep(interval)
            return rawhttp.read_response(sock, timeout=5)
    return action


def with_hkey(build: Callable[[str], bytes]) -> Action:
    return lambda port, tls, servers: rawhttp.exchange(port, tls, build(servers.client.hkey))


def tls_hello_to(port: int, tls: bool, servers: Servers) -> Reply:
    """A real TLS handshake aimed at the port, whatever it speaks."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with rawhttp.insecure_context().wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(health())
                return rawhttp.read_response(sock)
        except (ssl.SSLError, OSError) as error:
            return Reply(None, {}, str(error).encode(), b"", time.monotonic() - started)


def plain_to(port: int, tls: bool, servers: Servers) -> Reply:
    return rawhttp.exchange(port, False, health())


def idle(port: int, tls: bool, servers: Servers) -> Reply:
    with rawhttp.connect(port, tls) as sock:
        return rawhttp.read_response(sock, timeout=IDLE_TIMEOUT + 8)


def pipelined(count: int) -> Action:
    def action(port: int, tls: bool, servers: Servers) -> Reply:
        with rawhttp.connect(port, tls) as sock:
            rawhttp.send_all(sock, health() * count)
            replies = [rawhttp.read_response(sock) for _ in range(count)]
        statuses = {reply.status for reply in replies}
        last = replies[-1]
        last.status = statuses.pop() if len(statuses) == 1 else -1
        return last
    return action


def many_headers(count: int) -> bytes:
    return request("GET /_syncproxy/health HTTP/1.1\nHost: h\n"
                   + "".join(f"X-Filler-{i}: {'v' * 20}\n" for i in range(count)))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    action: Action
    expect: int | str | tuple[int | str, ...]
    body_contains: str = ""
    transports: tuple[str, ...] = ("tls", "plain")


CASES = [
    # Request lines.
    Case("garbage line", send(b"GARBAGE\r\n\r\n"), 400),
    Case("method only", send(b"GET\r\n\r\n"), 400),
    Case("extra token in request line", send(request("GET / HTTP/1.1 extra\nHost: h\n")), 400),
    Case("double space in request line", send(request("GET  / HTTP/1.1\nHost: h\n")), 400),
    Case("unknown http version", send(request("GET / HTTP/9.9\nHost: h\n")), (400, 505)),
    Case("http/0.9 request", send(b"GET /\r\n"), (400, 408, CLOSED)),
    Case("control byte in target", send(b"GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n"), 400),
    Case("non-ascii target", send(b"GET /\xff\xfe HTTP/1.1\r\nHost: h\r\n\r\n"), 400),
    Case("nul bytes", send(b"\x00" * 64), (400, CLOSED)),
    Case("response sent as request", send(b"HTTP/1.1 200 OK\r\n\r\n"), 400),
    Case("method with bad characters", send(request("G@T / HTTP/1.1\nHost: h\n")), 400),
    Case("huge request target", send(request("GET /" + "a" * 200_000 + " HTTP/1.1\nHost: h\n")),
         431, "max_head_kb"),
    Case("absolute-form target", send(request("GET http://other.example/ HTTP/1.1\nHost: h\n")),
         404),
    Case("connect method", send(request("CONNECT other.example:443 HTTP/1.1\nHost: h\n")),
         404),
    Case("http/1.1 without host", send(request("GET /_syncproxy/health HTTP/1.1\n")), 400),
    Case("http/1.0 without host", send(request("GET /_syncproxy/health HTTP/1.0\n")), 200),
    Case("path traversal into sync", send(request("GET /sync/../../etc/passwd HTTP/1.1\n"
                                                  "Host: h\n")), 404),
    # Header names and values.
    Case("space in header name", send(request("GET / HTTP/1.1\nHo st: h\n")), 400),
    Case("empty header name", send(request("GET / HTTP/1.1\nHost: h\n: value\n")), 400),
    Case("header without colon", send(request("GET / HTTP/1.1\nHost h\n")), 400),
    Case("nul in header value", send(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n"), 400),
    Case("obsolete line folding", send(request("GET /_syncproxy/health HTTP/1.1\nHost: h\n"
                                               "X: a\n b\n")), (200, 400)),
    Case("huge header value", send(request("GET / HTTP/1.1\nHost: h\nX: " + "v" * 200_000
                                           + "\n")), 431, "max_head_kb"),
    Case("five thousand headers", send(many_headers(5000)), 431),
    Case("head split over many reads", trickle(health(), 0.01), 200),
    Case("two different content-lengths", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nContent-Length: 1\nContent-Length: 2\n", b"ab")),
        400),
    Case("negative content-length", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nContent-Length: -1\n")), 400),
    Case("non-numeric content-length", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nContent-Length: abc\n")), 400),
    Case("content-length beyond any limit", send(request(
        "POST /sync/upload HTTP/1.1\nHost: h\nContent-Length: 99999999999999999999\n")),
        413, "max_body_mb"),
    Case("transfer-encoding gzip", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nTransfer-Encoding: gzip\n")), 501),
    Case("content-length with chunked", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nContent-Length: 5\nTransfer-Encoding: chunked\n",
        b"0\r\n\r\n")), (400, 403)),
    Case("anki-sync header not json", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nanki-sync: {not json\nContent-Length: 0\n")),
        (400, 403)),
    Case("unknown host key", send(request(
        f"POST /sync/meta HTTP/1.1\nHost: h\n{sync_header('0' * 40)}\nContent-Length: 0\n")),
        403),
    # Bodies.
    Case("chunk size not hex", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n", b"zz\r\nab\r\n")),
        (400, 403, CLOSED)),
    Case("negative chunk size", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n", b"-1\r\nab\r\n")),
        (400, 403, CLOSED)),
    Case("chunk longer than declared", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n",
        b"2\r\nabcdef\r\n0\r\n\r\n")), (400, 403, CLOSED)),
    Case("truncated body then stall", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nContent-Length: 100\n", b"0123456789")),
        (403, 408)),
    Case("truncated body then half-close", send_then_half_close(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nContent-Length: 100\n", b"0123456789")),
        (400, 403, 408, CLOSED), transports=("plain",)),
    Case("oversized body with content-length", with_hkey(oversized_with_length), 413,
         "max_body_mb"),
    Case("oversized body chunked", with_hkey(oversized_chunked), 413, "max_body_mb"),
    Case("oversized body expecting 100-continue", send(request(
        "POST /sync/upload HTTP/1.1\nHost: h\nExpect: 100-continue\n"
        f"Content-Length: {3 * MIB}\n")), (100, 413)),
    # Slow and idle clients.
    Case("slow head", trickle(health(), 0.5, max_seconds=HEAD_TIMEOUT + 2), 408,
         "request_head_timeout"),
    Case("head that stops", send(b"GET /_syncproxy/health HTTP/1.1\r\nHost: h\r\n"), 408,
         "request_head_timeout"),
    Case("idle connection", idle, CLOSED),
    # HTTP/2 and other protocols.
    Case("http/2 preface", send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 400, "HTTP/1.1 only"),
    Case("h2c upgrade is ignored", send(health("Connection: Upgrade, HTTP2-Settings\n"
                                               "Upgrade: h2c\nHTTP2-Settings: AAMAAABkAAQAAP__\n")),
         200),
    Case("h2c upgrade with a body", send(request(
        "POST /sync/meta HTTP/1.1\nHost: h\nConnection: Upgrade, HTTP2-Settings\n"
        "Upgrade: h2c\nHTTP2-Settings: AAMAAABkAAQAAP__\nContent-Length: 2\n", b"{}")),
        (400, 403)),
    Case("websocket upgrade", send(health("Connection: Upgrade\nUpgrade: websocket\n"
                                          "Sec-WebSocket-Version: 13\n"
                                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n")),
         200),
    Case("tls to the plain port", tls_hello_to, (400, CLOSED), transports=("plain",)),
    Case("plain http to the tls port", plain_to, 400, "https://", transports=("tls",)),
    Case("tls record with garbage", send(b"\x16\x03\x01\x00\x05hello"), (400, CLOSED),
         transports=("plain",)),
    Case("pipelined requests", pipelined(50), 200),
]


@pytest.mark.parametrize("transport", ["tls", "plain"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(servers: Servers, case: Case, transport: str) -> None:
    if transport not in case.transports:
        pytest.skip(f"{case.name} applies only to {', '.join(case.transports)}")
    reply = case.action(servers.port(transport), transport == "tls", servers)
    expected = case.expect if isinstance(case.expect, tuple) else (case.expect,)
    assert reply.outcome in expected, reply.raw[:300]
    if case.body_contains:
        assert case.body_contains in reply.body.decode("utf-8", "replace")


def test_tls_garbage_after_record_header(servers: Servers) -> None:
    with rawhttp.connect(servers.tls.port, tls=False) as sock:
        rawhttp.send_all(sock, b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100)
        assert rawhttp.is_closed(sock, timeout=10)


def test_client_still_syncs_after_corpus(servers: Servers) -> None:
    servers.client.edit(5, "after-corpus")
    result = servers.client.sync()
    assert result["required"] in ("NORMAL_SYNC", "NO_CHANGES")
    for server in (servers.tls, servers.plain):
        assert server.process is not None and server.process.poll() is None
        assert rawhttp.exchange(server.port, server.tls, health()).status == 200


def test_memory_after_corpus(servers: Servers) -> None:
    assert servers.tls.process is not None
    rss_after = rawhttp.vm_rss_kib(servers.tls.process.pid)
    growth = rss_after - servers.rss_before_kib
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB"


def test_secrets_absent_from_logs(servers: Servers) -> None:
    log = servers.tls.log() + servers.plain.log()
    assert PASSWORD not in log
    assert servers.client.hkey and servers.client.hkey not in log
