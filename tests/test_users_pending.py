"""Users imported from ankisyncd in the users file, before and after their first login."""

from __future__ import annotations

import json
import stat

import pytest

from ankisyncd_root import legacy_hash
from syncproxy.users import UserError, UserStore, verify_password


def test_pending_user_upgrades_on_right_password(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add_pending("alice", legacy_hash("alice", "old secret"))

    assert store.upgrade_pending("alice", "wrong", rounds=1_000) is None
    user = store.upgrade_pending("alice", "old secret", rounds=1_000)

    assert user is not None
    assert verify_password(user.phc, "old secret")
    assert store.load_pending() == {}
    assert list(store.load()) == ["alice"]
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600


def test_pending_users_stay_out_of_core_users(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add_pending("bob", legacy_hash("bob", "pw"))

    assert store.load() == {}
    assert list(store.load_pending()) == ["bob"]
    assert "hash" not in json.loads((tmp_path / "users.json").read_text())["pending"]["bob"]


def test_pending_user_name_is_taken(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add_pending("carol", legacy_hash("carol", "pw"))

    with pytest.raises(UserError, match="already exists"):
        store.add("carol", "another")
    with pytest.raises(UserError, match="already exists"):
        store.add_pending("carol", legacy_hash("carol", "pw"))


def test_passwd_replaces_pending_hash(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add_pending("dora", legacy_hash("dora", "old"))

    store.set_password("dora", "new password")

    assert store.load_pending() == {}
    assert verify_password(store.load()["dora"].phc, "new password")
    assert store.upgrade_pending("dora", "old", rounds=1_000) is None


def test_remove_pending_user(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add_pending("eve", legacy_hash("eve", "pw"))

    store.remove("eve")

    assert store.load_pending() == {}


def test_invalid_pending_hash_rejected(tmp_path):
    store = UserStore(tmp_path / "users.json")

    with pytest.raises(UserError, match="ankisyncd"):
        store.add_pending("finn", "$pbkdf2-sha256$i=1000,l=32$abc$def")
