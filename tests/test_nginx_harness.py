"""The nginx test harness itself: HTTP/2, its certificate, PROXY protocol logging."""

from __future__ import annotations

import os
import subprocess

import pytest
import trustme

from nginx_server import NGINX, Nginx

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (apt-get install nginx)")


def test_nginx_speaks_http2_and_logs_proxy_address():
    with Nginx(trustme.CA()) as nginx:
        nginx.add_file("hello.txt", b"hello from nginx\n")
        completed = subprocess.run(
            [
                "curl", "--silent", "--show-error", "--http2", "--haproxy-protocol",
                "--interface", "127.0.0.5",
                "--cacert", str(nginx.ca_file),
                "--resolve", f"www.test:{nginx.port}:127.0.0.1",
                "--write-out", "\n%{http_version} %{local_port}",
                f"https://www.test:{nginx.port}/hello.txt",
            ],
            capture_output=True, text=True, timeout=20,
        )
        assert completed.returncode == 0, completed.stderr
        body, _, summary = completed.stdout.rpartition("\n")
        http_version, local_port = summary.split()
        assert body == "hello from nginx\n"
        assert http_version == "2"

        [entry] = nginx.access_log()
        assert entry.proxy_protocol_addr == "127.0.0.5"
        assert entry.proxy_protocol_port == local_port
        assert entry.remote_addr == "127.0.0.5"
        assert entry.server_protocol == "HTTP/2.0"
        assert entry.ssl_server_name == "www.test"
