"""The bundled sync cores as the proxy's upstream: one core, or N cores that share the users.

Every core gets the users that `cores.json` assigns to it (see `cores`), all cores use the
same SYNC_BASE, and a core with no users is not started. The users file and the assignment
file are polled once a second. A change restarts only the cores whose user list changed, each
behind its own gate (see `gate`), so syncs of users on other cores go on.

With one core no request is routed: the proxy forwards to `url` as it always did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import pidfile
from .cores import CoreAssignment, CoreAssignmentError, Move
from .core import CoreError, SyncCore
from .gate import GateGroup, RequestGate
from .users import User, UserError, UserStore

log = logging.getLogger("syncproxy")

USERS_POLL_SECONDS = 1.0


class CoreRoute:
    """One core of the pool as an upstream of the proxy: its URL, its state, its failures."""

    def __init__(self, pool: BundledCore, index: int) -> None:
        self.pool = pool
        self.index = index

    @property
    def url(self) -> str:
        return self.pool.cores[self.index].url

    def unavailable_reason(self) -> str | None:
        return self.pool.unavailable_reason(self.index)

    def upstream_failed(self, path: str, error: Exception) -> None:
        self.pool.cores[self.index].suspect(f"{type(error).__name__} on {path}")


class BundledCore:
    """The sync cores as the proxy's upstream, plus the users each was started with."""

    def __init__(self, cores: Sequence[SyncCore], store: UserStore, gates: GateGroup,
                 assignment: CoreAssignment) -> None:
        self.cores = tuple(cores)
        self.store = store
        self.gates = gates
        self.assignment = assignment
        self.users: dict[str, User] = {}
        self.pending: frozenset[str] = frozenset()
        # user name -> core index, for users and pending users alike
        self.core_of: dict[str, int] = {}
        self._host_keys: frozenset[str] = frozenset()
        self._core_of_key: dict[str, int] = {}
        self._signature: Any = None
        self._reload_lock = asyncio.Lock()
        self.routes = tuple(CoreRoute(self, index) for index in range(len(self.cores)))

    @property
    def core(self) -> SyncCore:
        return self.cores[0]

    @property
    def url(self) -> str:
        return self.cores[0].url

    @property
    def restarts(self) -> int:
        return sum(core.restarts for core in self.cores)

    def unavailable_reason(self, index: int | None = None) -> str | None:
        """Say why core `index`, or with None any core that has users, cannot serve now."""
        if not self.users and self.pending:
            # Only imported users, none logged in yet: no core runs, and every host key is
            # invalid, so clients get 403 and log in, which starts the core.
            return None
        if not self.users:
            return ("no users yet. Add one on the server with 'syncproxy user add NAME'; "
                    "it takes effect without a restart.")
        indexes = [index] if index is not None else [
            number for number in range(len(self.cores)) if self.users_of(number)]
        for number in indexes:
            if not self.cores[number].ready:
                if len(self.cores) > 1:
                    return f"sync core {number} is starting or restarting."
                return "the sync core is starting or restarting."
        return None

    def valid_host_keys(self) -> frozenset[str]:
        return self._host_keys

    def upstream_failed(self, path: str, error: Exception) -> None:
        """Check the core at once when a sync request lost its connection to it."""
        self.cores[0].suspect(f"{type(error).__name__} on {path}")

    def route(self, host_key: str, user: str | None) -> tuple[CoreRoute, RequestGate]:
        """Return the core and gate for a request, found by its host key or its user name.

        A request of an unknown user goes to the first core that runs, which rejects it with
        403 as a lone core would.
        """
        index = self._core_of_key.get(host_key) if host_key else None
        if index is None and user is not None:
            index = self.core_of.get(user) if user in self.users else None
        if index is None:
            index = self._fallback_index()
        return self.routes[index], self.gates[index]

    def _fallback_index(self) -> int:
        for index, core in enumerate(self.cores):
            if core.running:
                return index
        return 0

    def users_of(self, index: int) -> list[User]:
        return [user for name, user in sorted(self.users.items())
                if self.core_of.get(name, 0) == index]

    def _load(self) -> tuple[dict[str, User], dict[str, int]]:
        """Read users and their cores, placing new users; raise UserError or
        CoreAssignmentError for a file that cannot be used.

        Runs in a thread, because the assignment waits for the users file's lock, which a
        backup keeps while it copies the data directory.
        """
        self._signature = (self.store.signature(), self.assignment.signature())
        users = self.store.load()
        self.pending = frozenset(self.store.load_pending())
        core_of, moves, added, previous = self.assignment.update(
            set(users) | self.pending, len(self.cores))
        self._log_assignment(moves, added, previous, core_of)
        # The update may have rewritten the file; that write is this process's own.
        self._signature = (self.store.signature(), self.assignment.signature())
        return users, core_of

    def _log_assignment(self, moves: list[Move], added: list[str], previous: int | None,
                        core_of: dict[str, int]) -> None:
        count = len(self.cores)
        if previous is not None and previous != count:
            log.info("core count changed from=%d to=%d users_moved=%d", previous, count,
                     len(moves))
        for move in moves:
            log.warning("user reassigned because its core no longer exists user=%s from_core=%d "
                        "to_core=%d", move.user, move.source, move.target)
        if count > 1:
            for name in added:
                log.info("user assigned to core user=%s core=%d", name, core_of[name])
        if previous is not None and previous < count and count > 1:
            log.info("existing users keep their cores; spread them over the new cores with: "
                     "syncproxy cores rebalance")

    async def start(self) -> None:
        await self._stop_stale_cores()
        self.users, self.core_of = await asyncio.to_thread(self._load)
        self._index_host_keys()
        if not self.users:
            log.warning("no users yet; add one with: syncproxy user add NAME "
                        "(the running server picks it up)")
            return
        starts = [core.start(self.users_of(index)) for index, core in enumerate(self.cores)
                  if self.users_of(index)]
        results = await asyncio.gather(*starts, return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]

    def _index_host_keys(self) -> None:
        self._host_keys = frozenset(user.host_key for user in self.users.values())
        self._core_of_key = {user.host_key: self.core_of.get(name, 0)
                             for name, user in self.users.items()}

    async def watch_users(self) -> None:
        """Apply changes to the users file and the core assignment while running."""
        while True:
            await asyncio.sleep(USERS_POLL_SECONDS)
            await self.refresh()

    async def refresh(self) -> None:
        """Apply the users file if it changed; also run before each login.

        Without the call at login, a user who logs in right after 'syncproxy user add' could
        be rejected for up to one poll interval.
        """
        if (self.store.signature(), self.assignment.signature()) != self._signature:
            await self.reload_users()

    async def reload_users(self) -> None:
        """Read the users and their cores; restart each core whose users changed."""
        async with self._reload_lock:
            try:
                users, core_of = await asyncio.to_thread(self._load)
            except (UserError, CoreAssignmentError) as error:
                log.error("users or core assignment unreadable, keeping the current users "
                          "error=%r", str(error))
                return
            if users != self.users or core_of != self.core_of:
                await self._apply(users, core_of)

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

    async def _apply(self, users: dict[str, User], core_of: dict[str, int]) -> None:
        added = sorted(set(users) - set(self.users))
        removed = sorted(set(self.users) - set(users))
        changed = sorted(name for name in set(users) & set(self.users)
                         if users[name] != self.users[name])
        log.info("users changed added=%s removed=%s changed=%s", ",".join(added) or "-",
                 ",".join(removed) or "-", ",".join(changed) or "-")
        for name in sorted(set(core_of) & set(self.core_of)):
            if core_of[name] != self.core_of[name]:
                log.info("user moved to another core user=%s from_core=%d to_core=%d", name,
                         self.core_of[name], core_of[name])
        before = {index: self.users_of(index) for index in range(len(self.cores))}
        # Old host keys stop working at once; the cores catch up when the restarts are done.
        self.users, self.core_of = users, core_of
        self._index_host_keys()
        after = {index: self.users_of(index) for index in range(len(self.cores))}
        affected = [index for index in range(len(self.cores)) if before[index] != after[index]]
        if not affected:
            return

        async with self.gates.exclusive("users changed", affected):
            # Every affected core stops before any starts: a user moving between cores must
            # never be open in two cores at once, because the second would fail with "Locked".
            for index in affected:
                await self.cores[index].stop()
            for index in affected:
                if not after[index]:
                    continue
                try:
                    self.cores[index].restarts += 1
                    await self.cores[index].start(after[index])
                except (CoreError, OSError) as error:
                    log.error("sync core restart after user change failed error=%r%s",
                              str(error), f" core={index}" if len(self.cores) > 1 else "")

    async def stop(self) -> None:
        for core in self.cores:
            await core.stop()

    async def _stop_stale_cores(self) -> None:
        """Stop cores an earlier, killed syncproxy left running, before any core starts.

        A stale core still has its users' databases open, so a new core given one of those
        users would fail with "Locked", even a core with another number.
        """
        root = self.cores[0].pid_file.parent
        paths = [core.pid_file for core in self.cores] + pid_files_beyond(root, len(self.cores))
        for path in paths:
            await asyncio.to_thread(pidfile.stop_stale_core, path, self.cores[0].stop_timeout)


def core_pid_file(root: Path, index: int) -> Path:
    """Return the pid file of core `index`; the first keeps the name a lone core's has."""
    return root / ("core.pid" if index == 0 else f"core-{index}.pid")


def pid_files_beyond(root: Path, count: int) -> list[Path]:
    """Return pid files of cores numbered `count` and up, left by a server with more cores."""
    found = []
    for path in root.glob("core-*.pid"):
        suffix = path.stem.removeprefix("core-")
        if suffix.isdigit() and int(suffix) >= count:
            found.append(path)
    return sorted(found)
