"""The assignment of users to sync cores, for a server that runs several (`--cores N`).

The sync core runs every request of every user under one lock, so one large upload makes every
other user wait. With N cores each core serves a fixed subset of the users, and requests of
users on different cores run in parallel.

Rules of the assignment, kept in the data directory's `cores.json` (mode 0600):
- A user's core never changes by itself. A new user goes to the core with the fewest users
  and stays there.
- When N changes, users keep their core if it still exists. Users of removed cores go to the
  least-loaded remaining core, and each such move is logged.
- Only `syncproxy cores rebalance` moves users between existing cores.

Every core of one syncproxy uses the same SYNC_BASE, so a user's folder stays at
`collections/<user>` whatever core serves it, and moving a user moves no data. The sync core
locks each user's databases, not the folder (anki 26.9.3): two cores on one SYNC_BASE start and
serve as long as no user is given to both, and a second core with the same user fails with
"Locked". The server therefore stops the core that loses a user before the one that gains it
starts.

Changes take the users file's lock (`users.json.lock`), so an assignment never races with
`syncproxy user ...` or a backup's copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .users import file_signature, write_json_file

MAX_CORES = 64
FORMAT = 1


class CoreAssignmentError(ValueError):
    """The assignment file cannot be read or used."""


@dataclass(frozen=True)
class Move:
    """One user moving from one core to another."""

    user: str
    source: int
    target: int


def resolve_core_count(value: int | str) -> int:
    """Return the number of cores for the `cores` setting: an integer, or 'auto' for the CPUs
    this process may run on."""
    if value == "auto":
        return max(1, min(MAX_CORES, len(os.sched_getaffinity(0))))
    return int(value)


def least_loaded(counts: list[int]) -> int:
    """Return the core with the fewest users; ties go to the lowest index."""
    return min(range(len(counts)), key=lambda index: (counts[index], index))


def assign(current: dict[str, int], names: Iterable[str], count: int
           ) -> tuple[dict[str, int], list[Move], list[str]]:
    """Place every user of `names` on one of `count` cores.

    Returns the new assignment, the moves forced by removed cores, and the users placed for
    the first time. Users that still have a core keep it, and names not in `names` are dropped.
    """
    wanted = sorted(set(names))
    result = {name: current[name] for name in wanted
              if name in current and 0 <= current[name] < count}
    counts = [0] * count
    for core in result.values():
        counts[core] += 1

    moves: list[Move] = []
    added: list[str] = []
    for name in wanted:
        if name in result:
            continue
        core = least_loaded(counts)
        counts[core] += 1
        result[name] = core
        if name in current:
            moves.append(Move(name, current[name], core))
        else:
            added.append(name)
    return result, moves, added


def plan_rebalance(current: dict[str, int], count: int) -> list[Move]:
    """Return the fewest moves after which no two cores differ by more than one user.

    Each move takes the last user by name off the fullest core, so the plan is deterministic.
    """
    members: list[list[str]] = [[] for _ in range(count)]
    for name in sorted(current):
        if 0 <= current[name] < count:
            members[current[name]].append(name)
    moves: list[Move] = []
    while True:
        sizes = [len(names) for names in members]
        fullest = max(range(count), key=lambda index: (sizes[index], -index))
        emptiest = least_loaded(sizes)
        if sizes[fullest] - sizes[emptiest] <= 1:
            return moves
        name = members[fullest].pop()
        members[emptiest].append(name)
        moves.append(Move(name, fullest, emptiest))


class CoreAssignment:
    """The assignment file: user name -> core index, plus the core count it was made for."""

    def __init__(self, path: Path, lock_path: Path) -> None:
        self.path = Path(path)
        self.lock_path = Path(lock_path)

    def read(self) -> tuple[dict[str, int], int | None]:
        """Return the users' cores and the core count recorded last; ({}, None) if no file."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return {}, None
        except json.JSONDecodeError as error:
            raise CoreAssignmentError(
                f"core assignment file {self.path} is not valid JSON ({error}); remove it, and "
                f"the server assigns every user again at its next start") from None
        users = document.get("users", {}) if isinstance(document, dict) else None
        count = document.get("cores") if isinstance(document, dict) else None
        if (not isinstance(users, dict)
                or not all(isinstance(core, int) and not isinstance(core, bool)
                           for core in users.values())
                or not (count is None or isinstance(count, int))):
            raise CoreAssignmentError(
                f"core assignment file {self.path} does not map user names to core numbers; "
                f"remove it, and the server assigns every user again at its next start")
        return dict(users), count

    def signature(self) -> tuple[int, int, int] | None:
        """Return a cheap fingerprint of the file that changes whenever it is rewritten."""
        return file_signature(self.path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock that `syncproxy user ...` and backups take too."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, users: dict[str, int], count: int) -> None:
        """Replace the file atomically; call it while holding `locked()`."""
        document = {"version": FORMAT, "cores": count,
                    "users": {name: users[name] for name in sorted(users)}}
        write_json_file(self.path, document)

    def update(self, names: Iterable[str], count: int
               ) -> tuple[dict[str, int], list[Move], list[str], int | None]:
        """Assign `names` to `count` cores and store the result if anything changed.

        Returns the assignment, the forced moves, the newly placed users and the core count
        recorded before.
        """
        with self.locked():
            current, previous_count = self.read()
            result, moves, added = assign(current, names, count)
            if result != current or previous_count != count:
                self.write(result, count)
        return result, moves, added, previous_count

    def rebalance(self, dry_run: bool) -> tuple[list[Move], int]:
        """Plan, and unless `dry_run` store, moves that even out the user counts.

        Uses the core count the server recorded, so the plan fits the cores it runs.
        """
        with self.locked():
            current, count = self.read()
            if count is None:
                raise CoreAssignmentError(
                    f"no core assignment at {self.path} yet; start the server once, and it "
                    f"assigns every user to a core")
            moves = plan_rebalance(current, count)
            if moves and not dry_run:
                result = dict(current)
                for move in moves:
                    result[move.user] = move.target
                self.write(result, count)
        return moves, count
