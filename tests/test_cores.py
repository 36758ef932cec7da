"""Several sync cores (--cores N): each user has a fixed core, and requests reach it."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import zstandard

from support import AnkiClient, SyncProxy, add_user, free_port, syncproxy
from syncproxy.cores import Move, assign, plan_rebalance
from syncproxy.owner import legacy_form_host_key, query_host_key
from syncproxy.users import host_key
from test_login import legacy_login_body

NOTES = 2000
MEDIA = 5


def assignment(data_dir: Path) -> dict[str, int]:
    return json.loads((data_dir / "cores.json").read_text())["users"]


def core_lines(server: SyncProxy, index: int, needle: str) -> list[str]:
    """Return the relayed output lines of core `index` that contain `needle`."""
    prefix = f"syncproxy.core.output: core {index}: "
    return [line for line in server.log().splitlines() if prefix in line and needle in line]


def relayed_core_lines(server: SyncProxy, index: int, needle: str,
                       timeout: float = 10.0) -> list[str]:
    """Wait until core `index` has logged a line containing `needle`, then return its lines.

    The front end relays a core's output as it reads it, so a line can reach the log just
    after the client has its response.
    """
    deadline = time.monotonic() + timeout
    while not core_lines(server, index, needle) and time.monotonic() < deadline:
        time.sleep(0.05)
    return core_lines(server, index, needle)


def free_port_pair() -> int:
    """Return a port that is free together with the next one."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports found")


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met within the timeout")
        time.sleep(0.1)


def test_two_users_sync_at_once_on_two_cores(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "bob", "bob-pw")
    with SyncProxy(data_dir, "--cores", "2") as server:
        assert assignment(data_dir) == {"alice": 0, "bob": 1}
        trust = server.ca_file()
        clients = {}
        for name in ("alice", "bob"):
            client = AnkiClient(tmp_path / name, server.endpoint, trust)
            client.build(NOTES, MEDIA, label=name)
            clients[name] = client

        clients["alice"].login("alice", "alice-pw")
        assert len(relayed_core_lines(server, 0, 'uri="/sync/hostKey"')) == 1
        assert core_lines(server, 1, 'uri="/sync/hostKey"') == []
        clients["bob"].login("bob", "bob-pw")
        assert len(relayed_core_lines(server, 1, 'uri="/sync/hostKey"')) == 1

        outcomes: dict[str, object] = {}

        def upload(name: str) -> None:
            try:
                outcomes[name] = clients[name].sync("--upload")["required"]
            except Exception as error:  # noqa: BLE001 - reported by the asserts below
                outcomes[name] = error

        threads = [threading.Thread(target=upload, args=(name,)) for name in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert outcomes == {"alice": "FULL_UPLOAD", "bob": "FULL_UPLOAD"}
        assert relayed_core_lines(server, 0, 'uri="/sync/upload"')
        assert relayed_core_lines(server, 1, 'uri="/sync/upload"')

        for name in clients:
            fresh = AnkiClient(tmp_path / f"{name}-2", server.endpoint, trust)
            fresh.login(name, f"{name}-pw")
            assert fresh.sync("--download")["required"] == "FULL_DOWNLOAD"
            assert fresh.dump()["notes"] == clients[name].dump()["notes"]
            assert len(fresh.dump()["media"]) == MEDIA
    for name in clients:
        assert (data_dir / "collections" / name / "collection.anki2").is_file()
    assert (data_dir / "cores.json").stat().st_mode & 0o777 == 0o600


def test_assignment_survives_restart_and_count_change(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for name in ("u1", "u2", "u3", "u4"):
        add_user(data_dir, name, f"{name}-pw")
    with SyncProxy(data_dir, "--cores", "2"):
        first = assignment(data_dir)
    assert sorted(first.values()) == [0, 0, 1, 1]

    with SyncProxy(data_dir, "--cores", "2"):
        assert assignment(data_dir) == first

    add_user(data_dir, "u5", "u5-pw")
    with SyncProxy(data_dir, env={"SYNCPROXY_CORES": "3"}) as server:
        third = assignment(data_dir)
    assert {name: third[name] for name in first} == first
    assert third["u5"] == 2
    assert "core count changed from=2 to=3 users_moved=0" in server.log()

    with SyncProxy(data_dir, "--cores", "2") as server:
        shrunk = assignment(data_dir)
    assert {name: shrunk[name] for name in first} == first
    assert shrunk["u5"] in (0, 1)
    assert f"user reassigned because its core no longer exists user=u5 from_core=2 " \
           f"to_core={shrunk['u5']}" in server.log()

    listing = syncproxy("user", "list", "--data-dir", str(data_dir)).stdout
    rows = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
    assert rows == {name: str(core) for name, core in shrunk.items()}


def test_unknown_host_key_and_user_get_403(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "bob", "bob-pw")
    with SyncProxy(data_dir, "--cores", "2") as server:
        url = f"https://127.0.0.1:{server.port}"
        header = json.dumps({"v": 11, "k": "0" * 40, "c": "test", "s": "x"})
        response = httpx.post(f"{url}/sync/meta", headers={"anki-sync": header},
                              content=zstandard.compress(b"{}"), verify=False)
        assert response.status_code == 403

        login = json.dumps({"u": "nobody", "p": "guess"}).encode()
        header = json.dumps({"v": 11, "k": "", "c": "test", "s": "x"})
        response = httpx.post(f"{url}/sync/hostKey", headers={"anki-sync": header},
                              content=zstandard.compress(login), verify=False)
        assert response.status_code == 403

        response = httpx.get(f"{url}/msync/begin?k={'0' * 40}&v=ankidroid,2.15", verify=False)
        assert response.status_code == 403


def test_legacy_requests_reach_the_users_core(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "bob", "bob-pw")
    with SyncProxy(data_dir, "--cores", "2") as server:
        url = f"https://127.0.0.1:{server.port}"
        content_type, body = legacy_login_body("bob", "bob-pw")
        response = httpx.post(f"{url}/sync/hostKey", headers={"content-type": content_type},
                              content=body, verify=False)
        assert response.status_code == 200
        assert len(relayed_core_lines(server, 1, 'uri="/sync/hostKey"')) == 1
        assert core_lines(server, 0, 'uri="/sync/hostKey"') == []

        users = json.loads((data_dir / "users.json").read_text())["users"]
        bob_key = host_key("bob", users["bob"]["hash"])
        response = httpx.get(f"{url}/msync/begin?k={bob_key}&v=ankidroid,2.15", verify=False)
        assert response.status_code == 200
        assert relayed_core_lines(server, 1, 'uri="/msync/begin" uid="bob"')
        assert core_lines(server, 0, "/msync/begin") == []


def test_rebalance_dry_run_then_running_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for name in ("u1", "u2", "u3", "u4"):
        add_user(data_dir, name, f"{name}-pw")
    with SyncProxy(data_dir, "--cores", "1"):
        pass
    with SyncProxy(data_dir, "--cores", "2") as server:
        assert set(assignment(data_dir).values()) == {0}
        before = (data_dir / "cores.json").read_text()

        dry = syncproxy("cores", "rebalance", "--dry-run", "--data-dir", str(data_dir)).stdout
        assert "move u4: core 0 -> core 1" in dry
        assert "move u3: core 0 -> core 1" in dry
        assert "nothing was changed" in dry
        assert (data_dir / "cores.json").read_text() == before

        real = syncproxy("cores", "rebalance", "--data-dir", str(data_dir)).stdout
        assert "The running server applies it within seconds" in real
        assert assignment(data_dir) == {"u1": 0, "u2": 0, "u3": 1, "u4": 1}
        wait_for(lambda: "user moved to another core user=u4 from_core=0 to_core=1"
                 in server.log())
        wait_for(lambda: "sync core ready" in server.log()
                 and re.search(r"sync core ready pid=\d+ port=\d+ core=1", server.log()))

        client = AnkiClient(tmp_path / "u4", server.endpoint, server.ca_file())
        client.build(200)
        client.login("u4", "u4-pw")
        assert client.sync("--upload")["required"] == "FULL_UPLOAD"
        assert relayed_core_lines(server, 1, 'uri="/sync/upload"')
        assert core_lines(server, 0, 'uri="/sync/upload"') == []

        again = syncproxy("cores", "rebalance", "--data-dir", str(data_dir)).stdout
        assert "nothing to move" in again
        # The command only checks whether a server runs: that is no rejected request.
        assert "control request rejected" not in server.log()
    assert (data_dir / "collections" / "u4" / "collection.anki2").is_file()


def test_cores_show_lists_users_without_core(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "u1", "u1-pw")
    with SyncProxy(data_dir, "--cores", "2"):
        pass
    added = syncproxy("user", "add", "late", "--password-stdin", "--data-dir", str(data_dir),
                      input="late-pw\n").stdout
    shown = syncproxy("cores", "show", "--data-dir", str(data_dir)).stdout

    assert "picks it up when it starts" in added
    assert "core 0: 1 user(s)  u1" in shown
    assert "no core yet: late" in shown


@pytest.mark.parametrize("value", ["0", "abc", "-1", "65"])
def test_bad_core_count_named_in_error(tmp_path: Path, value: str) -> None:
    result = syncproxy("--cores", value, "--data-dir", str(tmp_path / "data"), check=False)
    assert result.returncode == 2
    assert "--cores" in result.stderr
    assert repr(value) in result.stderr or f" {value} " in result.stderr
    assert "expected an integer from 1 to 64 or auto" in result.stderr


def test_bad_core_count_in_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "syncproxy.toml"
    config.write_text('cores = "many"\n')
    result = syncproxy("config", "check", str(config), check=False)
    assert result.returncode == 2
    assert "key cores: invalid value 'many'" in result.stderr

    result = syncproxy("--data-dir", str(tmp_path / "data"), env={"SYNCPROXY_CORES": "0"},
                       check=False)
    assert result.returncode == 2
    assert "SYNCPROXY_CORES: 0 is out of range for cores" in result.stderr


def test_auto_and_file_values_accepted(tmp_path: Path) -> None:
    config = tmp_path / "syncproxy.toml"
    config.write_text('cores = "auto"\n')
    shown = syncproxy("config", "show", "--config", str(config),
                      "--data-dir", str(tmp_path / "data")).stdout
    assert re.search(r"^cores\s+auto\s+file ", shown, re.MULTILINE)
    config.write_text("cores = 3\n")
    shown = syncproxy("config", "show", "--config", str(config),
                      "--data-dir", str(tmp_path / "data")).stdout
    assert re.search(r"^cores\s+3\s+file ", shown, re.MULTILINE)


def test_assign_keeps_existing_cores() -> None:
    result, moves, added = assign({"a": 0, "b": 1, "gone": 0}, ["a", "b", "c", "d"], 2)
    assert result == {"a": 0, "b": 1, "c": 0, "d": 1}
    assert moves == []
    assert added == ["c", "d"]

    result, moves, added = assign({"a": 0, "b": 1, "c": 2}, ["a", "b", "c"], 2)
    assert result == {"a": 0, "b": 1, "c": 0}
    assert moves == [Move("c", 2, 0)]
    assert added == []


def test_rebalance_plan_evens_out() -> None:
    assert plan_rebalance({"a": 0, "b": 0, "c": 0, "d": 0}, 2) == [Move("d", 0, 1),
                                                                  Move("c", 0, 1)]
    assert plan_rebalance({"a": 0, "b": 1, "c": 0}, 2) == []
    assert plan_rebalance({}, 3) == []


def test_legacy_host_key_fields() -> None:
    key = "ab" * 20
    body = (b'--b\r\nContent-Disposition: form-data; name="c"\r\n\r\n1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="k"\r\n\r\n' + key.encode()
            + b'\r\n--b\r\nContent-Disposition: form-data; name="data"; filename="data"\r\n'
            b'Content-Type: application/octet-stream\r\n\r\n\x1f\x8b...')
    assert legacy_form_host_key(body) == key
    assert legacy_form_host_key(body.replace(b'name="k"', b'name="sk"')) == key
    assert legacy_form_host_key(b"--b\r\nno fields") == ""
    assert query_host_key(f"k={key}&v=ankidroid".encode()) == key
    assert query_host_key(b"v=1") == ""


def test_user_change_restarts_only_its_core(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "bob", "bob-pw")
    with SyncProxy(data_dir, "--cores", "2") as server:
        trust = server.ca_file()
        alice = AnkiClient(tmp_path / "alice", server.endpoint, trust)
        alice.build(100)
        alice.login("alice", "alice-pw")
        assert alice.sync("--upload")["required"] == "FULL_UPLOAD"

        syncproxy("user", "passwd", "bob", "--password-stdin", "--data-dir", str(data_dir),
                  input="bob-new-pw\n")
        wait_for(lambda: len(re.findall(r"sync core ready pid=\d+ port=\d+ core=1",
                                        server.log())) == 2)
        log = server.log()
        assert re.search(r"sync core stopped pid=\d+ core=1", log)
        assert not re.search(r"sync core stopped pid=\d+ core=0", log)
        assert "holding new syncs reason='users changed, core 1'" in log

        alice.edit(3, "after-bob-changed")
        assert alice.sync()["required"] in ("NORMAL_SYNC", "NO_CHANGES")
        bob = AnkiClient(tmp_path / "bob", server.endpoint, trust)
        bob.login("bob", "bob-new-pw")


def test_backup_with_two_cores_restores_assignment(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "bob", "bob-pw")
    with SyncProxy(data_dir, "--cores", "2") as server:
        trust = server.ca_file()
        for name in ("alice", "bob"):
            client = AnkiClient(tmp_path / name, server.endpoint, trust)
            client.build(100, label=name)
            client.login(name, f"{name}-pw")
            assert client.sync("--upload")["required"] == "FULL_UPLOAD"
        archive = tmp_path / "backup.tar.gz"
        result = syncproxy("backup", str(archive), "--data-dir", str(data_dir)).stdout
        assert "syncs held for" in result
        assert "holding new syncs reason='backup, core 0'" in server.log()
        assert "holding new syncs reason='backup, core 1'" in server.log()

    restored = tmp_path / "restored"
    syncproxy("restore", str(archive), "--data-dir", str(restored))
    assert assignment(restored) == {"alice": 0, "bob": 1}
    with SyncProxy(restored, "--cores", "2") as server:
        bob = AnkiClient(tmp_path / "bob-restored", server.endpoint, server.ca_file())
        bob.login("bob", "bob-pw")
        assert bob.sync("--download")["required"] == "FULL_DOWNLOAD"
        assert len(bob.dump()["notes"]) == 100
        assert relayed_core_lines(server, 1, 'uri="/sync/download"')


def test_fixed_core_port_numbers_each_core(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "bob", "bob-pw")
    base = free_port_pair()
    with SyncProxy(data_dir, "--cores", "2", "--core-port", str(base)) as server:
        log = server.log()
    assert f"port={base} core=0" in log
    assert f"port={base + 1} core=1" in log
