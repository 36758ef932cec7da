"""The running front end's certificate handling and TLS policy, seen by real TLS clients."""

from __future__ import annotations

import datetime
import json
import shutil
import signal
import ssl
import subprocess
import time

import pytest
import trustme

from support import SyncProxy
from tls_support import client_context, handshake, replace_by_rename, served_serial, write_pair

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def front(tmp_path, ca):
    cert_path, key_path = write_pair(ca.issue_cert("localhost", "127.0.0.1"), tmp_path / "certs")
    server = SyncProxy(tmp_path / "data", "--cert", str(cert_path), "--key", str(key_path))
    server.start(wait_for_core=False)
    yield server, cert_path, key_path
    server.stop()


def wait_for_log(server: SyncProxy, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout} s:\n{server.log()[-3000:]}")


def test_rename_replacement_within_5s(front, ca, tmp_path):
    server, cert_path, key_path = front
    old_serial = served_serial(server.port)
    new_cert, new_key = write_pair(ca.issue_cert("localhost"), tmp_path / "next")

    replaced_at = time.monotonic()
    replace_by_rename(new_key, key_path)
    replace_by_rename(new_cert, cert_path)
    while served_serial(server.port) == old_serial:
        assert time.monotonic() - replaced_at < 5.0, "old certificate still served after 5 s"
        time.sleep(0.1)
    assert server.process.poll() is None


def test_broken_replacement_keeps_old(front, ca, tmp_path):
    server, cert_path, key_path = front
    old_serial = served_serial(server.port)
    # A certificate whose key is not the one in the key file.
    mismatched, _ = write_pair(ca.issue_cert("localhost"), tmp_path / "other")
    replace_by_rename(mismatched, cert_path)

    wait_for_log(server, "certificate reload failed")
    assert "the private key does not match the certificate" in server.log()
    assert served_serial(server.port) == old_serial


def test_expired_replacement_keeps_old(front, ca, tmp_path):
    server, cert_path, key_path = front
    old_serial = served_serial(server.port)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = ca.issue_cert("localhost", not_before=past - datetime.timedelta(days=90), not_after=past)
    expired_cert, expired_key = write_pair(expired, tmp_path / "expired")
    replace_by_rename(expired_key, key_path)
    replace_by_rename(expired_cert, cert_path)

    wait_for_log(server, "certificate reload failed")
    assert "the certificate expired on" in server.log()
    assert served_serial(server.port) == old_serial


def test_sighup_reloads(front):
    server, _, _ = front
    server.process.send_signal(signal.SIGHUP)
    wait_for_log(server, "certificate reload requested signal=SIGHUP")
    wait_for_log(server, "reason=SIGHUP")
    assert server.process.poll() is None


def test_no_sni_gets_default_certificate(front):
    server, _, _ = front
    by_name, *_ = handshake(server.port, client_context(), "localhost")
    by_address, *_ = handshake(server.port, client_context(), None)
    assert by_address.serial_number == by_name.serial_number


def test_full_chain_served(tmp_path):
    root = trustme.CA()
    intermediate = root.create_child_ca()
    cert_path, key_path = write_pair(intermediate.issue_cert("localhost"), tmp_path / "certs")
    rootfile = tmp_path / "root.pem"
    root.cert_pem.write_to_path(str(rootfile))
    with SyncProxy(tmp_path / "data", "--cert", str(cert_path), "--key", str(key_path)) as server:
        # The client knows only the root, so this verifies only if the intermediate is sent.
        leaf, *_ = handshake(server.port, client_context(rootfile))
        assert "holds only the leaf" not in server.log()


def test_tls12_only_client_succeeds(front):
    server, _, _ = front
    _, version, _, cipher = handshake(server.port, client_context(version=ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-")
    assert "GCM" in cipher or "CHACHA20" in cipher


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls11_client_fails(front):
    server, _, _ = front
    with pytest.raises(ssl.SSLError):
        handshake(server.port, client_context(version=ssl.TLSVersion.TLSv1_1))


def test_h2_never_negotiated(front):
    server, _, _ = front
    _, _, alpn, _ = handshake(server.port, client_context(alpn=["h2", "http/1.1"]))
    assert alpn == "http/1.1"
    _, _, alpn, _ = handshake(server.port, client_context(alpn=["h2"]))
    assert alpn is None


@pytest.mark.skipif(TESTSSL is None, reason="Debian package testssl.sh is not installed")
def test_testssl_reports_nothing_outside_policy(front, tmp_path):
    server, _, _ = front
    report = tmp_path / "testssl.json"
    # Protocols, cipher categories, forward secrecy, server preferences, vulnerabilities.
    # The certificate checks (-S) are left out: they judge the test CA, not the policy.
    result = subprocess.run(
        [TESTSSL, "--quiet", "--color", "0", "--warnings", "off", "--ip", "one",
         "--jsonfile-pretty", str(report), "-p", "-s", "-f", "-P", "-U",
         f"127.0.0.1:{server.port}"],
        capture_output=True, text=True, timeout=400,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-2000:]
    findings = {}
    for section, items in json.loads(report.read_text())["scanResult"][0].items():
        if isinstance(items, list):
            for item in items:
                findings[item["id"]] = (section, item["severity"], item["finding"])

    for protocol in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[protocol][2] == "not offered", findings[protocol]
    assert findings["TLS1_2"][2] == "offered"
    assert findings["TLS1_3"][2].startswith("offered")
    assert findings["ALPN"][2] == "http/1.1"
    assert findings["NPN"][2] == "not offered"
    for category in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                     "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"):
        assert findings[category][2] == "not offered", findings[category]
    for cipher in findings["cipherorder_TLSv1_2"][2].split():
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher

    problems = [(name, severity, text) for name, (section, severity, text) in findings.items()
                if section == "vulnerabilities" and severity not in ("OK", "INFO")]
    assert problems == []
