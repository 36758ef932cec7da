"""Faults during a full upload: the sync core or syncproxy killed, syncproxy stopped with SIGTERM.

Each test uploads a 20,000-note collection with the real anki client and acts when the front end
logs the start of `/sync/upload` (a debug line), so the upload is in flight at that moment. The
stored collection is checked on a copy taken while syncproxy and its core are stopped, because
the core opens its databases exclusively.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from support import AnkiClient, SyncProxy, add_user

BIG_NOTES = 20_000
BIG_MEDIA = 20
OLD_NOTES = 100
PASSWORD = "correct horse"
UPLOAD_STARTED = "request started client=127.0.0.1 method=POST path=/sync/upload"
CORE_BACK_WITHIN = 5.0


@pytest.fixture(scope="module")
def big_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20,000-note collection with media, built once and copied by each test."""
    directory = tmp_path_factory.mktemp("big")
    client = AnkiClient(directory, "https://unused.invalid/", None)
    built = client.build(BIG_NOTES, BIG_MEDIA, label="new")
    assert built["notes"] == BIG_NOTES
    return directory


def copy_client(source: Path, directory: Path, server: SyncProxy, ca_file: Path) -> AnkiClient:
    shutil.copytree(source, directory)
    return AnkiClient(directory, server.endpoint, ca_file)


def in_background(function, *args, **kwargs) -> Future:
    executor = ThreadPoolExecutor(max_workers=1)
    future = executor.submit(function, *args, **kwargs)
    executor.shutdown(wait=False)
    return future


def wait_for_log(server: SyncProxy, text: str, seen_before: int = 0,
                 timeout: float = 120.0) -> None:
    """Wait until `text` is in the log more than `seen_before` times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.log().count(text) > seen_before:
            return
        time.sleep(0.01)
    raise TimeoutError(f"{text!r} not in the syncproxy log after {timeout} s:\n{server.log()}")


def core_pid(data_dir: Path) -> int:
    return json.loads((data_dir / "core.pid").read_text())["pid"]


def is_running(pid: int) -> bool:
    """Return whether `pid` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_core_replaced(server: SyncProxy, old_pid: int, timeout: float) -> float:
    """Return the seconds until a new core runs and the front end reports healthy."""
    started = time.monotonic()
    url = f"{server.endpoint}_syncproxy/health"
    while time.monotonic() - started < timeout:
        pid_file = server.data_dir / "core.pid"
        if pid_file.exists() and core_pid(server.data_dir) != old_pid:
            try:
                if httpx.get(url, verify=False, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no new sync core within {timeout} s:\n{server.log()}")


def unicase(left: str, right: str) -> int:
    left, right = left.casefold(), right.casefold()
    return (left > right) - (left < right)


def stored_note_count(data_dir: Path, scratch: Path) -> int:
    """Copy the stored collection, check its integrity and return its note count."""
    scratch.mkdir()
    source = data_dir / "collections" / "alice" / "collection.anki2"
    for suffix in ("", "-wal"):
        if Path(str(source) + suffix).exists():
            shutil.copy2(str(source) + suffix, scratch / ("collection.anki2" + suffix))
    with sqlite3.connect(scratch / "collection.anki2") as database:
        # Anki's indexes use its own case-insensitive collation; case folding matches it for
        # the ASCII text these collections hold.
        database.create_collation("unicase", unicase)
        assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return database.execute("SELECT count() FROM notes").fetchone()[0]


def upload_status(log: str) -> list[str]:
    return [line.split(" status=")[1].split()[0] for line in log.splitlines()
            if "request client=" in line and "path=/sync/upload " in line]


def start_with_old_collection(tmp_path: Path, big_collection: Path) -> tuple[
        SyncProxy, AnkiClient, Path]:
    """Start syncproxy with alice's 100-note collection stored; return it and a 20,000-note
    client logged in as alice."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", PASSWORD)
    server = SyncProxy(data_dir, "--log-level", "debug").start()
    ca_file = server.ca_file()
    old = AnkiClient(tmp_path / "old", server.endpoint, ca_file)
    old.build(OLD_NOTES, label="old")
    old.login("alice", PASSWORD)
    assert old.sync("--upload", "--no-media")["required"] == "FULL_UPLOAD"
    new = copy_client(big_collection, tmp_path / "new", server, ca_file)
    new.login("alice", PASSWORD)
    return server, new, ca_file


def check_next_sync(tmp_path: Path, server: SyncProxy, new: AnkiClient, ca_file: Path) -> None:
    """The interrupted client syncs again, and a second client downloads all of it."""
    new.sync("--upload")
    check = AnkiClient(tmp_path / "check", server.endpoint, ca_file)
    check.login("alice", PASSWORD)
    assert check.sync("--download")["required"] == "FULL_DOWNLOAD"
    received = check.dump()
    assert len(received["notes"]) == BIG_NOTES
    assert len(received["media"]) == BIG_MEDIA


def test_core_killed_during_full_upload(tmp_path: Path, big_collection: Path) -> None:
    server, new, ca_file = start_with_old_collection(tmp_path, big_collection)
    try:
        uploads_before = server.log().count(UPLOAD_STARTED)
        upload = in_background(new.sync, "--upload", "--no-media", check=False)
        wait_for_log(server, UPLOAD_STARTED, uploads_before)
        killed = core_pid(server.data_dir)
        os.kill(killed, signal.SIGKILL)

        outcome = upload.result(timeout=300)
        assert "error" in outcome
        assert "403" not in outcome["error"]
        assert "password was incorrect" not in outcome["error"]
        wait_for_log(server, "path=/sync/upload status=", uploads_before, timeout=30)
        assert upload_status(server.log())[-1] in ("502", "503")

        back_after = wait_core_replaced(server, killed, timeout=30)
        assert back_after < CORE_BACK_WITHIN
    finally:
        server.stop()

    assert stored_note_count(server.data_dir, tmp_path / "copy") in (OLD_NOTES, BIG_NOTES)
    server.start()
    try:
        check_next_sync(tmp_path, server, new, ca_file)
    finally:
        server.stop()


def test_syncproxy_killed_during_full_upload(tmp_path: Path, big_collection: Path) -> None:
    server, new, ca_file = start_with_old_collection(tmp_path, big_collection)
    try:
        uploads_before = server.log().count(UPLOAD_STARTED)
        upload = in_background(new.sync, "--upload", "--no-media", check=False)
        wait_for_log(server, UPLOAD_STARTED, uploads_before)
        orphan = core_pid(server.data_dir)
        server.process.kill()
        server.process.wait(30)

        assert "error" in upload.result(timeout=300)
        # The core got SIGINT from its parent-death signal and must not outlive syncproxy.
        deadline = time.monotonic() + 30
        while is_running(orphan) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_running(orphan)
    finally:
        server.stop()

    assert stored_note_count(server.data_dir, tmp_path / "copy") in (OLD_NOTES, BIG_NOTES)
    server.start()
    try:
        check_next_sync(tmp_path, server, new, ca_file)
    finally:
        server.stop()


def start_orphan_core(data_dir: Path) -> subprocess.Popen:
    """Start a sync core on the data directory's collections, as a killed syncproxy leaves one."""
    from syncproxy.core import core_environment, free_loopback_port
    from syncproxy.users import UserStore

    users = list(UserStore(data_dir / "users.json").load().values())
    environment = core_environment(users, data_dir / "collections", free_loopback_port(), 100)
    return subprocess.Popen([sys.executable, "-m", "anki.syncserver"], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_start_stops_core_named_in_pid_file(tmp_path: Path) -> None:
    from syncproxy import pidfile

    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", PASSWORD)
    data_dir.joinpath("collections").mkdir(mode=0o700)
    orphan = start_orphan_core(data_dir)
    try:
        # Give the orphan time to take its lock on the collections folder.
        time.sleep(2)
        assert orphan.poll() is None
        pidfile.write_pid_file(data_dir / "core.pid", orphan.pid)

        with SyncProxy(data_dir) as server:
            assert orphan.wait(30) is not None
            client = AnkiClient(tmp_path / "client", server.endpoint, server.ca_file())
            client.build(10)
            client.login("alice", PASSWORD)
            assert client.sync("--upload")["required"] == "FULL_UPLOAD"
        assert "stopping a sync core left running by an earlier syncproxy" in server.log()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_start_leaves_unrelated_pid_alone(tmp_path: Path) -> None:
    from syncproxy import pidfile

    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", PASSWORD)
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        pidfile.write_pid_file(data_dir / "core.pid", bystander.pid)
        with SyncProxy(data_dir) as server:
            assert bystander.poll() is None
            assert core_pid(data_dir) != bystander.pid
        assert "left running" not in server.log()
    finally:
        bystander.kill()
        bystander.wait()


def test_sigterm_during_full_upload_finishes_it(tmp_path: Path, big_collection: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", PASSWORD)
    server = SyncProxy(data_dir, "--log-level", "debug").start()
    try:
        new = copy_client(big_collection, tmp_path / "new", server, server.ca_file())
        new.login("alice", PASSWORD)
        uploads_before = server.log().count(UPLOAD_STARTED)
        upload = in_background(new.sync, "--upload", "--no-media", check=False)
        wait_for_log(server, UPLOAD_STARTED, uploads_before)
        server.process.send_signal(signal.SIGTERM)

        outcome = upload.result(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["required"] == "FULL_UPLOAD"
        assert server.process.wait(120) == 0
    finally:
        server.stop()

    log = server.log()
    stopping = log.index("stopping: finishing requests in flight")
    uploaded = log.index("path=/sync/upload status=200")
    assert stopping < uploaded
    assert log.index("sync core stopped") > uploaded
    assert stored_note_count(data_dir, tmp_path / "copy") == BIG_NOTES
    assert not (data_dir / "core.pid").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_when_idle_stops_promptly(tmp_path: Path, signum: int) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", PASSWORD)
    server = SyncProxy(data_dir).start()
    started = time.monotonic()
    assert server.stop(signum) == 0
    assert time.monotonic() - started < 15
    assert "sync core stopped" in server.log()
    assert not (data_dir / "core.pid").exists()
