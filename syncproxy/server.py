"""Wire the parts together and run until a signal stops syncproxy.

    settings -> data directory -> users -> sync core (or --upstream) -> proxy app -> listener

The users file is polled once a second; a change restarts the sync core when no sync is in
flight (see `gate`), so `syncproxy user ...` works on a running server.
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
from .core import CoreError, SyncCore
from .datadir import DataDir
from .gate import RequestGate
from .listener import Listener, hypercorn_config
from .metrics import Metrics
from .proxy import ProxyApp
from .acme import AcmeService
from .certreload import ReloadingCertificate
from .settings import passthrough_options, routing_table, trusted_proxy_networks
from .throttle import LoginThrottle
from .tls import CertificatePaths, ensure_generated, generated_names
from .users import User, UserError, UserStore

log = logging.getLogger("syncproxy")

USERS_POLL_SECONDS = 1.0


class BundledCore:
    """The sync core as the proxy's upstream, plus the users it was started with."""

    def __init__(self, core: SyncCore, store: UserStore, gate: RequestGate) -> None:
        self.core = core
        self.store = store
        self.gate = gate
        self.users: dict[str, User] = {}
        self.pending: frozenset[str] = frozenset()
        self._host_keys: frozenset[str] = frozenset()
        self._signature: Any = None
        self._reload_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return self.core.url

    def unavailable_reason(self) -> str | None:
        if not self.users and self.pending:
            # Only imported users, none logged in yet: no core runs, and every host key is
            # invalid, so clients get 403 and log in, which starts the core.
            return None
        if not self.users:
            return ("no users yet. Add one on the server with 'syncproxy user add NAME'; "
                    "it takes effect without a restart.")
        if not self.core.ready:
            return "the sync core is starting or restarting."
        return None

    def valid_host_keys(self) -> frozenset[str]:
        return self._host_keys

    def upstream_failed(self, path: str, error: Exception) -> None:
        """Check the core at once when a sync request lost its connection to it."""
        self.core.suspect(f"{type(error).__name__} on {path}")

    def _load(self) -> dict[str, User]:
        self._signature = self.store.signature()
        self.pending = frozenset(self.store.load_pending())
        return self.store.load()

    async def start(self) -> None:
        self.users = self._load()
        self._host_keys = frozenset(user.host_key for user in self.users.values())
        if self.users:
            await self.core.start(list(self.users.values()))
        else:
            log.warning("no users yet; add one with: syncproxy user add NAME "
                        "(the running server picks it up)")

    async def watch_users(self) -> None:
        """Apply changes to the users file while running."""
        while True:
            await asyncio.sleep(USERS_POLL_SECONDS)
            await self.refresh()

    async def refresh(self) -> None:
        """Apply the users file if it changed; also run before each login.

        Without the call at login, a user who logs in right after 'syncproxy user add' could
        be rejected for up to one poll interval.
        """
        if self.store.signature() != self._signature:
            await self.reload_users()

    async def reload_users(self) -> None:
        """Read the users file and restart the core if its users changed."""
        async with self._reload_lock:
            try:
                users = self._load()
            except UserError as error:
                log.error("users file unreadable, keeping the current users error=%r",
                          str(error))
                return
            if users != self.users:
                await self._apply(users)

    def has_pending_users(self) -> bool:
        return bool(self.pending)

    async def upgrade_legacy_login(self, name: str, password: str) -> bool | None:
        """Check a pending user's password (imported or revoked); on a match store a new PHC hash.

        Return None if `name` is not waiting for a first login, else whether the password
        matched. After a match the sync core knows the user when this returns.
        """
        if name not in self.pending:
            return None
        user = await asyncio.to_thread(self.store.upgrade_pending, name, password)
        if user is None:
            log.info("pending login rejected user=%s", name)
            return False
        log.info("pending login accepted, password re-hashed user=%s", name)
        await self.reload_users()
        return True

    async def _apply(self, users: dict[str, User]) -> None:
        added = sorted(set(users) - set(self.users))
        removed = sorted(set(self.users) - set(users))
        changed = sorted(name for name in set(users) & set(self.users)
                         if users[name] != self.users[name])
        log.info("users changed added=%s removed=%s changed=%s", ",".join(added) or "-",
                 ",".join(removed) or "-", ",".join(changed) or "-")
        # Old host keys stop working at once; the core catches up when the restart is done.
        self._host_keys = frozenset(user.host_key for user in users.values())
        async with self.gate.exclusive("users changed"):
            self.users = users
            try:
                if users:
                    await self.core.restart(list(users.values()))
                else:
                    await self.core.stop()
            except (CoreError, OSError) as error:
                log.error("sync core restart after user change failed error=%r", str(error))

    async def stop(self) -> None:
        await self.core.stop()


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

    gate = RequestGate()
    if settings.upstream:
        upstream: BundledCore | ExternalUpstream = ExternalUpstream(settings.upstream)
        log.info("forwarding to an existing sync server upstream=%s", upstream.url)
    else:
        core = SyncCore(data_dir.collections, settings.max_body_mb, settings.core_port,
                        settings.core_stop_timeout, pid_file=data_dir.root / "core.pid",
                        probe_interval=settings.core_probe_interval)
        store = UserStore(data_dir.users_file)
        seed_users(store, list(seed))
        upstream = BundledCore(core, store, gate)
    if seed and settings.upstream:
        log.warning("users declared in the environment are ignored with --upstream, because "
                    "the upstream checks passwords itself")
    control = ControlServer(data_dir.control_socket, gate)
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
            upstream, gate, upstream,
            legacy_logins=upstream if isinstance(upstream, BundledCore) else None,
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
        metrics_listener = start_metrics(settings, metrics, upstream, gate, listener, tls)

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


def start_metrics(settings: Any, metrics: Metrics, upstream: Any, gate: RequestGate,
                  listener: Listener, tls: ReloadingCertificate | None) -> Listener | None:
    """Start the plain-HTTP Prometheus listener, unless metrics_port is 0."""
    core = upstream.core if isinstance(upstream, BundledCore) else None
    metrics.watch(
        active_syncs=gate.open_sessions,
        in_flight=lambda: gate.active,
        open_connections=lambda: len(listener.connections),
        core_restarts=(lambda: core.restarts) if core is not None else None,
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
