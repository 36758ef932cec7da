"""TLS for the front end: the server context, and the local CA generated for a first run.

Without --cert/--key, syncproxy creates a small CA of its own in the data directory and issues the
server certificate from it. Clients trust the CA (AnkiDroid's "custom certificate" setting, or the
system store), so the server certificate can be reissued (new names, renewal) without touching
the clients again.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("syncproxy.tls")

CA_VALIDITY = datetime.timedelta(days=3650)
# Apple platforms reject server certificates valid for more than 825 days, even from a CA the
# user installed, so AnkiMobile needs this limit; one day less leaves room for the backdating.
SERVER_VALIDITY = datetime.timedelta(days=824)
REISSUE_BEFORE = datetime.timedelta(days=30)

# TLS 1.2 suites limited to forward-secret AEAD; TLS 1.3 suites are all AEAD and not set here.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class CertificateError(RuntimeError):
    """A certificate or key that cannot be used, with the file and the reason."""


@dataclass(frozen=True)
class CertificatePaths:
    """Where the front end's certificate chain and key are, and where they came from."""

    chain: Path
    key: Path
    source: str  # "files" or "generated"
    ca: Path | None = None


def machine_names() -> list[str]:
    """Return the names and addresses the generated certificate covers by default."""
    names = ["localhost", "127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file so that it is never readable by others, not even briefly."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _create_ca(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "syncproxy"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"syncproxy local CA ({socket.gethostname()})"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(tls_dir / "ca-key.pem", _key_pem(key))
    _write_public(tls_dir / "ca.pem", certificate.public_bytes(serialization.Encoding.PEM))
    log.info("created local CA path=%s", tls_dir / "ca.pem")
    return certificate, key


def _load_ca(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        certificate = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((tls_dir / "ca-key.pem").read_bytes(), None)
    except FileNotFoundError:
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{tls_dir / 'ca-key.pem'} is not an EC key")
    return certificate, key


def _issue_server(
    tls_dir: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    chain = certificate.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
        serialization.Encoding.PEM
    )
    _write_private(tls_dir / "server-key.pem", _key_pem(key))
    _write_public(tls_dir / "server.pem", chain)
    log.info("issued server certificate names=%s expires=%s", ",".join(names),
             certificate.not_valid_after_utc.date().isoformat())


def _server_needs_reissue(tls_dir: Path, ca: x509.Certificate, names: list[str]) -> str | None:
    """Return why the generated server certificate must be issued again, or None."""
    try:
        certificate = x509.load_pem_x509_certificate((tls_dir / "server.pem").read_bytes())
    except FileNotFoundError:
        return "none exists yet"
    if not (tls_dir / "server-key.pem").exists():
        return "its key is missing"
    if certificate.issuer != ca.subject:
        return "it was issued by another CA"
    remaining = certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if remaining < REISSUE_BEFORE:
        return f"it expires in {remaining.days} days"
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subjectAltName"
    covered = {str(value) for value in san.get_values_for_type(x509.DNSName)}
    covered |= {str(value) for value in san.get_values_for_type(x509.IPAddress)}
    missing = [name for name in names if str(_normalize(name)) not in covered]
    if missing:
        return f"it does not cover {', '.join(missing)}"
    return None


def _normalize(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def generated_names(settings: object) -> tuple[str, ...]:
    """Return the names a generated certificate must cover beyond the machine's own:
    every --hostname and every --sync-name (wildcards included)."""
    return tuple(dict.fromkeys([*settings.hostname, *getattr(settings, "sync_name", ())]))


def ensure_generated(tls_dir: Path, extra_names: tuple[str, ...] = ()) -> CertificatePaths:
    """Create the local CA and server certificate if needed, and return their paths."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = list(dict.fromkeys([*extra_names, *machine_names()]))
    loaded = _load_ca(tls_dir)
    ca, ca_key = loaded if loaded else _create_ca(tls_dir)
    reason = _server_needs_reissue(tls_dir, ca, names)
    if reason:
        log.info("issuing server certificate reason=%r", reason)
        _issue_server(tls_dir, ca, ca_key, names)
    return CertificatePaths(
        chain=tls_dir / "server.pem", key=tls_dir / "server-key.pem", source="generated",
        ca=tls_dir / "ca.pem",
    )


def trust_anchor_pem(paths: CertificatePaths) -> bytes:
    """Return the PEM clients must trust: the generated CA, or the top of the given chain."""
    if paths.ca is not None:
        return paths.ca.read_bytes()
    certificates = x509.load_pem_x509_certificates(paths.chain.read_bytes())
    return certificates[-1].public_bytes(serialization.Encoding.PEM)


def create_policy_context() -> ssl.SSLContext:
    """Build a server context with the front end's TLS policy and no certificate yet.

    TLS 1.2 and 1.3 only; for 1.2 only forward-secret AEAD suites; no compression and no
    renegotiation; ALPN offers http/1.1 alone.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    # Offering only http/1.1 is what keeps clients that prefer h2 (old OkHttp) on HTTP/1.1.
    context.set_alpn_protocols(["http/1.1"])
    return context


def create_server_context(paths: CertificatePaths) -> ssl.SSLContext:
    """Build the front end's TLS context with the policy above and the given pair loaded."""
    context = create_policy_context()
    try:
        context.load_cert_chain(paths.chain, paths.key)
    except FileNotFoundError as error:
        raise CertificateError(f"certificate file not found: {error.filename}") from None
    except ssl.SSLError as error:
        raise CertificateError(
            f"cannot load certificate {paths.chain} with key {paths.key}: {error.reason or error}."
            " Check that both are PEM and that the key belongs to the certificate."
        ) from None
    return context
