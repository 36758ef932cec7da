"""Backups while syncs run, restores into a new directory, and data that survives a restart."""

from __future__ import annotations

import json
import re
import socket
import ssl
import stat
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from support import AnkiClient, SyncProxy, add_user, syncproxy
from syncproxy.backup import BackupError, create_backup, restore_backup
from syncproxy.datadir import DataDir

NOTES = 500
MEDIA = 5
EDITED = 20
ROUNDS = 6


def served_certificate(port: int) -> bytes:
    """Return the DER certificate the front end serves, as a client sees it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def host_key_status(server: SyncProxy, host_key: str) -> int:
    """Return the status a /sync/meta request with this host key gets."""
    header = json.dumps({"v": 11, "k": host_key, "c": "test", "s": "probe"})
    response = httpx.post(server.endpoint + "sync/meta", headers={"anki-sync": header},
                          verify=False)
    return response.status_code


def round_tags(back: str) -> list[str]:
    return re.findall(r"round-\d+", back)


def test_backup_during_syncs_then_restore(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    with SyncProxy(data_dir) as server:
        trust = server.ca_file()
        alice = AnkiClient(tmp_path / "alice", server.endpoint, trust)
        alice.build(NOTES, MEDIA, label="backed-up")
        alice.login("alice", "alice-pw")
        assert alice.sync("--upload")["required"] == "FULL_UPLOAD"
        certificate = served_certificate(server.port)

        failures: list[str] = []
        done: list[int] = []

        def sync_loop() -> None:
            for number in range(ROUNDS):
                alice.edit(EDITED, f"round-{number}")
                result = alice.sync(check=False)
                if "error" in result:
                    failures.append(result["error"])
                done.append(number)

        looper = threading.Thread(target=sync_loop)
        looper.start()
        archives = []
        for index in range(2):
            while len(done) < 1 + 2 * index and looper.is_alive():
                time.sleep(0.05)
            archive = tmp_path / f"backup-{index}.tar.gz"
            result = syncproxy("backup", str(archive), "--data-dir", str(data_dir))
            assert re.search(r"syncs held for \d+ ms", result.stdout), result.stdout
            archives.append(archive)
        looper.join(600)
        assert failures == []
        assert len(done) == ROUNDS
        expected_media = alice.dump()["media"]

    assert "holding new syncs reason='backup'" in server.log()
    assert stat.S_IMODE(archives[-1].stat().st_mode) == 0o600

    restored_dir = tmp_path / "restored"
    result = syncproxy("restore", str(archives[-1]), "--data-dir", str(restored_dir))
    assert f"into {restored_dir}" in result.stdout
    assert stat.S_IMODE((restored_dir / "users.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(restored_dir.stat().st_mode) == 0o700

    with SyncProxy(restored_dir) as restored:
        assert served_certificate(restored.port) == certificate
        # The users file came back unchanged, so the device's host key is still accepted.
        assert host_key_status(restored, alice.hkey) != 403
        assert host_key_status(restored, "0" * 40) == 403
        bob = AnkiClient(tmp_path / "fresh-device", restored.endpoint, restored.ca_file())
        bob.login("alice", "alice-pw")
        assert bob.sync("--download")["required"] == "FULL_DOWNLOAD"
        received = bob.dump()

    assert len(received["notes"]) == NOTES
    assert received["media"] == expected_media
    # The copy is one consistent state: every edited note carries the same rounds.
    edited = [round_tags(fields[1]) for fields in received["notes"].values()
              if round_tags(fields[1])]
    assert len(edited) == EDITED
    assert all(tags == edited[0] for tags in edited), edited
    assert edited[0] == [f"round-{number}" for number in range(len(edited[0]))]
    assert len(edited[0]) >= 3


def test_restore_refuses_non_empty_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    archive = tmp_path / "b.tar.gz"
    result = syncproxy("backup", str(archive), "--data-dir", str(data_dir))
    assert "no server was running" in result.stdout
    refused = syncproxy("restore", str(archive), "--data-dir", str(data_dir), check=False)
    assert refused.returncode == 2
    assert f"data directory {data_dir} is not empty (it contains users.json)" in refused.stderr
    assert "Choose a new --data-dir" in refused.stderr


def test_damaged_archive_rejected(tmp_path: Path) -> None:
    source = DataDir(tmp_path / "data")
    source.prepare()
    (source.collections / "alice").mkdir()
    (source.collections / "alice" / "collection.anki2").write_bytes(b"A" * 5000)
    archive = create_backup(source, tmp_path / "b.tar").archive

    raw = bytearray(archive.read_bytes())
    position = raw.index(b"A" * 5000)
    raw[position] = ord("B")
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(raw))
    target = DataDir(tmp_path / "new")
    with pytest.raises(BackupError, match="does not match its checksum"):
        restore_backup(damaged, target)
    assert not (target.collections / "alice" / "collection.anki2").exists()

    hostile = tmp_path / "hostile.tar"
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"format": 1, "files": {}}')
    with tarfile.open(hostile, "w") as tar:
        tar.add(manifest, arcname="syncproxy-backup.json")
        tar.add(archive, arcname="collections/../../escape")
    with pytest.raises(BackupError, match="unsafe path"):
        restore_backup(hostile, DataDir(tmp_path / "other"))
    assert not (tmp_path / "escape").exists()


def test_data_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = SyncProxy(data_dir).start(wait_for_core=False)
    try:
        start_log = server.log()
        syncproxy("user", "add", "alice", "--password-stdin", "--data-dir", str(data_dir),
                  input="alice-pw\n")
        trust = server.ca_file()
        alice = AnkiClient(tmp_path / "alice", server.endpoint, trust)
        alice.build(200, MEDIA, label="survivor")
        alice.login("alice", "alice-pw")
        alice.sync("--upload")
        certificate = served_certificate(server.port)
    finally:
        server.stop()

    # One line at start lists every kept path.
    line = next(entry for entry in start_log.splitlines() if "data directory " in entry)
    for name, path in (("config", "syncproxy.toml"), ("users", "users.json"),
                       ("collections", "collections"), ("tls", "tls"), ("acme", "acme")):
        assert f"{name}={data_dir / path}" in line

    again = SyncProxy(data_dir, port=server.port).start()
    try:
        assert served_certificate(again.port) == certificate
        assert trust.read_text() == syncproxy("cert", "pem", "--data-dir", str(data_dir)).stdout
        # The old host key still works: no new login.
        assert alice.sync()["required"] == "NO_CHANGES"
        other = AnkiClient(tmp_path / "other", again.endpoint, trust)
        other.login("alice", "alice-pw")
        other.sync("--download")
        assert other.dump() == alice.dump()
    finally:
        again.stop()
