"""User names, file modes, and user changes reaching a running server."""

from __future__ import annotations

import json
import re
import ssl
import stat
import time
from pathlib import Path

import httpx
import pytest

from support import AnkiClient, ClientError, SyncProxy, add_user, syncproxy
from syncproxy.users import UserError, UserStore, check_phc, hash_password, validate_name, verify_password


@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    (".", "not allowed"),
    ("..", "not allowed"),
    ("../escape", "path separator"),
    ("/abs", "path separator"),
    ("a\\b", "path separator"),
    ("tab\there", "control character"),
    ("new\nline", "control character"),
    ("x" * 65, "65 bytes"),
    ("é" * 33, "66 bytes"),
    ("a:b", "':'"),
    (" padded", "white space"),
])
def test_invalid_names_rejected_with_reason(name: str, reason: str) -> None:
    with pytest.raises(UserError, match=reason):
        validate_name(name)


@pytest.mark.parametrize("name", ["alice", "bob.smith@example.com", "用户", "x" * 64, "a-b_c"])
def test_valid_names_accepted(name: str) -> None:
    validate_name(name)


def test_cli_rejects_bad_name_and_changes_nothing(tmp_path: Path) -> None:
    result = syncproxy("user", "add", "../evil", "--password-stdin", "--data-dir", str(tmp_path),
                       input="pw\n", check=False)
    assert result.returncode == 2
    assert "path separator" in result.stderr
    assert not (tmp_path / "users.json").exists()


def test_password_hash_round_trip() -> None:
    phc = hash_password("correct horse", rounds=1000)
    check_phc(phc)
    assert phc.startswith("$pbkdf2-sha256$i=1000,l=32$")
    assert verify_password(phc, "correct horse")
    assert not verify_password(phc, "wrong")


@pytest.mark.parametrize("bad", [
    "$pbkdf2$i=1000,l=32$c2FsdHNhbHQ$aGFzaA",
    "$pbkdf2-sha256$i=1000,l=32$c2FsdHNhbHRzYWx0$!!!notbase64!!!!!!!!!!!!!!!!!",
    "plain-password",
    "$pbkdf2-sha256$i=10,l=32$c2FsdHNhbHRzYWx0$" + "A" * 43,
])
def test_malformed_hashes_rejected(bad: str) -> None:
    with pytest.raises(UserError):
        check_phc(bad)


def test_users_file_is_private_and_holds_no_password(tmp_path: Path) -> None:
    add_user(tmp_path, "alice", "very-secret-password")
    users_file = tmp_path / "users.json"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert "very-secret-password" not in users_file.read_text()
    assert UserStore(users_file).load()["alice"].phc.startswith("$pbkdf2-sha256$")


def test_generated_keys_are_private(tmp_path: Path) -> None:
    syncproxy("cert", "pem", "--data-dir", str(tmp_path))
    for name in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((tmp_path / "tls" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met")


def sync_status(server: SyncProxy, trust: Path, host_key: str) -> int:
    """Return the status a /sync/meta request with this host key gets."""
    header = json.dumps({"v": 11, "k": host_key, "c": "test", "s": "probe"})
    response = httpx.post(server.endpoint + "sync/meta", headers={"anki-sync": header},
                          verify=ssl.create_default_context(cafile=str(trust)))
    return response.status_code


def login_succeeds(client: AnkiClient, user: str, password: str) -> bool:
    try:
        client.login(user, password)
        return True
    except ClientError:
        return False


def test_user_changes_reach_running_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    with SyncProxy(data_dir) as server:
        trust = server.ca_file()
        alice = AnkiClient(tmp_path / "alice", server.endpoint, trust)
        alice.build(20)
        alice.login("alice", "alice-pw")
        alice.sync("--upload")

        # A new user logs in without a restart.
        add_user(data_dir, "bob", "bob-pw")
        bob = AnkiClient(tmp_path / "bob", server.endpoint, trust)
        bob.build(5)
        started = time.monotonic()
        wait_for(lambda: login_succeeds(bob, "bob", "bob-pw"))
        assert time.monotonic() - started < 10
        bob.sync("--upload")

        # A password change kills the old host key; the new password works.
        old_key = alice.hkey
        syncproxy("user", "passwd", "alice", "--password-stdin", "--data-dir", str(data_dir),
                  input="alice-new-pw\n")
        wait_for(lambda: "error" in alice.sync(check=False))
        failure = alice.sync(check=False)["error"]
        # The Anki client shows a 403 as a wrong password.
        assert "password was incorrect" in failure, failure
        assert sync_status(server, trust, old_key) == 403
        assert not login_succeeds(alice, "alice", "alice-pw")
        wait_for(lambda: login_succeeds(alice, "alice", "alice-new-pw"))
        assert alice.hkey != old_key
        assert alice.sync()["required"] == "NO_CHANGES"

        # Removing a user kills its host key too.
        syncproxy("user", "remove", "bob", "--data-dir", str(data_dir))
        wait_for(lambda: "error" in bob.sync(check=False))
        assert sync_status(server, trust, bob.hkey) == 403
        assert not login_succeeds(bob, "bob", "bob-pw")


def test_revoke_ends_sessions_keeps_password(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "carol", "carol-pw")
    with SyncProxy(data_dir) as server:
        trust = server.ca_file()
        phone = AnkiClient(tmp_path / "phone", server.endpoint, trust)
        phone.build(10)
        old_key = phone.login("carol", "carol-pw")
        phone.sync("--upload")

        result = syncproxy("user", "revoke", "carol", "--data-dir", str(data_dir))
        assert "revoked" in result.stdout
        wait_for(lambda: sync_status(server, trust, old_key) == 403)
        listed = syncproxy("user", "list", "--data-dir", str(data_dir)).stdout
        assert re.search(r"^carol\s.*\(sessions revoked", listed, re.MULTILINE), listed

        assert not login_succeeds(phone, "carol", "wrong-pw")
        new_key = phone.login("carol", "carol-pw")
        assert new_key != old_key
        assert phone.sync()["required"] == "NO_CHANGES"
        assert sync_status(server, trust, old_key) == 403
    assert "carol-pw" not in server.log()
    assert old_key not in server.log()
    assert new_key not in server.log()
