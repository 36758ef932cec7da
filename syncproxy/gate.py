"""Hold new syncs while the sync core restarts, so that clients see a short wait, not an error.

The sync core reads its users only at start, so a user change means a restart. A normal sync is
several requests (`/sync/start` ... `/sync/finish`) inside one core transaction, and a restart in
the middle makes the client's next call fail with 409. The gate therefore tracks sync sessions by
host key: while it is closed, requests that belong to a session already under way still pass, new
ones wait, and the restart begins once nothing is in flight.

NOTE: legacy (multipart, protocol v8-v10) requests carry the host key in the body, which the gate
does not read; such a sync caught by a restart fails once and succeeds when the client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

log = logging.getLogger("syncproxy.gate")

# A session whose client has sent nothing for this long has been abandoned.
SESSION_IDLE_SECONDS = 60.0
# A media sync with nothing to transfer is a lone /msync/begin with no closing request, so an
# idle media session must expire soon, or every user change and backup would wait a minute
# after each sync.
# NOTE: 5 s is an estimate of the longest pause inside a media sync; a client that pauses longer
# can meet a restart, and its media sync then fails once and succeeds on the next sync.
MEDIA_SESSION_IDLE_SECONDS = 5.0

SESSION_OPENERS = frozenset({"/sync/start", "/msync/begin"})
SESSION_CLOSERS = frozenset({"/sync/finish", "/sync/abort", "/msync/mediaSanity"})
# A media sync keeps state in the core between its requests, and current clients (anki 26.9)
# start one with /msync/uploadChanges or /msync/mediaChanges, without /msync/begin: a core
# restart between two uploadChanges made the client's media sync fail. Every media request
# therefore opens or continues a session until /msync/mediaSanity.
MEDIA_PREFIX = "/msync/"


def opens_session(path: str) -> bool:
    return path in SESSION_OPENERS or (path.startswith(MEDIA_PREFIX)
                                       and path not in SESSION_CLOSERS)


class GateTimeout(Exception):
    """A request waited longer than allowed for the gate to open."""


class RequestGate:
    """Admit requests to the upstream, or hold new ones while exclusive work runs."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._changed = asyncio.Event()
        self._active = 0
        # host key -> (monotonic deadline after which the idle session is abandoned)
        self._sessions: dict[str, float] = {}
        # One exclusive holder at a time: a backup and a user change must not reopen the gate
        # for each other.
        self._exclusive = asyncio.Lock()

    @property
    def active(self) -> int:
        return self._active

    def open_sessions(self) -> int:
        self._expire_sessions()
        return len(self._sessions)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for key in [key for key, deadline in self._sessions.items() if deadline < now]:
            del self._sessions[key]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def admit(self, host_key: str, path: str, wait_limit: float) -> AsyncIterator[None]:
        """Hold the request while the gate is closed, unless its session is already under way."""
        self._expire_sessions()
        in_session = bool(host_key) and host_key in self._sessions
        if not self._open.is_set() and not in_session:
            try:
                await asyncio.wait_for(self._open.wait(), wait_limit)
            except asyncio.TimeoutError:
                raise GateTimeout from None

        idle = MEDIA_SESSION_IDLE_SECONDS if path.startswith(MEDIA_PREFIX) else SESSION_IDLE_SECONDS
        if host_key and (opens_session(path) or in_session):
            self._sessions[host_key] = time.monotonic() + idle
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            # The idle time counts from the end of the request: an upload can outlast it.
            if host_key in self._sessions:
                self._sessions[host_key] = time.monotonic() + idle
            if host_key and path in SESSION_CLOSERS:
                self._sessions.pop(host_key, None)
            self._notify()

    @contextlib.asynccontextmanager
    async def exclusive(self, reason: str) -> AsyncIterator[None]:
        """Close the gate, wait until no request or session is in flight, run, then reopen."""
        async with self._exclusive:
            async with self._closed(reason):
                yield

    @contextlib.asynccontextmanager
    async def _closed(self, reason: str) -> AsyncIterator[None]:
        self._open.clear()
        started = time.monotonic()
        log.info("holding new syncs reason=%r active=%d sessions=%d", reason, self._active,
                 self.open_sessions())
        try:
            while self._active or self.open_sessions():
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
            log.info("syncs drained reason=%r waited_ms=%d", reason,
                     (time.monotonic() - started) * 1000)
            yield
        finally:
            self._open.set()
            log.info("resuming syncs reason=%r held_ms=%d", reason,
                     (time.monotonic() - started) * 1000)


class GateGroup:
    """One gate per sync core, for a server that runs several cores.

    A user change restarts only the core that serves the user, so only that core's gate
    closes. A backup must hold every core, so `exclusive` closes them all.
    """

    def __init__(self, count: int) -> None:
        self.gates = tuple(RequestGate() for _ in range(count))

    def __getitem__(self, index: int) -> RequestGate:
        return self.gates[index]

    @property
    def active(self) -> int:
        return sum(gate.active for gate in self.gates)

    def open_sessions(self) -> int:
        return sum(gate.open_sessions() for gate in self.gates)

    @contextlib.asynccontextmanager
    async def exclusive(self, reason: str, indexes: Iterable[int] | None = None
                        ) -> AsyncIterator[None]:
        """Close the gates of `indexes` (default: all), wait until they drain, run, reopen.

        Gates are taken in index order, so two holders cannot deadlock.
        """
        chosen = sorted(set(range(len(self.gates)) if indexes is None else indexes))
        async with contextlib.AsyncExitStack() as stack:
            for index in chosen:
                await stack.enter_async_context(self.gates[index].exclusive(
                    f"{reason}, core {index}" if len(self.gates) > 1 else reason))
            yield
