"""The sync core's and ankisyncd's environment variables are read, with the native name given."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest

from support import AnkiClient, SyncProxy, syncproxy
from syncproxy.compat import read_compat_environment, seed_users
from syncproxy.settings import SettingsError, load_settings
from syncproxy.users import UserStore, hash_password, verify_password


@pytest.mark.parametrize("variable, value, option, expected", [
    ("SYNC_PORT", "8080", "port", 8080),
    ("SYNC_HOST", "127.0.0.1", "host", "127.0.0.1"),
    ("SYNC_BASE", "/srv/anki", "collections_dir", Path("/srv/anki")),
    ("MAX_SYNC_PAYLOAD_MEGS", "500", "max_body_mb", 500),
    ("ANKISYNCD_HOST", "::1", "host", "::1"),
    ("ANKISYNCD_PORT", "27701", "port", 27701),
])
def test_core_names_map_to_settings(variable: str, value: str, option: str,
                                    expected: object) -> None:
    loaded = load_settings({"data_dir": Path("/tmp/unused")}, environ={variable: value})
    assert getattr(loaded.settings, option) == expected
    assert loaded.sources[option] == f"environment {variable}"
    native = "SYNCPROXY_" + option.upper()
    assert [notice for notice in loaded.notices if variable in notice] == [
        f"{variable} is read as {option}; the native name is {native} "
        f"(or --{option.replace('_', '-')})"]


def test_native_variable_beats_core_name() -> None:
    loaded = load_settings({"data_dir": Path("/tmp/unused")},
                           environ={"SYNC_PORT": "8080", "SYNCPROXY_PORT": "444"})
    assert loaded.settings.port == 444
    assert "SYNC_PORT is overridden by environment SYNCPROXY_PORT" in loaded.notices


@pytest.mark.parametrize("variable", [
    "SYNC_IP_HEADER", "ANKISYNCD_DATA_ROOT", "ANKISYNCD_AUTH_DB_PATH", "ANKISYNCD_SESSION_DB_PATH",
    "ANKISYNCD_BASE_URL", "ANKISYNCD_BASE_MEDIA_URL", "ANKISYNCD_SESSION_MANAGER",
])
def test_names_without_equivalent_are_reported(variable: str) -> None:
    reading = read_compat_environment({variable: "x"})
    assert reading.values == {}
    [notice] = reading.notices
    assert notice.startswith(f"{variable} has no effect: ")
    if variable in ("ANKISYNCD_DATA_ROOT", "ANKISYNCD_AUTH_DB_PATH"):
        assert "syncproxy import ankisyncd" in notice


@pytest.mark.parametrize("variable, nearest", [
    ("MAX_SYNC_UPLOAD_MEGS", "MAX_SYNC_PAYLOAD_MEGS (read as max_body_mb, natively "
                             "SYNCPROXY_MAX_BODY_MB)"),
    ("SYNC_PROT", "SYNC_PORT (read as port, natively SYNCPROXY_PORT)"),
    ("SYNC_USERS", "SYNC_USER1"),
    ("ANKISYNCD_DATAROOT", "ANKISYNCD_DATA_ROOT"),
    ("PASSWORD_HASHED", None),
    ("PASSWORDS_HASH", "PASSWORDS_HASHED"),
])
def test_near_misses_name_nearest(variable: str, nearest: str | None) -> None:
    if nearest is None:
        # Outside the prefixes syncproxy owns: left alone, like any other variable.
        assert read_compat_environment({variable: "1"}).values == {}
        return
    with pytest.raises(SettingsError) as caught:
        read_compat_environment({variable: "1"})
    assert f"unknown environment variable {variable}; did you mean {nearest}?" in str(
        caught.value)


def test_bad_values_name_variable_not_secret() -> None:
    cases = {
        "SYNC_USER1": ("alice-secret-no-colon", "SYNC_USER1 has no ':'"),
        "SYNC_USER2": ("../x:secret-two", "SYNC_USER2: user name '../x'"),
        "SYNC_USER3": ("carol:", "SYNC_USER3: the password is empty"),
    }
    for variable, (value, fragment) in cases.items():
        with pytest.raises(SettingsError) as caught:
            read_compat_environment({variable: value})
        assert fragment in str(caught.value)
        assert "secret" not in str(caught.value)
    with pytest.raises(SettingsError, match="SYNC_PORT: 'x' is|SYNC_PORT: invalid value 'x'"):
        read_compat_environment({"SYNC_PORT": "x"})
    with pytest.raises(SettingsError, match="SYNC_USER1: password hash is not"):
        read_compat_environment({"SYNC_USER1": "dan:plain", "PASSWORDS_HASHED": "1"})
    with pytest.raises(SettingsError, match="SYNC_USER1 and SYNC_USER2 both declare user ann"):
        read_compat_environment({"SYNC_USER1": "ann:a", "SYNC_USER2": "ann:b"})
    with pytest.raises(SettingsError, match="ANKISYNCD_PASSWORD is missing"):
        read_compat_environment({"ANKISYNCD_USERNAME": "ann"})


def test_seeding_adds_updates_and_keeps_hashes(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.json")
    phc = hash_password("bare-core-pw", rounds=1000)
    environment = {"SYNC_USER1": "ann:first-pw", "SYNC_USER2": "ben:ben-pw"}
    seed_users(store, read_compat_environment(environment).seed_users)
    users = store.load()
    assert verify_password(users["ann"].phc, "first-pw")
    first_hash = users["ann"].phc

    # Same password again: the hash, and so every host key, stays.
    seed_users(store, read_compat_environment(environment).seed_users)
    assert store.load()["ann"].phc == first_hash
    # A changed password is applied, as the sync core would.
    environment["SYNC_USER1"] = "ann:second-pw"
    seed_users(store, read_compat_environment(environment).seed_users)
    assert verify_password(store.load()["ann"].phc, "second-pw")

    # A hash from a bare core in hashed mode is kept as is, so its host keys stay valid.
    hashed = read_compat_environment({"SYNC_USER1": f"cy:{phc}", "PASSWORDS_HASHED": "1"})
    seed_users(store, hashed.seed_users)
    assert store.load()["cy"].phc == phc
    assert store.load()["cy"].host_key == hashlib.sha1(f"cy:{phc}".encode()).hexdigest()
    assert "password" not in (tmp_path / "users.json").read_text().replace('"hash"', "")


def core_environment_of(server: SyncProxy) -> dict[str, str]:
    """Read the running sync core's environment from /proc, as an operator could."""
    pid = re.findall(r"sync core starting pid=(\d+)", server.log())[-1]
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def post_size(server: SyncProxy, size: int) -> httpx.Response:
    return httpx.post(server.endpoint + "sync/upload", content=b"\0" * size, verify=False,
                      timeout=60)


def test_one_body_setting_drives_both_limits(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    syncproxy("user", "add", "eve", "--password-stdin", "--data-dir", str(data_dir),
              input="eve-pw\n")
    with SyncProxy(data_dir, env={"SYNCPROXY_MAX_BODY_MB": "3"}) as server:
        assert core_environment_of(server)["MAX_SYNC_PAYLOAD_MEGS"] == "3"
        too_large = post_size(server, 3 * 1024 * 1024 + 1)
        assert too_large.status_code == 413
        assert "max_body_mb" in too_large.text
        assert "the limit is 3 MiB" in too_large.text


def test_core_variables_seed_user_and_limits(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    environment = {"SYNC_USER1": "frank:frank-secret-pw", "MAX_SYNC_PAYLOAD_MEGS": "2",
                   "SYNC_IP_HEADER": "XRealIp"}
    with SyncProxy(data_dir, env=environment) as server:
        assert core_environment_of(server)["MAX_SYNC_PAYLOAD_MEGS"] == "2"
        assert post_size(server, 2 * 1024 * 1024 + 1).status_code == 413
        # The seeded user logs in through a real client with the declared password.
        client = AnkiClient(tmp_path / "client", server.endpoint, server.ca_file())
        assert len(client.login("frank", "frank-secret-pw")) == 40

        listed = syncproxy("user", "list", "--data-dir", str(data_dir)).stdout
        assert re.search(r"^frank\s", listed, re.MULTILINE)
    log = server.log()
    assert "compatibility: SYNC_USER1 declares user frank" in log
    assert "native='syncproxy user add frank'" in log
    assert ("compatibility: MAX_SYNC_PAYLOAD_MEGS is read as max_body_mb; the native name is "
            "SYNCPROXY_MAX_BODY_MB") in log
    assert "compatibility: SYNC_IP_HEADER has no effect" in log
    assert "frank-secret-pw" not in log
    users = json.loads((data_dir / "users.json").read_text())
    assert users["users"]["frank"]["hash"].startswith("$pbkdf2-sha256$")


def test_near_miss_stops_serve(tmp_path: Path) -> None:
    result = syncproxy("serve", "--data-dir", str(tmp_path / "data"),
                       env={"MAX_SYNC_UPLOAD_MEGS": "500"}, check=False)
    assert result.returncode == 2
    assert "unknown environment variable MAX_SYNC_UPLOAD_MEGS; did you mean " \
           "MAX_SYNC_PAYLOAD_MEGS" in result.stderr
