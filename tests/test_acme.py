"""certbot against a real pebble CA, validating HTTP-01 through the challenge app on loopback.

These drive the ACME parts directly (challenge listener, certbot runner,
reload); the end-to-end run through the syncproxy command is in
test_acme_server.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from acme_support import free_port, pebble_available, run_pebble
from syncproxy.acme import AcmeManager, AcmeOptions, Certbot
from syncproxy.acme_http import ChallengeApp
from syncproxy.certreload import ReloadingCertificate, describe_certificate
from test_certreload import TLSServer
from tls_support import client_context, handshake, write_pair

pytestmark = pytest.mark.skipif(not pebble_available(), reason="Debian package pebble is not installed")


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    http_port = free_port()
    with run_pebble(tmp_path_factory.mktemp("pebble"), http_port) as running:
        yield running


class PlainHTTP:
    """hypercorn serving the challenge app on 127.0.0.1:port, on its own thread."""

    def __init__(self, app: ChallengeApp, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        self.thread = threading.Thread(
            target=self.loop.run_until_complete,
            args=(serve(app, config, shutdown_trigger=self.stopping.wait),),
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


def options_for(pebble, **overrides) -> AcmeOptions:
    values = dict(domains=("localhost",), email=None, server=pebble.directory_url,
                  ca_bundle=pebble.https_ca_file, http_port=pebble.http_port)
    values.update(overrides)
    return AcmeOptions(**values)


def test_fresh_directory_gets_certificate_then_renews(pebble, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ca = trustme.CA()
    generated = write_pair(ca.issue_cert("localhost"), tmp_path / "generated")
    front = ReloadingCertificate(*generated, "generated", tmp_path / "scratch")
    tls = TLSServer(front)

    certbot = Certbot(options_for(pebble), tmp_path / "acme")
    listener = PlainHTTP(ChallengeApp(certbot.webroot, https_port=tls.port, requests=certbot.challenge_requests),
                         pebble.http_port)

    def install(fullchain, privkey):
        changed = []
        tls.call(lambda: changed.append(front.switch(fullchain, privkey, "acme")))
        return changed[0]

    manager = AcmeManager(certbot, install)
    try:
        assert asyncio.run(manager.check()) is True
        # pebble validated by fetching the token from our listener.
        assert certbot.challenge_requests.served >= 1
        issued = describe_certificate(certbot.fullchain.read_bytes())
        assert issued.names == ("localhost",)
        assert issued.chain_length >= 2

        leaf, *_ = handshake(tls.port, client_context())
        assert leaf.serial_number == issued.serial
        assert front.source == "acme"
        status = manager.status
        assert status.last_result == "ok"

        # An ordinary check with a fresh certificate renews nothing.
        assert asyncio.run(manager.check()) is True
        assert describe_certificate(certbot.fullchain.read_bytes()).serial == issued.serial

        served_before = certbot.challenge_requests.served
        assert asyncio.run(certbot.renew(force=True)).ok
        assert certbot.challenge_requests.served > served_before
        renewed = describe_certificate(certbot.fullchain.read_bytes())
        assert renewed.serial != issued.serial
        assert install(certbot.fullchain, certbot.privkey) is True
        leaf, *_ = handshake(tls.port, client_context())
        assert leaf.serial_number == renewed.serial
    finally:
        listener.stop()
        tls.stop()


def test_unreachable_listener_explained(pebble, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # No plain-HTTP listener on pebble's validation port: the CA cannot reach us.
    certbot = Certbot(options_for(pebble, email="admin@example.org"), tmp_path / "acme")
    calls = []
    manager = AcmeManager(certbot, lambda *pair: calls.append(pair) or True)

    assert asyncio.run(manager.check()) is False
    assert calls == []
    assert "acme request certificate failed" in caplog.text
    assert "never fetched the HTTP-01 challenge" in caplog.text
    assert f"plain-HTTP port {pebble.http_port}" in caplog.text
    assert manager.status.last_result == "failed"
    assert manager.next_delay(False) == manager.retry_delays[0]
