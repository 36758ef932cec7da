"""Run Debian's nginx on loopback as the web server behind the front end.

nginx serves ``www.test`` with its own certificate and HTTP/2 on a listener
that requires a PROXY protocol header, the setup the docs recommend for
sharing port 443. It runs in the foreground (``daemon off``) from a private
prefix directory and is stopped by the PID of the process started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ACCESS_LOG_FIELDS = (
    "proxy_protocol_addr",
    "proxy_protocol_port",
    "remote_addr",
    "server_protocol",
    "ssl_server_name",
    "status",
    "body_bytes_sent",
)

CONFIG = """\
{user_line}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    log_format fields '{log_format}';
    access_log {prefix}/access.log fields;
    client_body_temp_path {prefix}/temp/client;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    default_type application/octet-stream;
    sendfile on;

    server {{
        listen 127.0.0.1:{port} ssl http2 proxy_protocol;
        server_name www.test;
        ssl_certificate {prefix}/www.test.pem;
        ssl_certificate_key {prefix}/www.test.key;
        set_real_ip_from 127.0.0.1;
        real_ip_header proxy_protocol;
        root {prefix}/html;
    }}
}}
"""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class AccessLogEntry:
    proxy_protocol_addr: str
    proxy_protocol_port: str
    remote_addr: str
    server_protocol: str
    ssl_server_name: str
    status: str
    body_bytes_sent: str


class Nginx:
    """One nginx master process with its prefix directory and certificate.

    ``ca`` is the trustme CA that signs www.test; clients verify with
    ``ca_file``. Files placed in ``html`` are served at ``/``.
    """

    def __init__(self, ca: trustme.CA) -> None:
        # A directory of its own, world-readable, because the workers run as
        # an unprivileged user when the tests run as root and must read html/.
        self.prefix = Path(tempfile.mkdtemp(prefix="syncproxy-nginx-"))
        self.prefix.chmod(0o755)
        self.html = self.prefix / "html"
        self.html.mkdir(mode=0o755)
        (self.prefix / "temp").mkdir()
        self.port = free_port()
        self.ca_file = self.prefix / "ca.pem"
        self.process: subprocess.Popen | None = None

        ca.cert_pem.write_to_path(str(self.ca_file))
        certificate = ca.issue_cert("www.test")
        certificate.private_key_pem.write_to_path(str(self.prefix / "www.test.key"))
        (self.prefix / "www.test.key").chmod(0o600)
        certificate.cert_chain_pems[0].write_to_path(str(self.prefix / "www.test.pem"))

        user_line = "user nobody nogroup;" if os.geteuid() == 0 else ""
        log_format = "\\t".join(f"${field}" for field in ACCESS_LOG_FIELDS)
        config = CONFIG.format(user_line=user_line, prefix=self.prefix, port=self.port, log_format=log_format)
        (self.prefix / "nginx.conf").write_text(config)

    def add_file(self, name: str, content: bytes) -> Path:
        path = self.html / name
        path.write_bytes(content)
        path.chmod(0o644)
        return path

    def start(self, timeout: float = 10.0) -> None:
        command = [NGINX, "-e", str(self.prefix / "error.log"), "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish and exit with the master
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process.stderr.close()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def access_log(self) -> list[AccessLogEntry]:
        path = self.prefix / "access.log"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [AccessLogEntry(*line.split("\t")) for line in lines if line]

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
