"""Run and supervise the bundled sync core (`python -m anki.syncserver`).

The core listens on 127.0.0.1 only, on a free port, with its data under the data directory's
`collections/`. Users reach it as `SYNC_USERn=name:phc` with `PASSWORDS_HASHED` set, so the
plaintext passwords never exist outside the login request itself.

Facts about the core that shape this module (anki 26.9):
- SIGINT stops it gracefully; SIGTERM and SIGHUP kill it at once. After SIGINT the Python wrapper
  still exits non-zero, so the exit status does not show whether the stop was clean.
- It exits at once with no users. It locks each user's databases, not SYNC_BASE: cores with
  different users share one SYNC_BASE, but a core given a user that another running core
  serves fails to start with "Locked".
- `GET /health` returns 200 once it accepts requests.
- A panic while it holds its single lock (a malformed password hash at login is one cause)
  poisons that lock: from then on every /sync and /msync request drops its connection while
  `/health` still returns 200. The probe below detects that state and restarts the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from . import pidfile
from .users import User, check_phc, validate_name

log = logging.getLogger("syncproxy.core")
core_output = logging.getLogger("syncproxy.core.output")

READY_TIMEOUT = 60.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# A core that has run this long is considered healthy again, so its backoff starts over.
STABLE_AFTER = 60.0

# The wedge probe: a request that takes the core's lock and is refused at once (no such host
# key), so a healthy core returns 403 within about a millisecond.
PROBE_PATH = "/sync/meta"
PROBE_HOST_KEY = "syncproxy-probe"  # not hex, so never a real host key
# Sent as the probe's client address, which no real client has, so that the core's log lines
# about probes can be recognized and logged at debug level only.
PROBE_CLIENT_ADDRESS = "0.0.0.0"
PROBE_TIMEOUT = 30.0  # a full upload holds the lock this long at most on slow disks (estimate)
# A dropped probe is retried once after this pause before the core is called wedged.
PROBE_CONFIRM_DELAY = 0.5
PANIC_MARKER = "panicked at"
HOST_KEY_IN_QUERY = re.compile(r"([?&](?:k|sk)=)[^&\s\"]*")


class CoreError(RuntimeError):
    """The sync core could not be started."""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def core_environment(
    users: Sequence[User], base: Path, port: int, max_payload_mb: int
) -> dict[str, str]:
    """Return the environment the sync core is started with."""
    environment = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("SYNC_", "SYNCPROXY_", "MAX_SYNC_", "PASSWORDS_HASHED"))
    }
    environment.update({
        "SYNC_HOST": "127.0.0.1",
        "SYNC_PORT": str(port),
        "SYNC_BASE": str(base),
        "PASSWORDS_HASHED": "1",
        # The front end replaces X-Forwarded-For with the client's address on every request, so
        # the rightmost entry is the real client.
        "SYNC_IP_HEADER": "RightmostXForwardedFor",
        "MAX_SYNC_PAYLOAD_MEGS": str(max_payload_mb),
        "NO_COLOR": "1",
        "RUST_LOG": os.environ.get("RUST_LOG", "anki=info"),
        "PYTHONUNBUFFERED": "1",
    })
    # Every user reaches the core through here, so these checks cannot be bypassed: a name with
    # ':' or a hash the core cannot parse would panic the core at the first login.
    for number, user in enumerate(sorted(users, key=lambda user: user.name), start=1):
        validate_name(user.name)
        check_phc(user.phc)
        environment[f"SYNC_USER{number}"] = f"{user.name}:{user.phc}"
    return environment


class SyncCore:
    """One sync core child process, restarted with backoff when it exits on its own."""

    def __init__(
        self, base: Path, max_payload_mb: int, port: int = 0, stop_timeout: float = 10.0,
        pid_file: Path | None = None, probe_interval: float = 30.0, index: int | None = None,
    ) -> None:
        self.base = Path(base)
        # With several cores, each log line names its core; a lone core keeps the plain lines.
        self.index = index
        self._tag = "" if index is None else f" core={index}"
        self._output_prefix = "core" if index is None else f"core {index}"
        self.max_payload_mb = max_payload_mb
        self.fixed_port = port
        self.stop_timeout = stop_timeout
        self.pid_file = Path(pid_file) if pid_file else self.base.parent / "core.pid"
        self.probe_interval = probe_interval
        self.port: int | None = None
        self.restarts = 0
        self.wedge_restarts = 0
        self._probe_task: asyncio.Task | None = None
        self._suspect = asyncio.Event()
        self._users: tuple[User, ...] = ()
        self._process: asyncio.subprocess.Process | None = None
        self._relay_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.running

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.ready

    async def start(self, users: Sequence[User]) -> None:
        """Start the core with these users and wait until /health returns 200."""
        self._users = tuple(users)
        self._stopping = False
        await self._spawn()
        self._watch_task = asyncio.create_task(self._watch(), name=f"core-watch{self._tag}")
        self._probe_task = asyncio.create_task(self._probe_loop(), name=f"core-probe{self._tag}")

    async def _spawn(self) -> None:
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        await asyncio.to_thread(pidfile.stop_stale_core, self.pid_file, self.stop_timeout)
        self.port = self.fixed_port or free_loopback_port()
        environment = core_environment(self._users, self.base, self.port, self.max_payload_mb)
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncproxy.corelauncher", str(os.getpid()),
            env=environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches syncproxy, not the core
        )
        pidfile.write_pid_file(self.pid_file, self._process.pid)
        log.info("sync core starting pid=%d port=%d users=%d%s", self._process.pid, self.port,
                 len(self._users), self._tag)
        self._relay_task = asyncio.create_task(self._relay(self._process), name="core-output")
        try:
            await self._wait_healthy(self._process)
        except CoreError:
            # A core that never became healthy would otherwise keep its lock and its port.
            await self._terminate(self._process)
            raise

    async def _relay(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            text = line.decode("utf-8", "replace").rstrip()
            # The core logs request URIs, and a legacy media request carries the host key in
            # its query string.
            text = HOST_KEY_IN_QUERY.sub(r"\1<redacted>", text)
            if not text:
                continue
            # After SIGINT the core's Python wrapper prints a KeyboardInterrupt traceback,
            # which is expected noise, not an error.
            level = logging.INFO
            if self._stopping or f'ip="{PROBE_CLIENT_ADDRESS}"' in text:
                level = logging.DEBUG
            core_output.log(level, "%s: %s", self._output_prefix, text)
            if PANIC_MARKER in text:
                self.suspect("core panicked")

    async def _wait_healthy(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if process.returncode is not None:
                    raise CoreError(f"sync core exited with status {process.returncode} during "
                                    "start; its output is above")
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(f"{self.url}/health")
                    if response.status_code == 200:
                        self._ready.set()
                        log.info("sync core ready pid=%d port=%d%s", process.pid, self.port,
                                 self._tag)
                        return
                await asyncio.sleep(0.1)
        raise CoreError(f"sync core did not respond on /health within {READY_TIMEOUT:g} s")

    async def _watch(self) -> None:
        """Restart the core with exponential backoff whenever it exits unexpectedly."""
        backoff = BACKOFF_FIRST
        while not self._stopping:
            process = self._process
            assert process is not None
            started = time.monotonic()
            status = await process.wait()
            if self._stopping or process is not self._process:
                return
            self._ready.clear()
            if time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            log.warning("sync core exited status=%s restart_in=%.1fs%s", status, backoff,
                        self._tag)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self._stopping:
                return
            try:
                self.restarts += 1
                await self._spawn()
            except Exception as error:  # noqa: BLE001 - the supervisor must outlive any failure
                log.error("sync core restart failed error=%r%s", str(error), self._tag)

    async def restart(self, users: Sequence[User]) -> None:
        """Stop the core and start it again with a new user list."""
        await self.stop()
        self.restarts += 1
        await self.start(users)

    async def stop(self) -> None:
        """Stop the core with SIGINT, killing it if it has not exited after the grace period."""
        self._stopping = True
        self._ready.clear()
        for task in (self._watch_task, self._probe_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watch_task = self._probe_task = None
        process = self._process
        if process is not None and process.returncode is None:
            await self._terminate(process)
            log.info("sync core stopped pid=%d%s", process.pid, self._tag)
        pidfile.remove_pid_file(self.pid_file)
        if self._relay_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay_task
            self._relay_task = None

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except asyncio.TimeoutError:
            log.warning("sync core ignored SIGINT for %.0fs, killing it pid=%d%s",
                        self.stop_timeout, process.pid, self._tag)
            process.kill()
            await process.wait()

    def suspect(self, reason: str) -> None:
        """Probe the core now: something suggests it stopped serving syncs."""
        if not self._suspect.is_set():
            log.info("probing sync core reason=%r%s", reason, self._tag)
        self._suspect.set()

    async def _probe_loop(self) -> None:
        """Restart a core that drops every sync request while /health still returns 200."""
        interval = self.probe_interval if self.probe_interval > 0 else None
        async with httpx.AsyncClient(trust_env=False, timeout=PROBE_TIMEOUT) as client:
            while not self._stopping:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._suspect.wait(), interval)
                self._suspect.clear()
                process = self._process
                if not self.ready or process is None:
                    continue
                if await self._probe(client) != "dropped":
                    continue
                await asyncio.sleep(PROBE_CONFIRM_DELAY)
                if process is not self._process or await self._probe(client) != "dropped":
                    continue
                self.wedge_restarts += 1
                log.error("sync core stopped serving syncs while /health responds, restarting it "
                          "pid=%d%s", process.pid, self._tag)
                self._ready.clear()
                # The watcher notices the exit and starts a new core.
                await self._terminate(process)

    async def _probe(self, client: httpx.AsyncClient) -> str:
        """Send one request that takes the core's lock: 'ok', 'dropped' or 'inconclusive'."""
        headers = {
            "anki-sync": f'{{"v":11,"k":"{PROBE_HOST_KEY}","c":"syncproxy-probe","s":""}}',
            # The core reads the client address from this header (SYNC_IP_HEADER) and returns
            # 500 without it.
            "x-forwarded-for": PROBE_CLIENT_ADDRESS,
        }
        try:
            await client.post(self.url + PROBE_PATH, headers=headers, content=b"")
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return "dropped"
        except httpx.TransportError:
            # Refused or timed out: the core is restarting or busy; the watcher covers a dead one.
            return "inconclusive"
        return "ok"
