"""What the front end forwards: bodies streamed byte for byte, headers as a proxy must."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx

from support import SyncProxy
from upstream_server import UpstreamServer

MIB = 1024 * 1024


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def pattern_chunks(total: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    block = hashlib.sha256(b"seed").digest() * (chunk // 32)
    sent = 0
    while sent < total:
        piece = block[: min(chunk, total - sent)]
        sent += len(piece)
        yield piece


def test_chunked_upload_streams_without_buffering(tmp_path: Path) -> None:
    total = 100 * MIB
    expected = hashlib.sha256()
    for piece in pattern_chunks(total):
        expected.update(piece)

    with UpstreamServer() as upstream, SyncProxy(
        tmp_path / "data", "--upstream", f"http://127.0.0.1:{upstream.port}", "--max-body-mb", "200"
    ) as server:
        pid = server.process.pid
        before = rss_kib(pid)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file())), timeout=120) as client:
            response = client.post(server.endpoint + "sync/upload", content=pattern_chunks(total),
                                   headers={"anki-sync": '{"v":11,"k":"","c":"test","s":"x"}'})
        peak = rss_kib(pid, "VmHWM")

    assert response.status_code == 200
    received = response.json()
    assert received["size"] == total
    assert received["sha256"] == expected.hexdigest()
    headers = {name.lower(): value for name, value in received["headers"]}
    assert headers.get("transfer-encoding") == "chunked"
    growth_mib = (peak - before) / 1024
    print(f"front end RSS {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB")
    assert growth_mib < 30, f"front end grew by {growth_mib:.1f} MiB for a {total // MIB} MiB body"


def test_headers_forwarded_as_a_proxy_must(tmp_path: Path) -> None:
    with UpstreamServer() as upstream, SyncProxy(
        tmp_path / "data", "--upstream", f"http://127.0.0.1:{upstream.port}"
    ) as server:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file()))) as client:
            response = client.post(
                server.endpoint + "msync/begin?k=abc&v=ankidesktop",
                content=b"body",
                headers={
                    "anki-sync": '{"v":11,"k":"0123","c":"26.09","s":"abc"}',
                    "anki-original-size": "4",
                    "X-Forwarded-For": "203.0.113.9",
                    "X-Forwarded-Proto": "http",
                    "Connection": "keep-alive, X-Private",
                    "X-Private": "hop",
                    "Keep-Alive": "timeout=5",
                    "X-Custom": "end-to-end",
                },
            )
    assert response.status_code == 200
    assert response.headers["anki-original-size"] == str(len(response.content))
    received = response.json()
    assert received["target"] == "/msync/begin?k=abc&v=ankidesktop"
    headers: dict[str, list[str]] = {}
    for name, value in received["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    assert headers["anki-sync"] == ['{"v":11,"k":"0123","c":"26.09","s":"abc"}']
    assert headers["anki-original-size"] == ["4"]
    assert headers["x-custom"] == ["end-to-end"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    for hop in ("x-private", "keep-alive"):
        assert hop not in headers
    # httpx's own defaults must not be added to what the client sent.
    assert headers["user-agent"] == [response.request.headers["user-agent"]]
    assert headers["accept-encoding"] == [response.request.headers["accept-encoding"]]


def test_unreachable_upstream_gets_502(tmp_path: Path) -> None:
    from support import free_port
    dead_port = free_port()
    with SyncProxy(tmp_path / "data", "--upstream", f"http://127.0.0.1:{dead_port}") as server:
        response = httpx.post(server.endpoint + "sync/meta", verify=ssl.create_default_context(cafile=str(server.ca_file())))
    assert response.status_code == 502
    assert f"127.0.0.1:{dead_port}" in response.text
    assert "unreachable" in response.text.lower()
