"""The front end's certificate: validation, and reload without restart.

Rules this module keeps:
- The listener holds one SSLContext for its whole life. Its ``sni_callback``
  hands every handshake, with or without SNI, the context of the pair in use
  now, so a reload affects new handshakes only and never a connection in
  flight (OpenSSL copies the certificate into each connection at its start).
- A reload builds a fresh context rather than calling ``load_cert_chain`` on
  the live one: a live context keeps one certificate slot per key type, so
  moving from an RSA to an ECDSA certificate would leave the old RSA one
  servable.
- A new pair is read once into memory and checked (PEM parses, key matches,
  certificate inside its validity period) before anything changes. If any
  check fails, the reason is logged and the old pair stays in use.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from .tls import CertificateError, create_policy_context

log = logging.getLogger("syncproxy.certs")

WATCH_INTERVAL = 1.0
# A change is loaded only once the files have stopped changing for this long,
# so a pair written in two steps is not caught half-way.
SETTLE_TIME = 0.5
SETTLE_MAX = 5.0

SOURCES = ("files", "generated", "acme")


@dataclass(frozen=True)
class CertificateInfo:
    """What a person checks about a certificate, taken from its leaf."""

    names: tuple[str, ...]
    issuer: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    chain_length: int
    self_signed: bool

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def days_left(self, now: Optional[datetime.datetime] = None) -> int:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.not_after - now).days


def describe_certificate(chain_pem: bytes) -> CertificateInfo:
    """Parse a PEM chain (leaf first) into a CertificateInfo; raise CertificateError."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise CertificateError(f"the certificate file is not valid PEM ({exc})") from None
    leaf = chain[0]

    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names += san.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names += [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]

    return CertificateInfo(
        names=tuple(str(n) for n in names),
        issuer=leaf.issuer.rfc4514_string(),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        chain_length=len(chain),
        self_signed=leaf.issuer == leaf.subject,
    )


def load_pair(cert_path: Path, key_path: Path, scratch_dir: Path) -> tuple[ssl.SSLContext, CertificateInfo]:
    """Read, check and load one pair into a new policy context; raise CertificateError."""
    try:
        chain_pem = cert_path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate file {cert_path}: {exc.strerror}") from None
    try:
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read key file {key_path}: {exc.strerror}") from None

    info = describe_certificate(chain_pem)
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the key file {key_path} is not an unencrypted PEM private key ({exc})") from None

    now = datetime.datetime.now(datetime.timezone.utc)
    if info.not_after <= now:
        raise CertificateError(f"the certificate expired on {info.not_after:%Y-%m-%d %H:%M} UTC")
    if info.not_before > now:
        raise CertificateError(f"the certificate is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC")

    context = create_policy_context()
    _load_from_memory(context, key_pem, chain_pem, scratch_dir)
    return context, info


def _load_from_memory(context: ssl.SSLContext, key_pem: bytes, chain_pem: bytes, scratch_dir: Path) -> None:
    # ssl only loads from paths. Loading the bytes already checked (through a
    # private copy) means a file rewritten meanwhile cannot slip in unchecked.
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".loading-", suffix=".pem", dir=scratch_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem.rstrip(b"\n") + b"\n" + chain_pem)
        context.load_cert_chain(name)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise CertificateError("the private key does not match the certificate") from None
        raise CertificateError(f"OpenSSL rejected the pair ({exc.reason or exc})") from None
    finally:
        os.unlink(name)


def _file_signature(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ("missing",)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ReloadingCertificate:
    """The pair the front end serves, swapped in place when its files change.

    ``context`` is what the listener wraps connections with; it stays the
    same object for the life of the process.
    """

    def __init__(self, cert_path: Path, key_path: Path, source: str, scratch_dir: Path) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown certificate source {source!r}")
        self.scratch_dir = scratch_dir
        current, info = load_pair(cert_path, key_path, scratch_dir)
        self.cert_path, self.key_path, self.source = cert_path, key_path, source
        self.info = info
        self._current = current
        self._signature = self._signatures()
        self._reload_requested = asyncio.Event()
        self.listeners: list[Callable[[CertificateInfo], None]] = []

        # Holds no certificate itself: the callback gives each handshake one.
        self.context = create_policy_context()
        self.context.sni_callback = self._pick_context
        self._warn_if_leaf_only(info)
        log.info("certificate loaded %s", self._fields(info))

    def current(self) -> ssl.SSLContext:
        """Return the context to wrap a new connection with (the listener calls this)."""
        return self.context

    def _pick_context(self, ssl_object, server_name, _context) -> None:
        # Called for every ClientHello, server_name None without SNI: every
        # client, by name or by IP address, gets the pair in use now.
        ssl_object.context = self._current
        return None

    def _signatures(self) -> tuple:
        return (_file_signature(self.cert_path), _file_signature(self.key_path))

    def _fields(self, info: CertificateInfo) -> str:
        return (
            f"source={self.source} names={','.join(info.names) or '-'} serial={info.serial_hex} "
            f"expires={info.not_after:%Y-%m-%d} days_left={info.days_left()} cert={self.cert_path}"
        )

    def _warn_if_leaf_only(self, info: CertificateInfo) -> None:
        if info.chain_length == 1 and not info.self_signed:
            log.warning(
                "certificate file holds only the leaf, clients that lack the intermediate fail "
                "with an unknown issuer: point --cert at the full chain (certbot's fullchain.pem) "
                "cert=%s", self.cert_path,
            )

    def reload(self, reason: str) -> bool:
        """Load the current files; return True if the served pair changed.

        On any problem the old pair stays in use and the reason is logged.
        """
        self._signature = self._signatures()
        try:
            context, info = load_pair(self.cert_path, self.key_path, self.scratch_dir)
        except CertificateError as exc:
            log.error(
                "certificate reload failed, still serving the old one reason=%s error=%r "
                "cert=%s key=%s serving_serial=%s",
                reason, str(exc), self.cert_path, self.key_path, self.info.serial_hex,
            )
            return False
        return self._install(context, info, reason)

    def switch(self, cert_path: Path, key_path: Path, source: str) -> bool:
        """Serve a pair from other files (an ACME certificate replacing the generated one)."""
        try:
            context, info = load_pair(cert_path, key_path, self.scratch_dir)
        except CertificateError as exc:
            log.error(
                "certificate switch failed, still serving the old one new_source=%s error=%r cert=%s",
                source, str(exc), cert_path,
            )
            return False
        self.cert_path, self.key_path, self.source = cert_path, key_path, source
        self._signature = self._signatures()
        return self._install(context, info, f"switch to {source}")

    def _install(self, context: ssl.SSLContext, info: CertificateInfo, reason: str) -> bool:
        changed = info.serial != self.info.serial or info.not_after != self.info.not_after
        self._current = context
        old = self.info
        self.info = info
        if changed:
            self._warn_if_leaf_only(info)
            log.info("certificate reloaded reason=%s old_serial=%s %s", reason, old.serial_hex, self._fields(info))
            for listener in self.listeners:
                listener(info)
        else:
            log.info("certificate reloaded, unchanged reason=%s serial=%s", reason, info.serial_hex)
        return changed

    def request_reload(self) -> None:
        """Ask the watcher to reload now (SIGHUP)."""
        self._reload_requested.set()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Poll the files and reload on change or on request; runs until cancelled.

        Polling the resolved paths catches replacement by rename and certbot's
        symlink swaps, which inotify on the original path would miss.
        """
        while True:
            try:
                await asyncio.wait_for(self._reload_requested.wait(), interval)
            except asyncio.TimeoutError:
                pass
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                log.info("certificate reload requested signal=SIGHUP cert=%s", self.cert_path)
                self.reload("SIGHUP")
                continue
            if self._signatures() != self._signature:
                await self._wait_until_settled()
                self.reload("files changed")

    async def _wait_until_settled(self) -> None:
        waited = 0.0
        seen = self._signatures()
        while waited < SETTLE_MAX:
            await asyncio.sleep(SETTLE_TIME)
            waited += SETTLE_TIME
            now = self._signatures()
            if now == seen:
                return
            seen = now
