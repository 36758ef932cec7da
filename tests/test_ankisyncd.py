"""Reading an ankisyncd data root and planning its import."""

from __future__ import annotations

import sqlite3
import unicodedata

import pytest

from ankisyncd_root import FixtureUser, build_root, legacy_hash
from syncproxy.ankisyncd import AnkisyncdError, AnkisyncdRoot, verify_legacy_password
from syncproxy.importing import ImportRecord, describe_plan, plan_import


@pytest.fixture(scope="module")
def ankisyncd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ankisyncd")
    users = build_root(root)
    return root, {user.name: user for user in users}


def test_legacy_password_checks():
    stored = legacy_hash("alice", "secret")

    assert len(stored) == 80
    assert verify_legacy_password("alice", "secret", stored)
    assert not verify_legacy_password("alice", "Secret", stored)
    assert not verify_legacy_password("alicesecret", "", stored.replace(stored[0], "x", 1))
    assert not verify_legacy_password("bob", "secret", stored)
    assert not verify_legacy_password("alice", "secret", "$pbkdf2-sha256$i=1,l=32$abc$def")


def test_scan_finds_users_collections_media(ankisyncd_root):
    root, users = ankisyncd_root

    found = {user.name: user for user in AnkisyncdRoot(root).scan()}

    assert sorted(found) == ["alice", "bob", "carol"]
    for name, user in found.items():
        assert verify_legacy_password(name, users[name].password, user.legacy_hash)
    assert found["alice"].note_count == 12
    assert sorted(item.name for item in found["alice"].media) == ["Grüße.mp3", "cat.png", "notes.txt"]
    assert [item.name for item in found["bob"].media] == ["diagram.svg"]
    assert found["carol"].collection is None
    assert found["carol"].media == []


def test_scan_accepts_collections_folder_and_old_auth_table(tmp_path):
    build_root(tmp_path, [FixtureUser(name="dora", password="pw", fronts=["q"])])
    auth = sqlite3.connect(tmp_path / "auth.db")
    auth.executescript("ALTER TABLE auth RENAME TO auth_new;"
                       "CREATE TABLE auth (user VARCHAR PRIMARY KEY, hash VARCHAR);"
                       "INSERT INTO auth SELECT username, hash FROM auth_new; DROP TABLE auth_new;")
    auth.close()

    users = AnkisyncdRoot(tmp_path / "collections").scan()

    assert [user.name for user in users] == ["dora"]
    assert verify_legacy_password("dora", "pw", users[0].legacy_hash)


def test_missing_auth_db_names_paths(tmp_path):
    (tmp_path / "collections").mkdir()

    with pytest.raises(AnkisyncdError, match="--auth-db") as caught:
        AnkisyncdRoot(tmp_path)

    assert str(tmp_path) in str(caught.value)


def test_media_name_normalized_to_nfc(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café.png")
    build_root(tmp_path, [FixtureUser(name="eve", password="pw", fronts=["q"],
                                      media={decomposed: b"bytes"})])

    [user] = AnkisyncdRoot(tmp_path).scan()

    assert [item.name for item in user.media] == [unicodedata.normalize("NFC", "café.png")]
    assert user.media[0].path.name == decomposed


def test_unlisted_and_missing_media_reported(tmp_path):
    build_root(tmp_path, [FixtureUser(name="finn", password="pw", fronts=["q"],
                                      media={"kept.png": b"kept", "lost.png": b"lost"})])
    media_dir = tmp_path / "collections" / "finn" / "collection.media"
    (media_dir / "lost.png").unlink()
    (media_dir / "stray.png").write_bytes(b"stray")

    [user] = AnkisyncdRoot(tmp_path).scan()

    assert [item.name for item in user.media] == ["kept.png"]
    assert any("lost.png" in remark and "missing" in remark for remark in user.remarks)
    assert any("stray.png" in remark and "left behind" in remark for remark in user.remarks)


def test_plan_skips_folder_without_password(tmp_path):
    build_root(tmp_path, [FixtureUser(name="gus", password="pw", fronts=["q"])])
    auth = sqlite3.connect(tmp_path / "auth.db")
    auth.execute("DELETE FROM auth")
    auth.commit()
    auth.close()
    sources = AnkisyncdRoot(tmp_path).scan()

    [plan] = plan_import(sources, tmp_path / "target", set(), ImportRecord(tmp_path / "record.json"))

    assert plan.skip_reason is not None
    assert "syncproxy user add gus" in plan.skip_reason
    assert any("skipped" in line for line in describe_plan([plan]))


def test_plan_for_existing_user_keeps_password(ankisyncd_root, tmp_path):
    root, _ = ankisyncd_root
    sources = AnkisyncdRoot(root).scan()

    plans = {plan.name: plan for plan in plan_import(sources, tmp_path, {"bob"},
                                                     ImportRecord(tmp_path / "record.json"))}

    assert plans["alice"].add_user
    assert not plans["bob"].add_user
    assert "password unchanged" in plans["bob"].user_reason
    assert plans["bob"].collection_action == "copy"
