"""Prometheus metrics of the front end, served on their own plain-HTTP listener.

Label values come only from fixed sets written in this module (endpoint names of the sync
protocol, status codes, reasons chosen by the code), never from what a client sent: a path, a
user name or a host key in a label would leak secrets to whoever scrapes the metrics and would
let any client grow the metric set without bound.

Other modules count through the `Metrics` object they are given, for example
`metrics.refused_logins.labels(reason="throttled").inc()`. Values that another object already
holds (requests in flight, open connections, core restarts, certificate expiry) are read when the
metrics are scraped, through the callbacks given to `Metrics.watch`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("syncproxy.metrics")

METRICS_PATH = "/metrics"

# Every path of the sync protocol (anki 26.9): anything else is counted as "other".
SYNC_ENDPOINTS = frozenset(
    [f"/sync/{name}" for name in (
        "hostKey", "meta", "start", "applyGraves", "applyChanges", "chunk", "applyChunk",
        "sanityCheck2", "finish", "abort", "upload", "download")]
    + [f"/msync/{name}" for name in (
        "begin", "mediaChanges", "uploadChanges", "downloadFiles", "mediaSanity")]
)

# Sync requests range from a few milliseconds (meta) to minutes (a full upload on slow disks).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)


def endpoint_label(path: str, health_path: str) -> str:
    """Return the label for a request path: a sync endpoint, a health check, or "other"."""
    if path in SYNC_ENDPOINTS:
        return path
    if path == health_path:
        return "health"
    if path == "/health":
        return "core_health"
    return "other"


def status_label(status: int) -> str:
    """Return the status as a label; 0 (no response was sent) becomes "none"."""
    return str(status) if 100 <= status <= 599 else "none"


def certificate_days_left(chain: Path) -> float:
    """Return the days until the first certificate in a PEM file expires (negative if expired)."""
    certificate = x509.load_pem_x509_certificate(chain.read_bytes())
    remaining = certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return remaining.total_seconds() / 86400


class Metrics:
    """The front end's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "syncproxy_requests", "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"], registry=registry)
        self.body_bytes = Counter(
            "syncproxy_body_bytes", "Body bytes relayed; direction is received (from clients) "
            "or sent (to clients)", ["direction"], registry=registry)
        self.request_duration = Histogram(
            "syncproxy_request_duration_seconds", "Time from request head to end of response",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=registry)
        self.rejected_requests = Counter(
            "syncproxy_rejected_requests", "Requests the front end answered with an error "
            "before the upstream saw them, by reason", ["reason"], registry=registry)
        self.rejected_connections = Counter(
            "syncproxy_rejected_connections", "Connections closed without HTTP service, by "
            "reason", ["reason"], registry=registry)
        self.open_connections = Gauge(
            "syncproxy_open_connections", "Client connections open now", registry=registry)
        self._core_restarts = _CallbackCounter(
            "syncproxy_core_restarts", "Restarts of the bundled sync core")
        registry.register(self._core_restarts)
        self.refused_logins = Counter(
            "syncproxy_refused_logins", "Logins refused by the front end, by reason",
            ["reason"], registry=registry)
        self.active_syncs = Gauge(
            "syncproxy_active_syncs", "Sync sessions under way (started and not finished)",
            registry=registry)
        self.upstream_requests_in_flight = Gauge(
            "syncproxy_upstream_requests_in_flight", "Requests being forwarded to the "
            "upstream now", registry=registry)
        self.certificate_days_left = Gauge(
            "syncproxy_certificate_days_left", "Days until the served certificate expires",
            registry=registry)

    def watch(
        self,
        *,
        active_syncs: Callable[[], float] | None = None,
        in_flight: Callable[[], float] | None = None,
        open_connections: Callable[[], float] | None = None,
        core_restarts: Callable[[], float] | None = None,
        certificate: Callable[[], Path | None] | None = None,
    ) -> None:
        """Read these values from their owners each time the metrics are scraped."""
        if open_connections is not None:
            self.open_connections.set_function(open_connections)
        if core_restarts is not None:
            self._core_restarts.read = core_restarts
        if active_syncs is not None:
            self.active_syncs.set_function(active_syncs)
        if in_flight is not None:
            self.upstream_requests_in_flight.set_function(in_flight)
        if certificate is not None:
            self.certificate_days_left.set_function(lambda: _days_left_or_nan(certificate()))

    def observe_request(self, path: str, health_path: str, status: int, seconds: float,
                        bytes_in: int, bytes_out: int) -> None:
        endpoint = endpoint_label(path, health_path)
        self.requests.labels(endpoint=endpoint, status=status_label(status)).inc()
        self.request_duration.labels(endpoint=endpoint).observe(seconds)
        self.body_bytes.labels(direction="received").inc(bytes_in)
        self.body_bytes.labels(direction="sent").inc(bytes_out)

    def asgi_app(self) -> Any:
        """Return an ASGI app that serves the metrics at /metrics and 404 elsewhere."""
        metrics_app = make_asgi_app(self.registry)

        async def app(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return
            if scope["path"] == METRICS_PATH:
                await metrics_app(scope, receive, send)
                return
            body = b"Not found. Metrics are at /metrics.\n"
            await send({"type": "http.response.start", "status": 404, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return app


class _CallbackCounter(Collector):
    """A counter whose total is kept by another object and read at scrape time."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.read: Callable[[], float] = lambda: 0

    def collect(self) -> Any:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


def _days_left_or_nan(chain: Path | None) -> float:
    if chain is None:
        return float("nan")
    try:
        return certificate_days_left(chain)
    except (OSError, ValueError) as error:
        log.warning("certificate unreadable for metrics path=%s error=%r", chain, str(error))
        return float("nan")
