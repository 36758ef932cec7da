"""The sync core's wedged state, and the password hash check that keeps syncproxy out of it.

A panic inside the core while it holds its single lock poisons the lock: every later /sync and
/msync request drops its connection, while /health still answers 200. syncproxy checks every
hash before the core sees it, so it cannot cause that panic itself; to test the detection, these
tests start the real core with a hash the check would reject (bypassing the check on purpose)
and wedge it with a real login.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from pathlib import Path

import httpx
import pytest
import zstandard

from syncproxy import core as core_module
from syncproxy.core import SyncCore
from syncproxy.users import User, UserError, check_phc


def phc(salt_bytes: int, output_bytes: int, password: str = "pw", digest: str = "sha256",
        rounds: int = 1000) -> str:
    salt = bytes(range(salt_bytes))
    derived = hashlib.pbkdf2_hmac(digest, password.encode(), salt, rounds, dklen=output_bytes)

    def encode(data: bytes) -> str:
        return base64.b64encode(data).decode().rstrip("=")

    return f"$pbkdf2-{digest}$i={rounds},l={output_bytes}${encode(salt)}${encode(derived)}"


async def login(url: str, name: str, password: str) -> int | str:
    """Log in directly at the core; return the status, or the error if the connection dropped."""
    headers = {"anki-sync": json.dumps({"v": 11, "k": "", "c": "test", "s": ""}),
               "x-forwarded-for": "127.0.0.1"}
    body = zstandard.ZstdCompressor().compress(json.dumps({"u": name, "p": password}).encode())
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        try:
            response = await client.post(url + "/sync/hostKey", headers=headers, content=body)
        except httpx.TransportError as error:
            return type(error).__name__
    return response.status_code


ACCEPTED_AT_THE_LIMITS = {
    "shortest salt": phc(8, 32),
    "longest salt": phc(48, 32),
    "shortest output": phc(16, 16),
    "longest output": phc(16, 64),
    "sha512": phc(16, 64, digest="sha512"),
}
REJECTED_PAST_THE_LIMITS = {
    "salt one byte too long": phc(49, 32),
    "output one byte too long": phc(16, 65),
    "output far too long": phc(16, 100),
    "salt too short": phc(4, 32),
}


@pytest.mark.parametrize("name", sorted(REJECTED_PAST_THE_LIMITS))
def test_check_phc_rejects_past_limits(name: str) -> None:
    with pytest.raises(UserError):
        check_phc(REJECTED_PAST_THE_LIMITS[name])


def test_core_accepts_every_checked_hash(tmp_path: Path) -> None:
    """Every hash check_phc accepts at its limits logs in at the real core without a panic."""
    users = []
    for number, (label, hash_text) in enumerate(sorted(ACCEPTED_AT_THE_LIMITS.items())):
        check_phc(hash_text)
        users.append(User(name=f"user{number}", phc=hash_text, created=0.0))

    async def scenario() -> dict[str, int | str]:
        core = SyncCore(tmp_path / "collections", 100, probe_interval=0)
        await core.start(users)
        try:
            return {user.name: await login(core.url, user.name, "pw") for user in users}
        finally:
            await core.stop()

    assert asyncio.run(scenario()) == {user.name: 200 for user in users}


@pytest.mark.parametrize("trigger", ["panic line", "periodic probe"])
def test_wedged_core_is_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture, trigger: str) -> None:
    # Bypass the hash check on purpose: it is what normally keeps the core out of this state.
    monkeypatch.setattr(core_module, "check_phc", lambda phc_text: None)
    if trigger == "periodic probe":
        monkeypatch.setattr(core_module, "PANIC_MARKER", "\0never printed\0")
    users = [User("alice", phc(16, 32, password="alice-pw"), 0.0),
             User("mallory", REJECTED_PAST_THE_LIMITS["salt one byte too long"], 0.0)]
    caplog.set_level(logging.INFO, logger="syncproxy.core")

    async def scenario() -> None:
        interval = 0 if trigger == "panic line" else 1.0
        core = SyncCore(tmp_path / "collections", 100, probe_interval=interval)
        await core.start(users)
        try:
            wedged_url = core.url
            if interval:
                # A healthy core passes a few periodic probes without a restart.
                await asyncio.sleep(2.5)
                assert core.wedge_restarts == 0
            assert await login(wedged_url, "alice", "alice-pw") == 200

            assert await login(wedged_url, "mallory", "pw") == "RemoteProtocolError"
            async with httpx.AsyncClient(trust_env=False) as client:
                assert (await client.get(wedged_url + "/health")).status_code == 200

            for _ in range(300):
                if core.wedge_restarts and core.ready:
                    break
                await asyncio.sleep(0.1)
            assert core.wedge_restarts == 1
            assert core.ready
            assert await login(core.url, "alice", "alice-pw") == 200
        finally:
            await core.stop()

    asyncio.run(scenario())
    assert "sync core stopped serving syncs while /health responds" in caplog.text
