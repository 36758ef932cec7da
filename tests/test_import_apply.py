"""Importing an ankisyncd data root into a data directory, and rerunning the import."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from anki.collection import Collection

from ankisyncd_root import FixtureUser, build_collection, build_root
from syncproxy.ankisyncd import AnkisyncdRoot, verify_legacy_password
from syncproxy.importing import ImportRecord, apply_plan, plan_import, summarize
from syncproxy.users import hash_password


def run_import(source: Path, target: Path, existing: set[str] | None = None):
    """Plan and apply an import; return the plans and the pending users it added."""
    added: dict[str, str] = {}
    record = ImportRecord(target / "ankisyncd-import.json")
    plans = plan_import(AnkisyncdRoot(source).scan(), target / "collections",
                        set(existing or ()), record)
    apply_plan(plans, target / "collections", record, added.__setitem__)
    return {plan.name: plan for plan in plans}, added


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BareCore:
    """The bundled sync core on loopback, without syncproxy in front."""

    def __init__(self, base: Path, users: dict[str, str]) -> None:
        self.port = free_port()
        env = dict(os.environ, SYNC_BASE=str(base), SYNC_HOST="127.0.0.1",
                   SYNC_PORT=str(self.port), PASSWORDS_HASHED="1")
        for index, (name, phc) in enumerate(sorted(users.items()), 1):
            env[f"SYNC_USER{index}"] = f"{name}:{phc}"
        self.process = subprocess.Popen([sys.executable, "-m", "anki.syncserver"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("sync core did not start")
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def full_download(tmp_path: Path, endpoint: str, user: str, password: str):
    """Log in as a fresh client, full-download, sync media; return (note fronts, media files)."""
    client_dir = tmp_path / f"client-{user}"
    client_dir.mkdir()
    col = Collection(str(client_dir / "collection.anki2"))
    try:
        auth = col.sync_login(username=user, password=password, endpoint=endpoint)
        out = col.sync_collection(auth, sync_media=False)
        col.close_for_full_sync()
        col.full_upload_or_download(auth=auth, server_usn=out.server_media_usn, upload=False)
        col.reopen(after_full_sync=True)
        col.sync_media(auth)
        deadline = time.monotonic() + 60
        while col.media_sync_status().active:
            assert time.monotonic() < deadline, "media sync did not finish"
            time.sleep(0.1)
        fronts = sorted(col.get_note(nid)["Front"] for nid in col.find_notes(""))
        media = {entry.name: entry.read_bytes() for entry in Path(col.media.dir()).iterdir()
                 if entry.is_file()}
        return fronts, media
    finally:
        col.close()


def test_imported_users_full_download_same_data(tmp_path):
    source = tmp_path / "ankisyncd"
    users = build_root(source)

    plans, added = run_import(source, tmp_path / "data")

    assert sorted(added) == ["alice", "bob", "carol"]
    # What the front end does at each first login: check the old hash, store a PHC hash.
    upgraded = {}
    for user in users:
        assert verify_legacy_password(user.name, user.password, added[user.name])
        upgraded[user.name] = hash_password(user.password, rounds=1_000)
    core = BareCore(tmp_path / "data" / "collections", upgraded)
    try:
        for user in users:
            if not user.has_collection:
                continue
            fronts, media = full_download(tmp_path, core.endpoint, user.name, user.password)
            assert fronts == sorted(user.fronts)
            assert media == user.media
    finally:
        core.stop()


def test_rerun_changes_nothing(tmp_path):
    source = tmp_path / "ankisyncd"
    build_root(source)
    run_import(source, tmp_path / "data")

    plans, added = run_import(source, tmp_path / "data", existing={"alice", "bob", "carol"})

    assert added == {}
    assert plans["alice"].collection_action == "none"
    assert "unchanged" in plans["alice"].collection_reason
    assert plans["alice"].media_new == []
    assert plans["alice"].media_same == 3
    assert "0 copied, 0 replaced, 0 skipped" in summarize(list(plans.values()))


def bump_collection_mod(path: Path, mod: int) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE col SET mod = ?", (mod,))
    db.commit()
    db.close()


def test_rerun_takes_newer_ankisyncd_collection(tmp_path):
    source = tmp_path / "ankisyncd"
    build_root(source, [FixtureUser(name="alice", password="pw", fronts=["old"])])
    run_import(source, tmp_path / "data")
    # The user kept syncing with ankisyncd after the first import.
    user_dir = source / "collections" / "alice"
    for entry in sorted(user_dir.iterdir(), reverse=True):
        entry.unlink() if entry.is_file() else entry.rmdir()
    user_dir.rmdir()
    build_collection(user_dir, FixtureUser(name="alice", password="pw", fronts=["old", "new"]))
    bump_collection_mod(user_dir / "collection.anki2", int(time.time() * 1000) + 60_000)

    plans, _ = run_import(source, tmp_path / "data", existing={"alice"})

    assert plans["alice"].collection_action == "replace"
    target = sqlite3.connect(tmp_path / "data" / "collections" / "alice" / "collection.anki2")
    assert target.execute("SELECT count() FROM notes").fetchone()[0] == 2
    target.close()


def test_rerun_keeps_collection_changed_on_syncproxy(tmp_path):
    source = tmp_path / "ankisyncd"
    build_root(source, [FixtureUser(name="alice", password="pw", fronts=["q"])])
    run_import(source, tmp_path / "data")
    target = tmp_path / "data" / "collections" / "alice" / "collection.anki2"
    bump_collection_mod(target, int(time.time() * 1000) + 1_000)
    bump_collection_mod(source / "collections" / "alice" / "collection.anki2",
                        int(time.time() * 1000) + 2_000)
    before = hashlib.sha256(target.read_bytes()).hexdigest()

    plans, _ = run_import(source, tmp_path / "data", existing={"alice"})

    assert plans["alice"].collection_action == "skip"
    assert "changed on syncproxy" in plans["alice"].collection_reason
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before


def test_rerun_adds_new_media_and_keeps_differing(tmp_path):
    source = tmp_path / "ankisyncd"
    build_root(source, [FixtureUser(name="alice", password="pw", fronts=["q"],
                                    media={"a.png": b"first a", "b.png": b"first b"})])
    run_import(source, tmp_path / "data")
    media_dir = source / "collections" / "alice" / "collection.media"
    (media_dir / "a.png").write_bytes(b"changed a")
    (media_dir / "c.png").write_bytes(b"new c")
    db = sqlite3.connect(source / "collections" / "alice" / "collection.media.server.db")
    db.execute("INSERT INTO media VALUES ('c.png', 9, ?)", (hashlib.sha1(b"new c").hexdigest(),))
    db.commit()
    db.close()

    plans, _ = run_import(source, tmp_path / "data", existing={"alice"})

    plan = plans["alice"]
    assert [item.name for item in plan.media_new] == ["c.png"]
    assert plan.media_same == 1
    assert plan.media_skipped == [("a.png", "differs from syncproxy's file; kept syncproxy's")]
    target_media = tmp_path / "data" / "collections" / "alice" / "media"
    assert (target_media / "a.png").read_bytes() == b"first a"
    assert (target_media / "c.png").read_bytes() == b"new c"
    core_db = sqlite3.connect(tmp_path / "data" / "collections" / "alice" / "media.db")
    assert core_db.execute("SELECT last_usn, total_nonempty_files FROM meta").fetchone() == (3, 3)
    core_db.close()


def test_dry_run_plan_writes_nothing(tmp_path):
    source = tmp_path / "ankisyncd"
    build_root(source)
    before = sorted(str(path) for path in source.rglob("*"))
    record = ImportRecord(tmp_path / "data" / "ankisyncd-import.json")

    plans = plan_import(AnkisyncdRoot(source).scan(), tmp_path / "data" / "collections", set(), record)

    assert not (tmp_path / "data").exists()
    assert sorted(str(path) for path in source.rglob("*")) == before
    assert sum(len(plan.media_new) for plan in plans) == 4
