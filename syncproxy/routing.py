"""Decide from a TLS server name whether the front end terminates or splices.

The rules, applied in this order:

1. A name equal to a ``--sync-name`` is terminated here, one equal to a
   ``--route`` name goes to that route.
2. Otherwise a wildcard decides. ``*.example.com`` matches exactly one more
   label (``a.example.com``, not ``example.com`` and
   not ``a.b.example.com``), the same rule a ``*.example.com`` certificate
   follows, so a terminated name is always one the certificate can cover.
3. Otherwise the ``--passthrough`` route, if set, and else termination.

A connection without SNI is terminated unless ``no_sni`` is
``passthrough``. Names compare case-insensitively without a trailing dot.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Union

__all__ = [
    "TERMINATE",
    "NoSniAction",
    "Route",
    "RoutingTable",
    "Terminate",
    "parse_host_port",
    "parse_name_pattern",
    "parse_route",
]

NoSniAction = Literal["terminate", "passthrough"]
NO_SNI_ACTIONS: tuple[NoSniAction, ...] = ("terminate", "passthrough")

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Route:
    """A TCP destination for spliced connections."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Terminate:
    """The front end serves the connection itself."""

    def __str__(self) -> str:
        return "terminate"


TERMINATE = Terminate()
Decision = Union[Terminate, Route]


def parse_host_port(value: str, *, what: str = "route") -> Route:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``, raising ValueError that names ``value``."""
    host, separator, port_text = value.strip().rpartition(":")
    if not separator or not host or not port_text:
        raise ValueError(f"{what} {value!r} is not HOST:PORT (for example 127.0.0.1:8443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {value!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{what} {value!r}: write an IPv6 address in brackets, as [{host}]:{port_text}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {value!r}: port {port_text!r} is not a number from 1 to 65535")
    return Route(host, int(port_text))


def parse_name_pattern(value: str) -> str:
    """Normalize a server name or ``*.suffix`` wildcard, raising ValueError if invalid."""
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise ValueError(f"server name pattern {value!r}: a wildcard needs at least two labels after '*.'")
    if not labels or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"server name {value!r} is not a DNS name or a '*.example.com' wildcard")
    return name


def parse_route(value: str) -> tuple[str, Route]:
    """Parse ``NAME=HOST:PORT`` as given to ``--route``."""
    name, separator, destination = value.partition("=")
    if not separator:
        raise ValueError(f"route {value!r} is not NAME=HOST:PORT (for example www.example.com=127.0.0.1:8443)")
    return parse_name_pattern(name), parse_host_port(destination, what=f"route {value!r}")


@dataclass(frozen=True)
class RoutingTable:
    """The name rules above, built once from the settings."""

    exact: dict[str, Decision] = field(default_factory=dict)
    wildcards: dict[str, Decision] = field(default_factory=dict)
    passthrough: Route | None = None
    no_sni: NoSniAction = "terminate"

    @classmethod
    def build(
        cls,
        sync_names: Iterable[str] = (),
        routes: Iterable[tuple[str, Route]] = (),
        passthrough: Route | None = None,
        no_sni: NoSniAction = "terminate",
    ) -> RoutingTable:
        """Build the table, raising ValueError on a name given twice or a bad ``no_sni``."""
        if no_sni not in NO_SNI_ACTIONS:
            raise ValueError(f"no-SNI action {no_sni!r} is not one of: {', '.join(NO_SNI_ACTIONS)}")
        if no_sni == "passthrough" and passthrough is None:
            raise ValueError("no-SNI action 'passthrough' needs a passthrough route (HOST:PORT)")

        exact: dict[str, Decision] = {}
        wildcards: dict[str, Decision] = {}
        entries: list[tuple[str, Decision]] = [(parse_name_pattern(n), TERMINATE) for n in sync_names]
        entries += [(parse_name_pattern(n), route) for n, route in routes]
        for pattern, decision in entries:
            table, key = (wildcards, pattern[2:]) if pattern.startswith("*.") else (exact, pattern)
            if key in table:
                raise ValueError(f"server name {pattern!r} is given twice (as {table[key]} and as {decision})")
            table[key] = decision
        return cls(exact, wildcards, passthrough, no_sni)

    @property
    def splices(self) -> bool:
        """True if any connection may be spliced, so the ClientHello must be read first."""
        routes = [*self.exact.values(), *self.wildcards.values(), self.passthrough]
        return any(isinstance(decision, Route) for decision in routes)

    def decide(self, server_name: str | None) -> Decision:
        """Return where a connection with this SNI name (or None) goes."""
        if server_name is None:
            if self.no_sni == "passthrough" and self.passthrough is not None:
                return self.passthrough
            return TERMINATE

        name = server_name.lower().rstrip(".")
        if name in self.exact:
            return self.exact[name]
        _first, dot, parent = name.partition(".")
        if dot and parent in self.wildcards:
            return self.wildcards[parent]
        return self.passthrough if self.passthrough is not None else TERMINATE
