"""Login throttling: failed logins are slowed, then refused for a while; good logins are not."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import zstandard

from support import REPO, SECRETS, AnkiClient, SyncProxy, add_user, tls_client_context
from syncproxy import throttle
from syncproxy.throttle import LoginThrottle, normalize_address, quote_name

FILTER = REPO / "config" / "fail2ban" / "filter.d" / "syncproxy.conf"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throttle.time, "monotonic", fake)
    return fake


def test_delay_grows_after_third_failure(clock: FakeClock) -> None:
    limiter = LoginThrottle(max_failures=100, block_seconds=900)
    delays = [limiter.record_failure("192.0.2.1", "alice") for _ in range(10)]
    assert delays[:2] == [0.0, 0.0]
    assert delays[2:6] == [0.5, 1.0, 2.0, 4.0]
    assert delays[6:] == [8.0] * 4


def test_block_after_max_failures(clock: FakeClock) -> None:
    limiter = LoginThrottle(max_failures=5, block_seconds=600)
    for _ in range(4):
        limiter.record_failure("192.0.2.1", "alice")
    assert limiter.check("192.0.2.1", "alice") is None
    limiter.record_failure("192.0.2.1", "alice")

    refusal = limiter.check("192.0.2.1", "bob")
    assert refusal is not None
    assert refusal.scope == "client"
    assert refusal.retry_after == 600
    assert limiter.check("192.0.2.2", "bob") is None
    assert limiter.check("192.0.2.2", "alice").scope == "user"

    clock.now += 601
    assert limiter.check("192.0.2.1", "alice") is None


def test_known_pair_passes_user_block(clock: FakeClock) -> None:
    limiter = LoginThrottle(max_failures=3, block_seconds=600)
    limiter.record_success("192.0.2.10", "alice")
    for _ in range(3):
        limiter.record_failure("198.51.100.1", "alice")
    assert limiter.check("192.0.2.10", "alice") is None
    assert limiter.check("192.0.2.11", "alice").scope == "user"


def test_old_failures_are_forgotten(clock: FakeClock) -> None:
    limiter = LoginThrottle(max_failures=3, block_seconds=60)
    limiter.record_failure("192.0.2.1", None)
    limiter.record_failure("192.0.2.1", None)
    clock.now += 61
    limiter.record_failure("192.0.2.1", None)
    assert limiter.check("192.0.2.1", None) is None


def test_tables_stay_bounded(clock: FakeClock) -> None:
    limiter = LoginThrottle(max_failures=3, block_seconds=60)
    for number in range(throttle.MAX_TRACKED + 50):
        limiter.record_failure(f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}",
                               f"user{number}")
    assert len(limiter.by_address) == throttle.MAX_TRACKED
    assert len(limiter.by_name) == throttle.MAX_TRACKED


def test_log_fields_are_one_line() -> None:
    assert normalize_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert normalize_address("2001:db8::1") == "2001:db8::1"
    quoted = quote_name('eve"\nWARNING syncproxy.login: login refused client=192.0.2.99')
    assert "\n" not in quoted
    assert quoted.startswith('"')
    assert quoted.endswith('"')
    assert len(quote_name("x" * 500)) < 80
    assert quote_name(None) == "-"


def login_body(user: str, password: str) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps({"u": user, "p": password}).encode())


def raw_login(server: SyncProxy, ca_file: Path, user: str, password: str,
              source: str) -> tuple[httpx.Response, float]:
    """Send one current-protocol login from the loopback address `source`."""
    SECRETS.add(password)
    transport = httpx.HTTPTransport(verify=tls_client_context(ca_file), local_address=source)
    headers = {"anki-sync": json.dumps({"v": 11, "k": "", "c": "test,1.0", "s": ""})}
    started = time.monotonic()
    with httpx.Client(transport=transport, timeout=60) as client:
        response = client.post(server.endpoint + "sync/hostKey", headers=headers,
                               content=login_body(user, password))
    elapsed = time.monotonic() - started
    if response.status_code == 200:
        document = zstandard.ZstdDecompressor().decompress(response.content,
                                                           max_output_size=1 << 16)
        SECRETS.add(json.loads(document)["key"])
    return response, elapsed


def refusal_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "login refused" in line]


def test_raw_logins_slowed_then_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice secret")
    add_user(data_dir, "bob", "bob secret")
    with SyncProxy(data_dir, "--login-max-failures", "4", "--login-block-seconds", "60") as server:
        ca_file = server.ca_file()
        # alice has logged in from her usual address before the attack starts.
        alice = AnkiClient(tmp_path / "alice", server.endpoint, ca_file)
        alice.login("alice", "alice secret")

        attempts = [raw_login(server, ca_file, "alice", "guess", "127.0.0.2") for _ in range(4)]
        assert [response.status_code for response, _ in attempts] == [403] * 4
        assert attempts[3][1] >= 1.0  # the fourth failure is held back one second

        refused, elapsed = raw_login(server, ca_file, "alice", "alice secret", "127.0.0.2")
        assert refused.status_code == 503
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "Too many failed logins from this address" in refused.text
        assert elapsed < 1.0

        # Another address is refused for alice's name, but not for another user.
        by_name, _ = raw_login(server, ca_file, "alice", "alice secret", "127.0.0.3")
        assert by_name.status_code == 503
        assert "for this user name" in by_name.text
        bob, _ = raw_login(server, ca_file, "bob", "bob secret", "127.0.0.3")
        assert bob.status_code == 200

        # alice, from the address she logged in from before, is not slowed or refused.
        started = time.monotonic()
        alice.login("alice", "alice secret")
        assert time.monotonic() - started < 20

    lines = refusal_lines(server.log())
    assert len(lines) == 2
    assert 'client=127.0.0.2 user="alice" scope=client' in lines[0]
    assert 'client=127.0.0.3 user="alice" scope=user' in lines[1]
    assert "login failed client=127.0.0.2" in server.log()


def test_anki_client_sees_server_error_when_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "carol", "carol secret")
    with SyncProxy(data_dir, "--login-max-failures", "2", "--login-block-seconds", "60") as server:
        client = AnkiClient(tmp_path / "carol", server.endpoint, server.ca_file())
        wrong = [client.run("login", "--endpoint", server.endpoint, "--user", "carol",
                            "--password-stdin", input="wrong\n", check=False)
                 for _ in range(2)]
        refused = client.run("login", "--endpoint", server.endpoint, "--user", "carol",
                             "--password-stdin", input="carol secret\n", check=False)

    # The client's own wording, anki 26.9: 403 is a wrong password, 5xx a server problem.
    for outcome in wrong:
        assert "password was incorrect" in outcome["error"]
    assert "password was incorrect" not in refused["error"]
    assert "AnkiWeb encountered a problem" in refused["error"]
    assert len(refusal_lines(server.log())) == 1


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None,
                    reason="fail2ban-regex not installed (Debian package fail2ban)")
def test_fail2ban_filter_matches_refusals(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "dave", "dave secret")
    with SyncProxy(data_dir, "--login-max-failures", "2", "--login-block-seconds", "60") as server:
        ca_file = server.ca_file()
        for _ in range(2):
            raw_login(server, ca_file, "dave", "guess", "127.0.0.4")
        # A crafted user name must not make fail2ban match another address.
        for _ in range(3):
            raw_login(server, ca_file, 'x" client=192.0.2.66 user="y', "guess", "127.0.0.4")

    result = subprocess.run(["fail2ban-regex", "-o", "ip", str(server.log_path), str(FILTER)],
                            capture_output=True, text=True, timeout=60, check=True)
    matched = result.stdout.split()
    assert matched == ["127.0.0.4"] * 3
