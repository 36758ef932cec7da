"""Wire the parts together and run until a signal stops syncproxy.

    settings -> data directory -> users -> sync cores (or --upstream) -> proxy app -> listener

The users file is polled once a second; a change restarts the sync core that serves the user
when none of its syncs is in flight (see `corepool` and `gate`), so `syncproxy user ...` works
on a running server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compat import SeedUser, seed_users
from .control import ControlServer
from .corepool import BundledCore, core_pid_file
from .cores import CoreAssignment, resolve_core_count
from .core import SyncCore
from .datadir import DataDir
from .gate import GateGroup
from .listener import Listener, hypercorn_config
from .metrics import Metrics
from .proxy import ProxyApp
from .acme import AcmeService
from .certreload import ReloadingCertificate
from .settings import passthrough_options, routing_table, trusted_proxy_networks
from .throttle import LoginThrottle
from .tls import CertificatePaths, ensure_generated, generated_names
from .users import UserStore

log = logging.getLogger("syncproxy")


class ExternalUpstream:
    """An existing sync server given with --upstream; it checks host keys itself."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def unavailable_reason(self) -> str | None:
        return None

    def valid_host_keys(self) -> None:
        return None

    def upstream_failed(self, path: str, error: Exception) -> None:
        pass


def make_cores(settings: Any, data_dir: DataDir, count: int) -> list[SyncCore]:
    """Create the sync cores; all share the collections folder as their SYNC_BASE."""
    cores = []
    for index in range(count):
        port = settings.core_port + index if settings.core_port else 0
        cores.append(SyncCore(data_dir.collections, settings.max_body_mb, port,
                              settings.core_stop_timeout,
                              pid_file=core_pid_file(data_dir.root, index),
                              probe_interval=settings.core_probe_interval,
                              index=index if count > 1 else None))
    return cores


def prepare_tls(settings: Any, data_dir: DataDir) -> ReloadingCertificate | None:
    if not settings.tls:
        log.warning("tls disabled: serving plain http; only run this behind another TLS "
                    "terminator, because passwords and host keys cross the network in clear")
        return None
    if settings.cert:
        paths = CertificatePaths(chain=Path(settings.cert), key=Path(settings.key),
                                 source="files")
    else:
        # With --domain this serves until the ACME certificate arrives.
        paths = ensure_generated(data_dir.tls_dir, generated_names(settings))
    return ReloadingCertificate(paths.chain, paths.key, paths.source, data_dir.tls_dir)


def describe_trust(tls: ReloadingCertificate | None, settings: Any) -> None:
    if tls is None or settings.domain:
        return
    if tls.source == "generated":
        log.info("clients must trust the local CA ca=%s; print it with 'syncproxy cert pem' "
                 "(AnkiDroid: Settings > Sync > Custom sync server > Custom root certificate (PEM))",
                 tls.cert_path.parent / "ca.pem")
    else:
        log.info("serving certificate cert=%s key=%s", settings.cert, settings.key)


async def run(settings: Any, seed: Sequence[SeedUser] = ()) -> int:
    """Serve until SIGINT or SIGTERM; return the process exit status.

    `seed` contains the users declared with the sync core's or ankisyncd's environment variables.
    """
    data_dir = DataDir.from_settings(settings)
    data_dir.prepare()
    log.info("data directory %s", " ".join(f"{name}={path}"
                                          for name, path in data_dir.describe().items()))
    tls = prepare_tls(settings, data_dir)
    describe_trust(tls, settings)

    core_count = 1 if settings.upstream else resolve_core_count(settings.cores)
    gates = GateGroup(core_count)
    if settings.upstream:
        upstream: BundledCore | ExternalUpstream = ExternalUpstream(settings.upstream)
        log.info("forwarding to an existing sync server upstream=%s", upstream.url)
    else:
        store = UserStore(data_dir.users_file)
        seed_users(store, list(seed))
        upstream = BundledCore(make_cores(settings, data_dir, core_count), store, gates,
                               CoreAssignment(data_dir.cores_file, store.lock_path))
        if core_count > 1:
            log.info("running several sync cores cores=%d collections=%s", core_count,
                     data_dir.collections)
    if seed and settings.upstream:
        log.warning("users declared in the environment are ignored with --upstream, because "
                    "the upstream checks passwords itself")
    control = ControlServer(data_dir.control_socket, gates)
    await control.start()

    metrics = Metrics()
    listener: Listener | None = None
    acme: AcmeService | None = None
    metrics_listener: Listener | None = None
    app: ProxyApp | None = None
    tasks: list[asyncio.Task] = []
    try:
        if isinstance(upstream, BundledCore):
            await upstream.start()
            tasks.append(asyncio.create_task(upstream.watch_users(), name="users"))

        def health() -> tuple[bool, str]:
            if listener is None or not listener.accepting:
                return False, "unavailable: the front end is not accepting connections"
            reason = upstream.unavailable_reason()
            if reason is None or (isinstance(upstream, BundledCore) and not upstream.users):
                return True, "ok" if reason is None else "ok, " + reason
            return False, "unavailable: " + reason

        scheme = "https" if tls else "http"
        app = ProxyApp(
            upstream, gates[0], upstream,
            legacy_logins=upstream if isinstance(upstream, BundledCore) else None,
            router=upstream if core_count > 1 else None,
            max_body_bytes=settings.max_body_mb * 1024 * 1024,
            connect_timeout=settings.upstream_connect_timeout,
            idle_timeout=settings.upstream_idle_timeout,
            health_path=settings.health_path,
            path_prefix=settings.path_prefix,
            scheme=scheme,
            health=health,
            client_idle_timeout=settings.client_idle_timeout,
            metrics=metrics,
            login_throttle=LoginThrottle(settings.login_max_failures,
                                         settings.login_block_seconds),
        )
        if tls:
            tasks.append(asyncio.create_task(tls.watch(), name="certificate"))
        listener = Listener(app, settings.host, settings.port, tls.current if tls else None,
                            hypercorn_config(settings.keep_alive_timeout,
                                             settings.max_head_kb * 1024,
                                             settings.request_head_timeout),
                            routing=routing_table(settings),
                            passthrough=passthrough_options(settings),
                            trusted_proxies=trusted_proxy_networks(settings),
                            max_connections=settings.max_connections,
                            write_idle_timeout=settings.client_idle_timeout,
                            metrics=metrics)
        await app.transports.load_on_first_use_modules()
        listener.open()
        listener.start()
        log.info("listening url=%s://%s:%d/ http=1.1-only", scheme, settings.host,
                 listener.bound_port)
        write_listening_record(data_dir, settings, listener.bound_port)
        if listener.routing is not None and listener.routing.splices:
            log.info("routing by server name sync_names=%s routes=%s passthrough=%s no_sni=%s "
                     "proxy_protocol=%s", ",".join(settings.sync_name) or "-",
                     ",".join(settings.route) or "-", settings.passthrough or "-",
                     settings.no_sni, settings.passthrough_proxy_protocol)
        if tls and settings.domain:
            acme = AcmeService(settings, data_dir.acme_dir, tls, listener.bound_port)
            acme.start()
        metrics_listener = start_metrics(settings, metrics, upstream, gates, listener, tls)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if tls:
            tls.install_sighup(loop)
        await stop.wait()
        log.info("stopping: finishing requests in flight grace_s=%g", settings.shutdown_grace)
    finally:
        await control.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if acme is not None:
            await acme.close(1.0)
        if metrics_listener is not None:
            await metrics_listener.close(0)
        if listener is not None:
            await listener.close(settings.shutdown_grace)
        if app is not None:
            await app.aclose()
        if isinstance(upstream, BundledCore):
            await upstream.stop()
        if listener is not None:
            # A stale record would point `syncproxy health` at whatever listens there next.
            with contextlib.suppress(OSError):
                data_dir.listening_file.unlink()
    log.info("stopped")
    return 0


def write_listening_record(data_dir: DataDir, settings: Any, port: int) -> None:
    """Record where this server listens, so that `syncproxy health` run without the server's
    flags (a container HEALTHCHECK after `docker run IMAGE --port 444`) checks the right port."""
    record = {"host": settings.host, "port": port, "tls": bool(settings.tls),
              "health_path": settings.health_path}
    partial = data_dir.listening_file.with_suffix(".tmp")
    try:
        partial.write_text(json.dumps(record) + "\n")
        os.replace(partial, data_dir.listening_file)
    except OSError as error:
        log.warning("cannot record the listening address for 'syncproxy health' path=%s "
                    "error=%r", data_dir.listening_file, str(error))


def start_metrics(settings: Any, metrics: Metrics, upstream: Any, gates: GateGroup,
                  listener: Listener, tls: ReloadingCertificate | None) -> Listener | None:
    """Start the plain-HTTP Prometheus listener, unless metrics_port is 0."""
    bundled = upstream if isinstance(upstream, BundledCore) else None
    metrics.watch(
        active_syncs=gates.open_sessions,
        in_flight=lambda: gates.active,
        open_connections=lambda: len(listener.connections),
        core_restarts=(lambda: bundled.restarts) if bundled is not None else None,
        certificate=(lambda: tls.cert_path) if tls is not None else None,
    )
    if not settings.metrics_port:
        return None
    metrics_listener = Listener(metrics.asgi_app(), settings.metrics_host, settings.metrics_port,
                                None, hypercorn_config(settings.keep_alive_timeout,
                                                       request_head_timeout=10.0),
                                max_connections=64)
    metrics_listener.open()
    metrics_listener.start()
    log.info("metrics listening url=http://%s:%d/metrics", settings.metrics_host,
             metrics_listener.bound_port)
    return metrics_listener
