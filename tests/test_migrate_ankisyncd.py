"""Moving from ankisyncd: import its data root, then log in and sync through syncproxy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from ankisyncd_root import build_root, default_users
from support import AnkiClient, ClientError, SyncProxy, syncproxy, tls_client_context


def test_imported_users_log_in_and_download(tmp_path: Path) -> None:
    source = tmp_path / "ankisyncd"
    users = build_root(source)
    data_dir = tmp_path / "data"

    result = syncproxy("import", "ankisyncd", str(source), "--data-dir", str(data_dir))

    assert "3 added" in result.stdout
    assert "2 copied" in result.stdout
    assert "4 files added" in result.stdout

    with SyncProxy(data_dir) as server:
        ca_file = server.ca_file()

        # A device still holding an ankisyncd host key gets 403, which makes it ask for a login.
        stale = httpx.post(server.endpoint + "sync/meta", verify=tls_client_context(ca_file),
                           headers={"anki-sync": json.dumps({"v": 11, "k": "0" * 32, "c": "t",
                                                             "s": "s"})})
        assert stale.status_code == 403

        wrong = AnkiClient(tmp_path / "wrong", server.endpoint, ca_file)
        with pytest.raises(ClientError):
            wrong.login("bob", "not bob's password")

        for user in users:
            client = AnkiClient(tmp_path / f"client-{user.name}", server.endpoint, ca_file)
            client.login(user.name, user.password)
            if not user.has_collection:
                continue
            client.sync("--download")
            dump = client.dump()
            fronts = sorted(fields[0] for fields in dump["notes"].values())
            assert fronts == sorted(user.fronts), user.name
            expected_media = {name: hashlib.sha256(data).hexdigest()
                              for name, data in user.media.items()}
            assert dump["media"] == expected_media, user.name
        log = server.log()

    stored = json.loads((data_dir / "users.json").read_text())
    assert sorted(stored["users"]) == ["alice", "bob", "carol"]
    assert "pending" not in stored
    for entry in stored["users"].values():
        assert entry["hash"].startswith("$pbkdf2-sha256$")
    assert "pending login rejected user=bob" in log
    for user in users:
        assert user.password not in log


def test_rerun_after_sync_keeps_new_data(tmp_path: Path) -> None:
    source = tmp_path / "ankisyncd"
    [alice] = build_root(source, [user for user in default_users() if user.name == "alice"])
    data_dir = tmp_path / "data"
    syncproxy("import", "ankisyncd", str(source), "--data-dir", str(data_dir))

    with SyncProxy(data_dir) as server:
        client = AnkiClient(tmp_path / "client", server.endpoint, server.ca_file())
        client.login("alice", alice.password)
        client.sync("--download")
        client.edit(3, "changed-on-syncproxy")
        client.sync()
    collection = data_dir / "collections" / "alice" / "collection.anki2"
    before = hashlib.sha256(collection.read_bytes()).hexdigest()

    rerun = syncproxy("import", "ankisyncd", str(source), "--data-dir", str(data_dir))

    assert "changed on syncproxy since the last import" in rerun.stdout
    assert "0 added" in rerun.stdout
    assert hashlib.sha256(collection.read_bytes()).hexdigest() == before
