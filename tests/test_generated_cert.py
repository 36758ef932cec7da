"""The generated certificate: names it covers, the chain it serves, and reuse across runs."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from cryptography import x509

from support import syncproxy


def server_names(data_dir: Path) -> tuple[set[str], set[str]]:
    chain = x509.load_pem_x509_certificates((data_dir / "tls" / "server.pem").read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_covers_machine_and_given_names(tmp_path: Path) -> None:
    syncproxy("cert", "pem", "--data-dir", str(tmp_path), "--hostname", "anki.example.org",
              "--hostname", "192.0.2.10", "--sync-name", "*.sync.example.org")
    dns, ips = server_names(tmp_path)
    assert "localhost" in dns
    assert socket.gethostname() in dns
    assert "anki.example.org" in dns
    assert "*.sync.example.org" in dns
    assert {"127.0.0.1", "::1", "192.0.2.10"} <= ips
    assert all(ipaddress.ip_address(ip) for ip in ips)


def test_chain_ends_in_printed_ca(tmp_path: Path) -> None:
    printed = syncproxy("cert", "pem", "--data-dir", str(tmp_path)).stdout
    chain = x509.load_pem_x509_certificates((tmp_path / "tls" / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate(printed.encode())
    assert len(chain) == 2
    assert chain[1] == ca
    assert chain[0].issuer == ca.subject
    chain[0].verify_directly_issued_by(ca)


def test_reused_and_reissued_for_new_name(tmp_path: Path) -> None:
    first = syncproxy("cert", "pem", "--data-dir", str(tmp_path)).stdout
    server_before = (tmp_path / "tls" / "server.pem").read_bytes()
    assert syncproxy("cert", "pem", "--data-dir", str(tmp_path)).stdout == first
    assert (tmp_path / "tls" / "server.pem").read_bytes() == server_before

    # A new name gets a new server certificate from the same CA, so clients keep trusting it.
    again = syncproxy("cert", "pem", "--data-dir", str(tmp_path), "--hostname", "new.example.org")
    assert again.stdout == first
    assert (tmp_path / "tls" / "server.pem").read_bytes() != server_before
    assert "new.example.org" in server_names(tmp_path)[0]
