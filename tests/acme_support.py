"""A real ACME CA on loopback for tests: Debian's pebble plus pebble-challtestsrv.

pebble validates HTTP-01 challenges for real: it resolves the name through
challtestsrv (which answers every A query with 127.0.0.1 and no AAAA record)
and fetches ``http://NAME:<http_port>/.well-known/acme-challenge/TOKEN``, so
the port given as ``http_port`` must be syncproxy's own plain-HTTP listener.
Every listener here binds 127.0.0.1; challtestsrv's management port, whose
default is all interfaces, is pinned to loopback too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import trustme

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"
START_TIMEOUT = 15.0


def pebble_available() -> bool:
    return os.access(PEBBLE, os.X_OK) and os.access(CHALLTESTSRV, os.X_OK)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Pebble:
    directory_url: str
    management_url: str
    # CA that signed pebble's own HTTPS certificate: what certbot needs to
    # reach the directory, not the CA that signs issued certificates.
    https_ca_file: Path
    http_port: int
    log_file: Path

    def issuing_roots_pem(self) -> str:
        """Fetch the root that signs issued certificates (new on every pebble start)."""
        response = httpx.get(
            f"{self.management_url}/roots/0", verify=ssl.create_default_context(cafile=str(self.https_ca_file)), trust_env=False
        )
        response.raise_for_status()
        return response.text

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")


def _wait_for_tcp(port: int, process: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def run_pebble(workdir: Path, http_port: int) -> Iterator[Pebble]:
    """Start challtestsrv and pebble on free loopback ports; stop both on exit.

    ``http_port`` is where pebble sends HTTP-01 validation requests.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    dns_port = free_udp_port()
    challtest_mgmt_port = free_port()
    acme_port = free_port()
    mgmt_port = free_port()
    # pebble needs a TLS-ALPN-01 port in its config even though nothing here
    # uses that challenge; an unused loopback port keeps it from any default.
    tls_alpn_port = free_port()

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file = workdir / "pebble-https-cert.pem"
    key_file = workdir / "pebble-https-key.pem"
    ca_file = workdir / "pebble-https-ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    server_cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))

    config_file = workdir / "pebble-config.json"
    config_file.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(cert_file),
        "privateKey": str(key_file),
        "httpPort": http_port,
        "tlsPort": tls_alpn_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }}))

    env = dict(os.environ)
    env.pop("PEBBLE_VA_ALWAYS_VALID", None)
    env["PEBBLE_VA_NOSLEEP"] = "1"
    # Renewal tests must see a new order each time, not a reused authorization.
    env["PEBBLE_AUTHZREUSE"] = "0"

    challtest_log = workdir / "challtestsrv.log"
    pebble_log = workdir / "pebble.log"
    with open(challtest_log, "wb") as out:
        challtest = subprocess.Popen(
            [CHALLTESTSRV,
             "-dns01", f"127.0.0.1:{dns_port}",
             "-management", f"127.0.0.1:{challtest_mgmt_port}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-http01", "", "-https01", "", "-tlsalpn01", ""],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    pebble = None
    try:
        _wait_for_tcp(challtest_mgmt_port, challtest, "pebble-challtestsrv", challtest_log)
        with open(pebble_log, "wb") as out:
            pebble = subprocess.Popen(
                [PEBBLE, "-config", str(config_file), "-dnsserver", f"127.0.0.1:{dns_port}"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            )
        _wait_for_tcp(acme_port, pebble, "pebble", pebble_log)
        yield Pebble(
            directory_url=f"https://127.0.0.1:{acme_port}/dir",
            management_url=f"https://127.0.0.1:{mgmt_port}",
            https_ca_file=ca_file,
            http_port=http_port,
            log_file=pebble_log,
        )
    finally:
        if pebble is not None:
            _stop(pebble)
        _stop(challtest)
