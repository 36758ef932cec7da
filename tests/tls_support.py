"""Helpers for tests that look at the front end from a TLS client's side."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Optional

import trustme
from cryptography import x509


def write_pair(cert: trustme.LeafCert, directory: Path, stem: str = "server") -> tuple[Path, Path]:
    """Write a trustme leaf as a full-chain PEM and a key file; return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    key_path.chmod(0o600)
    return cert_path, key_path


def replace_by_rename(src: Path, dest: Path) -> None:
    """Move a file over another the way certbot and editors do: new inode, atomic."""
    tmp = dest.with_name(dest.name + ".new")
    tmp.write_bytes(src.read_bytes())
    tmp.replace(dest)


def client_context(
    cafile: Optional[Path] = None,
    *,
    version: Optional[ssl.TLSVersion] = None,
    alpn: Optional[list[str]] = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(str(cafile))
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS 1.0/1.1 at its default security level, so
            # without this the client, not the server, would end the handshake.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def handshake(
    port: int,
    context: ssl.SSLContext,
    server_name: Optional[str] = "localhost",
    host: str = "127.0.0.1",
) -> tuple[x509.Certificate, str, Optional[str], str]:
    """Complete one handshake; return (leaf, TLS version, ALPN protocol, cipher)."""
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            return (
                x509.load_der_x509_certificate(der),
                tls.version(),
                tls.selected_alpn_protocol(),
                tls.cipher()[0],
            )


def served_serial(port: int, server_name: Optional[str] = "localhost") -> int:
    leaf, _, _, _ = handshake(port, client_context(), server_name)
    return leaf.serial_number
