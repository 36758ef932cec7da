"""A user added while another user's full upload runs can log in at once; the upload finishes."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from relay import ThrottledRelay
from support import (ANKI_CLIENT, AnkiClient, ClientError, SyncProxy, add_user,
                     clean_environment, syncproxy)
from syncproxy.users import UserStore, hash_password

NOTES = 20_000
MEDIA = 10
# Alice's uploads go through a relay at this rate, so that her full upload (about 1 MB for
# 20,000 notes) is still in flight when bob is added, however fast the machine is.
UPLOAD_BYTES_PER_SECOND = 600_000
UPLOAD_IN_FLIGHT_BYTES = 200_000
LOGIN_WITHIN_SECONDS = 5.0


def test_user_added_during_full_upload(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "alice-pw")
    add_user(data_dir, "carol", "carol-pw")  # never syncs
    with SyncProxy(data_dir) as server:
        trust = server.ca_file()
        relay = ThrottledRelay(server.port, UPLOAD_BYTES_PER_SECOND)
        alice = AnkiClient(tmp_path / "alice", f"https://127.0.0.1:{relay.port}/", trust)
        alice.build(NOTES, MEDIA, label="big")
        alice.login("alice", "alice-pw")

        # Bob's client process starts now and waits for its password, so that the measured
        # time is the server's, not a Python start-up.
        bob_collection = tmp_path / "bob" / "collection.anki2"
        bob_collection.parent.mkdir()
        environment = clean_environment({"SSL_CERT_FILE": str(trust)})
        bob = subprocess.Popen(
            [sys.executable, str(ANKI_CLIENT), "login", str(bob_collection), "--endpoint",
             server.endpoint, "--user", "bob", "--password-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environment,
        )

        # Hashed ahead: 600,000 PBKDF2 rounds can take seconds on a loaded machine, and the
        # change must land while alice's upload is still in flight.
        bob_hash = hash_password("bob-pw")
        outcome: dict[str, object] = {}

        def upload() -> None:
            try:
                outcome["result"] = alice.sync("--upload")
            except ClientError as error:
                outcome["error"] = error

        uploader = threading.Thread(target=upload)
        uploader.start()
        deadline = time.monotonic() + 120
        while "path=/sync/meta status=200" not in server.log():
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.02)
        # The full upload is in flight once its first 200 KB have gone through the relay.
        before_upload = relay.uploaded
        while relay.uploaded - before_upload < UPLOAD_IN_FLIGHT_BYTES:
            assert time.monotonic() < deadline, "alice's upload never started"
            time.sleep(0.01)
        # The users file is written through the same UserStore that 'syncproxy user add' uses,
        # in-process to skip a start-up.
        UserStore(data_dir / "users.json").put_hash("bob", bob_hash)
        added = time.monotonic()
        stdout, stderr = bob.communicate("bob-pw\n", timeout=120)
        login_seconds = time.monotonic() - added
        uploader.join(300)
        relay.close()

    assert bob.returncode == 0, stderr
    assert '"hkey"' in stdout
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["required"] == "FULL_UPLOAD"
    held = re.search(r"holding new syncs reason='users changed' active=(\d+) sessions=(\d+)",
                     server.log())
    assert held is not None
    # Alice's upload was in flight when the change arrived, and the restart waited for it.
    assert int(held[1]) + int(held[2]) > 0, held[0]
    assert login_seconds < LOGIN_WITHIN_SECONDS, f"bob's login took {login_seconds:.1f} s"
    print(f"bob logged in {login_seconds:.2f} s after being added")

    listing = syncproxy("user", "list", "--data-dir", str(data_dir)).stdout.splitlines()
    rows = {line.split()[0]: line for line in listing[1:]}
    size = re.search(r"([0-9.]+) MiB", rows["alice"])
    assert size is not None and float(size[1]) > 1.0, rows["alice"]
    assert rows["alice"].split()[-2] == time.strftime("%Y-%m-%d")
    assert rows["carol"].endswith("never")


def test_user_add_cli_reaches_running_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "carol", "carol-pw")
    with SyncProxy(data_dir) as server:
        add_user(data_dir, "dave", "dave-pw")
        added = time.monotonic()
        dave = AnkiClient(tmp_path / "dave", server.endpoint, server.ca_file())
        assert len(dave.login("dave", "dave-pw")) == 40
        assert time.monotonic() - added < LOGIN_WITHIN_SECONDS + 3  # includes a client start
