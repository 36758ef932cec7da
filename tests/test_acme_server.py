"""`syncproxy --domain` end to end: pebble validates through syncproxy's own plain-HTTP listener."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from pathlib import Path

import pytest

from acme_support import free_port, pebble_available, run_pebble
from relay import ThrottledRelay
from support import AnkiClient, SyncProxy, add_user, syncproxy
from syncproxy.acme import AcmeOptions, Certbot
from tls_support import client_context, handshake

pytestmark = pytest.mark.skipif(not pebble_available(), reason="Debian package pebble is not installed")

ACME_WAIT = 60.0


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    with run_pebble(tmp_path_factory.mktemp("pebble"), free_port()) as running:
        yield running


def acme_args(pebble) -> tuple[str, ...]:
    return ("--domain", "localhost", "--acme-no-email",
            "--acme-server", pebble.directory_url,
            "--acme-ca-bundle", str(pebble.https_ca_file),
            "--http-port", str(pebble.http_port))


def wait_for_issuer(port: int, fragment: str, timeout: float, server: SyncProxy):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leaf, *_ = handshake(port, client_context())
        if fragment in leaf.issuer.rfc4514_string():
            return leaf
        time.sleep(0.25)
    raise AssertionError(f"no certificate from {fragment!r} within {timeout} s:\n{server.log()}")


def wait_for_new_serial(port: int, old: int, timeout: float) -> tuple[int, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leaf, *_ = handshake(port, client_context())
        if leaf.serial_number != old:
            return leaf.serial_number, time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"serial still {old:x} after {timeout} s")


def test_domain_gets_certificate_and_renews_live(pebble, tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "correct horse")
    server = SyncProxy(data_dir, *acme_args(pebble))
    server.start()
    try:
        # Issued through syncproxy's webroot listener, with pebble really fetching the token.
        first = wait_for_issuer(server.port, "Pebble", ACME_WAIT, server)
        assert "acme challenge request" in server.log()
        assert "found=True" in server.log()
        assert "acme request certificate done" in server.log()

        roots = tmp_path / "pebble-roots.pem"
        roots.write_text(pebble.issuing_roots_pem())
        verified, version, alpn, _ = handshake(server.port, client_context(roots, alpn=["h2", "http/1.1"]))
        assert verified.serial_number == first.serial_number
        assert alpn == "http/1.1"

        status = syncproxy("cert", "status", "--data-dir", str(data_dir), *acme_args(pebble)).stdout
        assert "source:   acme" in status
        assert "names:    localhost" in status
        assert "days left" in status
        assert "next check" in status

        # A sync that is in flight while the certificate is renewed completes.
        # The client's uploads go through a relay at 1 MB/s, so its 15 MB of media keep the
        # sync in flight for about 15 s however fast the machine is; a renewal takes about 4 s.
        relay = ThrottledRelay(server.port, 1_000_000)
        client = AnkiClient(tmp_path / "client", f"https://localhost:{relay.port}/", roots)
        client.build(notes=3000)
        # The client's media scan picks up files placed in its media folder.
        media_dir = client.collection.with_suffix(".media")
        media_dir.mkdir(exist_ok=True)
        for index in range(100):
            (media_dir / f"noise-{index}.bin").write_bytes(os.urandom(150_000))
        client.login("alice", "correct horse")
        outcome: dict = {}

        def sync_in_background():
            outcome["started"] = time.monotonic()
            try:
                outcome["result"] = client.sync("--upload")
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = error
            outcome["finished"] = time.monotonic()

        sync_thread = threading.Thread(target=sync_in_background)
        sync_thread.start()
        deadline = time.monotonic() + 30
        while "/sync/" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.02)

        # The renewal the server's schedule runs, forced because pebble's certificates are
        # far from expiry; it validates through the running server's listener again.
        certbot = Certbot(AcmeOptions(domains=("localhost",), email=None, server=pebble.directory_url,
                                      ca_bundle=pebble.https_ca_file, http_port=pebble.http_port),
                          data_dir / "acme")
        renewal = asyncio.run(certbot.renew(force=True))
        assert renewal.ok, renewal.output
        new_serial, switched_at = wait_for_new_serial(server.port, first.serial_number, 5.0)
        sync_thread.join(300)
        relay.close()

        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"]["notes"] == 3000
        assert outcome["started"] < switched_at, "the sync did not start before the renewal"
        print(f"sync {outcome['finished'] - outcome['started']:.1f} s, renewal served "
              f"{switched_at - outcome['started']:.1f} s after the sync started")
        assert outcome["finished"] > switched_at, "the sync ended before the renewed certificate was served"
        assert new_serial != first.serial_number
        assert server.process.poll() is None

        # A second device downloads what the first uploaded, over the renewed certificate.
        other = AnkiClient(tmp_path / "other", f"https://localhost:{server.port}/", roots)
        other.login("alice", "correct horse")
        other.sync("--download")
        assert other.dump() == client.dump()
    finally:
        server.stop()


def test_existing_certificate_served_at_restart(pebble, tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "acme-test-password")
    with SyncProxy(data_dir, *acme_args(pebble)) as server:
        issued = wait_for_issuer(server.port, "Pebble", ACME_WAIT, server)
    # The second start must serve the kept certificate at once, not the generated one.
    with SyncProxy(data_dir, *acme_args(pebble)) as server:
        leaf, *_ = handshake(server.port, client_context())
        assert leaf.serial_number == issued.serial_number
        deadline = time.monotonic() + 30
        while "acme checking renewal" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "acme checking renewal" in server.log()


def test_plain_http_redirects_to_https(pebble, tmp_path):
    import httpx
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", "acme-test-password")
    with SyncProxy(data_dir, *acme_args(pebble)) as server:
        response = httpx.get(f"http://127.0.0.1:{pebble.http_port}/sync/meta?a=1",
                             follow_redirects=False, trust_env=False)
        assert response.status_code == 301
        assert response.headers["location"] == f"https://127.0.0.1:{server.port}/sync/meta?a=1"
