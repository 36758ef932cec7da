"""Routing by server name: exact names, wildcards, passthrough, no SNI."""

from __future__ import annotations

import pytest

from syncproxy.routing import TERMINATE, Route, RoutingTable, parse_host_port, parse_route

WEB = Route("127.0.0.1", 8443)
MAIL = Route("127.0.0.1", 9443)


def table(**overrides):
    options = dict(
        sync_names=["sync.test", "*.sync.test"],
        routes=[parse_route("mail.test=127.0.0.1:9443")],
        passthrough=WEB,
    )
    options.update(overrides)
    return RoutingTable.build(**options)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sync.test", TERMINATE),
        ("SYNC.TEST.", TERMINATE),
        ("a.sync.test", TERMINATE),
        ("a.b.sync.test", WEB),  # a wildcard covers one label, like a certificate
        ("mail.test", MAIL),
        ("www.test", WEB),
        ("xsync.test", WEB),
    ],
)
def test_decides_by_name(name, expected):
    assert table().decide(name) == expected


def test_no_sni_terminates_by_default():
    assert table().decide(None) == TERMINATE


def test_no_sni_can_pass_through():
    assert table(no_sni="passthrough").decide(None) == WEB


def test_no_sni_passthrough_needs_route():
    with pytest.raises(ValueError, match="needs a passthrough route"):
        table(no_sni="passthrough", passthrough=None)


def test_unmatched_without_passthrough_terminates():
    assert table(passthrough=None).decide("www.test") == TERMINATE


def test_exact_route_beats_wildcard_sync_name():
    routes = [parse_route("legacy.sync.test=127.0.0.1:9443")]
    assert table(routes=routes).decide("legacy.sync.test") == MAIL


def test_name_given_twice_is_rejected():
    with pytest.raises(ValueError, match="given twice"):
        table(routes=[parse_route("SYNC.test=127.0.0.1:9443")])


def test_splices_only_with_a_route():
    assert table().splices
    assert not RoutingTable.build(sync_names=["sync.test"]).splices


@pytest.mark.parametrize(
    "value,expected",
    [
        ("127.0.0.1:8443", Route("127.0.0.1", 8443)),
        ("[::1]:8443", Route("::1", 8443)),
        ("localhost:443", Route("localhost", 443)),
    ],
)
def test_parses_host_port(value, expected):
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", "::1:443", "[x]:443", "h:0", "h:65536", "h:http", ":443"])
def test_rejects_bad_host_port(value):
    with pytest.raises(ValueError, match="route"):
        parse_host_port(value)


@pytest.mark.parametrize("value", ["www.test", "x=", "*.test=127.0.0.1:1", "bad name=127.0.0.1:1"])
def test_rejects_bad_route(value):
    with pytest.raises(ValueError):
        parse_route(value)
