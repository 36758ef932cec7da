"""A real Anki client syncs through the front end over TLS, trusting only `syncproxy cert pem`."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import zstandard

from support import AnkiClient, SyncProxy, add_user, clean_environment, free_port

NOTES = 2000
MEDIA = 10
EDITS = 25


def full_round_trip(tmp_path: Path, endpoint: str, ca_file: Path, user: str,
                    password: str) -> None:
    """Client A uploads, edits and syncs; client B downloads and must match A exactly."""
    client_a = AnkiClient(tmp_path / "client-a", endpoint, ca_file)
    built = client_a.build(NOTES, MEDIA, label="alpha")
    assert built["notes"] == NOTES

    client_a.login(user, password)
    assert client_a.sync("--upload")["required"] == "FULL_UPLOAD"
    client_a.edit(EDITS, "edited-after-upload")
    client_a.sync()

    client_b = AnkiClient(tmp_path / "client-b", endpoint, ca_file)
    client_b.login(user, password)
    assert client_b.sync("--download")["required"] == "FULL_DOWNLOAD"

    expected = client_a.dump()
    received = client_b.dump()
    assert len(received["notes"]) == NOTES
    assert received["notes"] == expected["notes"]
    edited = [fields for fields in received["notes"].values()
              if "edited-after-upload" in fields[1]]
    assert len(edited) == EDITS
    assert len(received["media"]) == MEDIA
    assert received["media"] == expected["media"]


def test_sync_through_bundled_core(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "correct horse")
    with SyncProxy(data_dir) as server:
        full_round_trip(tmp_path, server.endpoint, server.ca_file(), "alice", "correct horse")
    log = server.log()
    assert "request client=127.0.0.1 method=POST path=/sync/upload status=200" in log


def test_sync_through_upstream(tmp_path: Path) -> None:
    core_port = free_port()
    environment = clean_environment({
        "SYNC_USER1": "bob:plain-password", "SYNC_HOST": "127.0.0.1",
        "SYNC_PORT": str(core_port), "SYNC_BASE": str(tmp_path / "core-data"),
    })
    core = subprocess.Popen([sys.executable, "-m", "anki.syncserver"], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{core_port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with SyncProxy(tmp_path / "data", "--upstream", f"http://127.0.0.1:{core_port}") as server:
            full_round_trip(tmp_path, server.endpoint, server.ca_file(), "bob", "plain-password")
    finally:
        core.send_signal(signal.SIGINT)
        core.wait(30)


def test_small_sync_response_has_content_length(tmp_path: Path) -> None:
    """A small chunked response from the core reaches the client framed by Content-Length.

    Relayed chunked, the final empty chunk went out in a TLS record of its own after the data,
    and the Anki client, done reading, closed the connection and reconnected for each request.
    """
    add_user(tmp_path / "data", "erin", "erin-password")
    body = zstandard.ZstdCompressor().compress(b'{"u":"erin","p":"erin-password"}')
    sync_header = '{"v":11,"k":"","c":"26.09.3,test,linux","s":""}'
    core_port = free_port()
    with SyncProxy(tmp_path / "data", "--core-port", str(core_port)) as proxy:
        # The core reads the client address from X-Forwarded-For, as syncproxy sends it.
        core_response = httpx.post(f"http://127.0.0.1:{core_port}/sync/hostKey", content=body,
                                   headers={"anki-sync": sync_header,
                                            "x-forwarded-for": "127.0.0.1"})
        response = httpx.post(proxy.endpoint + "sync/hostKey", content=body,
                              headers={"anki-sync": sync_header},
                              verify=ssl.create_default_context(cafile=str(proxy.ca_file())))

    assert core_response.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 200
    assert "transfer-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["anki-original-size"] == core_response.headers["anki-original-size"]
    answer = zstandard.ZstdDecompressor().decompress(response.content, max_output_size=4096)
    assert b'"key"' in answer


def test_no_users_is_not_fatal(tmp_path: Path) -> None:
    with SyncProxy(tmp_path / "data") as server:
        response = httpx.post(server.endpoint + "sync/hostKey", verify=False)
        assert response.status_code == 503
        assert "syncproxy user add" in response.text
    assert "no users yet" in server.log()


def test_unknown_path_names_base_url(tmp_path: Path) -> None:
    with SyncProxy(tmp_path / "data") as server:
        response = httpx.get(server.endpoint + "anki/", verify=False)
    assert response.status_code == 404
    assert f"https://127.0.0.1:{server.port}/" in response.text


def test_sync_under_path_prefix(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "dora", "dora-password")
    with SyncProxy(data_dir, "--path-prefix", "/anki/") as server:
        trust = server.ca_file()
        base = server.endpoint + "anki/"
        client = AnkiClient(tmp_path / "dora", base, trust)
        client.build(30, 2)
        client.login("dora", "dora-password")
        assert client.sync("--upload")["required"] == "FULL_UPLOAD"

        second = AnkiClient(tmp_path / "dora-2", base, trust)
        second.login("dora", "dora-password")
        second.sync("--download")
        assert second.dump() == client.dump()

        # Without the prefix the client gets a 404 that names the right base URL.
        response = httpx.post(server.endpoint + "sync/hostKey", verify=False)
        assert response.status_code == 404
        assert base in response.text


def test_sync_url_ending_in_sync_gets_hint(tmp_path: Path) -> None:
    with SyncProxy(tmp_path / "data") as server:
        for path in ("sync/sync/hostKey", "sync/msync/begin"):
            response = httpx.post(server.endpoint + path, verify=False)
            assert response.status_code == 404
            assert f"base URL {server.endpoint} " in response.text
