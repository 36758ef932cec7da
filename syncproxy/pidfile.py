"""The sync core's pid file, and stopping a core that an earlier syncproxy left running.

The core locks the databases of its users, so a core orphaned by a syncproxy that was killed
(SIGKILL, OOM killer) keeps every later core with one of those users from starting. The parent-death signal
set by `corelauncher` normally stops such a core; this file is the second line of defence, for
a core whose stop hangs or a kernel without that signal.

A process named in the pid file is stopped only when it is provably the core that was recorded:
same pid, same start time (from /proc, so a reused pid does not match) and a sync core command
line. Anything else is left alone and the stale file is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("syncproxy.core")

CORE_COMMAND_MARKERS = (b"anki.syncserver", b"syncproxy.corelauncher")


@dataclass(frozen=True)
class CoreRecord:
    """A core process as written to the pid file."""

    pid: int
    start_ticks: int


def process_start_ticks(pid: int) -> int | None:
    """Return the process's start time in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command name) may contain spaces and parentheses, so split after its end.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 of stat(5), counting from 1 before the name


def is_recorded_core(record: CoreRecord) -> bool:
    """Return whether the process `record` names is still that sync core."""
    if process_start_ticks(record.pid) != record.start_ticks:
        return False
    try:
        command = Path(f"/proc/{record.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(marker in command for marker in CORE_COMMAND_MARKERS)


def write_pid_file(path: Path, pid: int) -> None:
    ticks = process_start_ticks(pid)
    if ticks is None:
        return
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"pid": pid, "start_ticks": ticks}, handle)
    os.replace(temporary, path)


def read_pid_file(path: Path) -> CoreRecord | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return CoreRecord(pid=int(document["pid"]), start_ticks=int(document["start_ticks"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("core pid file unreadable, ignoring it path=%s error=%r", path, str(error))
        return None


def remove_pid_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _wait_gone(record: CoreRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_recorded_core(record):
            return True
        time.sleep(0.05)
    return not is_recorded_core(record)


def stop_stale_core(path: Path, stop_timeout: float) -> None:
    """Stop the core named in the pid file if it still runs: SIGINT, then SIGKILL."""
    record = read_pid_file(path)
    if record is None:
        return
    if not is_recorded_core(record):
        remove_pid_file(path)
        return
    log.warning("stopping a sync core left running by an earlier syncproxy pid=%d", record.pid)
    try:
        os.kill(record.pid, signal.SIGINT)
        if not _wait_gone(record, stop_timeout):
            log.warning("stale sync core ignored SIGINT for %.0fs, killing it pid=%d",
                        stop_timeout, record.pid)
            os.kill(record.pid, signal.SIGKILL)
            _wait_gone(record, 5.0)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise OSError(f"a sync core left running by an earlier syncproxy (pid {record.pid}) "
                      f"belongs to another user and cannot be stopped; stop it, then start "
                      f"syncproxy again") from None
    remove_pid_file(path)
