"""Certificate reload and TLS policy on a bare TLS listener using the front end's context."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from syncproxy.certreload import ReloadingCertificate, describe_certificate
from tls_support import client_context, handshake, replace_by_rename, served_serial, write_pair


class TLSServer:
    """A TLS server on its own thread that wraps each connection with the reloader's context."""

    def __init__(self, reloader: ReloadingCertificate) -> None:
        self.reloader = reloader
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def hold(reader, writer):
            await reader.read()
            writer.close()

        async def main():
            server = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=self.reloader.context)
            self.port = server.sockets[0].getsockname()[1]
            self.watcher = asyncio.ensure_future(self.reloader.watch(interval=0.2))
            started.set()
            async with server:
                await server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def call(self, fn):
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        assert done.wait(5)

    def stop(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(5)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def served(tmp_path, ca):
    cert_path, key_path = write_pair(ca.issue_cert("localhost", "127.0.0.1"), tmp_path / "live")
    reloader = ReloadingCertificate(cert_path, key_path, "files", tmp_path / "scratch")
    server = TLSServer(reloader)
    yield server, cert_path, key_path
    server.stop()


def wait_for_serial(port: int, serial: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if served_serial(port) == serial:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"serial {serial:x} not served within {timeout} s")


def test_rename_replacement_served_within_5s(served, ca, tmp_path):
    server, cert_path, key_path = served
    new_cert, new_key = write_pair(ca.issue_cert("localhost"), tmp_path / "next")
    new_serial = describe_certificate(new_cert.read_bytes()).serial
    assert served_serial(server.port) != new_serial

    replace_by_rename(new_key, key_path)
    replace_by_rename(new_cert, cert_path)

    elapsed = wait_for_serial(server.port, new_serial, 5.0)
    assert elapsed < 5.0


def test_connection_in_flight_keeps_working(served, ca, tmp_path):
    server, cert_path, key_path = served
    context = client_context()
    with socket_pair(server.port, context) as tls:
        old_serial = x509_serial(tls)
        new_cert, new_key = write_pair(ca.issue_cert("localhost"), tmp_path / "next")
        replace_by_rename(new_key, key_path)
        replace_by_rename(new_cert, cert_path)
        wait_for_serial(server.port, describe_certificate(new_cert.read_bytes()).serial, 5.0)
        # The old connection still has its session and can send.
        tls.sendall(b"still here")
        assert x509_serial(tls) == old_serial


def test_rsa_to_ecdsa_switch_drops_rsa(tmp_path):
    rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    ec_ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert_path, key_path = write_pair(rsa_ca.issue_cert("localhost"), tmp_path / "live")
    reloader = ReloadingCertificate(cert_path, key_path, "files", tmp_path / "scratch")
    server = TLSServer(reloader)
    try:
        new_cert, new_key = write_pair(ec_ca.issue_cert("localhost"), tmp_path / "next")
        replace_by_rename(new_key, key_path)
        replace_by_rename(new_cert, cert_path)
        new_serial = describe_certificate(new_cert.read_bytes()).serial
        wait_for_serial(server.port, new_serial, 5.0)

        # A client that accepts only RSA signatures must not get the old RSA pair.
        rsa_only = client_context(version=ssl.TLSVersion.TLSv1_2)
        rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
        with pytest.raises(ssl.SSLError):
            handshake(server.port, rsa_only)
    finally:
        server.stop()


@pytest.mark.parametrize("breakage", ["garbage PEM", "key mismatch", "expired"])
def test_broken_replacement_keeps_old(served, ca, tmp_path, caplog, breakage):
    server, cert_path, key_path = served
    old_serial = served_serial(server.port)

    if breakage == "garbage PEM":
        (tmp_path / "bad.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        replace_by_rename(tmp_path / "bad.crt", cert_path)
        expected = "not valid PEM"
    elif breakage == "key mismatch":
        other_cert, _ = write_pair(ca.issue_cert("localhost"), tmp_path / "other")
        replace_by_rename(other_cert, cert_path)
        expected = "does not match"
    else:
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
        expired = ca.issue_cert("localhost", not_before=past - datetime.timedelta(days=30), not_after=past)
        expired_cert, expired_key = write_pair(expired, tmp_path / "expired")
        replace_by_rename(expired_key, key_path)
        replace_by_rename(expired_cert, cert_path)
        expected = "expired"

    with caplog.at_level(logging.ERROR, logger="syncproxy.certs"):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "reload failed" not in caplog.text:
            time.sleep(0.1)
    assert "certificate reload failed" in caplog.text
    assert expected in caplog.text
    assert served_serial(server.port) == old_serial


def test_sighup_forces_reload(served, ca, tmp_path, caplog):
    server, cert_path, key_path = served
    caplog.set_level(logging.INFO, logger="syncproxy.certs")
    server.call(server.reloader.request_reload)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "reason=SIGHUP" not in caplog.text:
        time.sleep(0.05)
    assert "reason=SIGHUP" in caplog.text


def test_no_sni_client_gets_default(served):
    server, _, _ = served
    leaf_by_name, *_ = handshake(server.port, client_context(), "localhost")
    leaf_by_ip, *_ = handshake(server.port, client_context(), None)
    assert leaf_by_ip.serial_number == leaf_by_name.serial_number


def test_tls12_client_gets_ecdhe_aead(served):
    server, _, _ = served
    _, version, _, cipher = handshake(server.port, client_context(version=ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-")
    assert "GCM" in cipher or "CHACHA20" in cipher


def test_tls12_non_forward_secret_rejected(served):
    server, _, _ = served
    context = client_context(version=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("AES128-GCM-SHA256:AES256-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):
        handshake(server.port, context)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"])
def test_old_tls_rejected(served, tmp_path, version):
    server, cert_path, key_path = served
    # Control: the same client completes a handshake with a permissive server,
    # so the failure below is the front end's policy and not the client's.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(cert_path, key_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def accept_one():
            conn, _ = listener.accept()
            with conn:
                try:
                    permissive.wrap_socket(conn, server_side=True).close()
                except ssl.SSLError:
                    pass

        thread = threading.Thread(target=accept_one)
        thread.start()
        _, negotiated, _, _ = handshake(port, client_context(version=version))
        thread.join(5)
    assert negotiated in ("TLSv1", "TLSv1.1")

    with pytest.raises(ssl.SSLError):
        handshake(server.port, client_context(version=version))


def test_h2_never_negotiated(served):
    server, _, _ = served
    _, _, alpn, _ = handshake(server.port, client_context(alpn=["h2", "http/1.1"]))
    assert alpn == "http/1.1"
    # OpenSSL continues without ALPN when nothing overlaps; the client must
    # then speak HTTP/1.1, never h2.
    _, _, alpn, _ = handshake(server.port, client_context(alpn=["h2"]))
    assert alpn is None


@contextlib.contextmanager
def socket_pair(port: int, context: ssl.SSLContext):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    try:
        yield tls
    finally:
        tls.close()


def x509_serial(tls: ssl.SSLSocket) -> int:
    return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
