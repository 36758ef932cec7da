"""Settings for routing by server name, as a user meets them on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import syncproxy


def config_show(tmp_path: Path, *args: str):
    return syncproxy("config", "show", "--data-dir", str(tmp_path / "data"), *args, check=False)


def test_routing_settings_shown(tmp_path):
    shown = config_show(tmp_path, "--sync-name", "sync.test", "--sync-name", "*.sync.test",
                        "--passthrough", "127.0.0.1:8443", "--route", "mail.test=127.0.0.1:9443",
                        "--passthrough-proxy-protocol", "v2")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines()}
    assert lines["sync_name"] == "sync.test,*.sync.test"
    assert lines["passthrough"] == "127.0.0.1:8443"
    assert lines["route"] == "mail.test=127.0.0.1:9443"
    assert lines["passthrough_proxy_protocol"] == "v2"
    assert lines["no_sni"] == "terminate"


def test_routing_settings_from_environment(tmp_path):
    shown = syncproxy("config", "show", "--data-dir", str(tmp_path / "data"), check=False,
                      env={"SYNCPROXY_SYNC_NAME": "a.test,b.test",
                           "SYNCPROXY_PROXY_PROTOCOL_FROM": "10.0.0.0/8"})
    assert shown.returncode == 0, shown.stderr
    assert "a.test,b.test" in shown.stdout
    assert "10.0.0.0/8" in shown.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (("--passthrough", "127.0.0.1"), "passthrough '127.0.0.1' is not HOST:PORT"),
        (("--route", "www.test"), "route 'www.test' is not NAME=HOST:PORT"),
        (("--sync-name", "bad name"), "server name 'bad name' is not a DNS name"),
        (("--sync-name", "a.test", "--route", "a.test=127.0.0.1:1"), "'a.test' is given twice"),
        (("--no-sni", "passthrough"), "needs a passthrough route"),
        (("--proxy-protocol-from", "localhost"), "'localhost' is not an IP address or CIDR block"),
        (("--passthrough", "127.0.0.1:8443", "--no-tls"), "need TLS"),
    ],
)
def test_invalid_routing_settings_rejected(tmp_path, args, message):
    shown = config_show(tmp_path, *args)
    assert shown.returncode == 2
    assert message in shown.stderr
