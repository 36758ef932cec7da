"""The control socket: how local commands ask a running server to hold syncs.

`syncproxy backup` must copy the collections while the sync core writes nothing, but it runs
in its own process. The server therefore listens on a unix socket in the data directory (mode
0600, and peers must run as the server's user or as root) that speaks one JSON object per line:

    client: {"command": "hold", "reason": "backup"}
    server: {"held": true}                   once no sync is in flight; new syncs now wait
    client: {"command": "release"}           (or closes the connection)
    server: {"released": true, "expired": false, "held_ms": 812}

Syncs resume when the client releases, disconnects or dies, and at the latest after
MAX_HOLD_SECONDS, so a stuck command cannot stop syncing for good. `expired` tells the client
that the hold ended before it released, so its copy may not be consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from .gate import RequestGate

log = logging.getLogger("syncproxy.control")

MAX_HOLD_SECONDS = 600.0
# sun_path is 108 bytes on Linux; longer paths are reached through /proc/self/fd.
_SUN_PATH_MAX = 100


class ControlError(RuntimeError):
    """The running server could not be reached or did not do what was asked."""


@contextlib.contextmanager
def _short_address(path: Path) -> Iterator[str]:
    """Yield an address for `path` that fits in sun_path, keeping a directory fd open."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float) -> socket.socket | None:
    """Connect to a running server's control socket; return None if no server listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_address(path) as address:
            sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    return sock


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


class ControlServer:
    """Serve hold requests on the data directory's control socket."""

    def __init__(self, path: Path, gate: RequestGate) -> None:
        self.path = Path(path)
        self.gate = gate
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        existing = connect(self.path, timeout=2.0)
        if existing is not None:
            existing.close()
            raise ControlError(f"another syncproxy server already serves this data directory "
                               f"(its control socket {self.path} answers); stop it first")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left behind by a server that was killed
        # The umask keeps the socket private from the moment it exists.
        old_umask = os.umask(0o177)
        try:
            with _short_address(self.path) as address:
                self._server = await asyncio.start_unix_server(self._handle, path=address)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("control socket ready path=%s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = _peer_uid(writer)
            if uid not in (0, os.geteuid()):
                log.warning("control request rejected peer_uid=%d", uid)
                return
            line = await asyncio.wait_for(reader.readline(), 10.0)
            if not line:
                # A command that only checks whether a server runs connects and closes.
                log.debug("control connection closed without a request peer_uid=%d", uid)
                return
            try:
                request = json.loads(line)
            except ValueError:
                request = None
            if not isinstance(request, dict) or request.get("command") != "hold":
                log.warning("control request rejected: not a hold command peer_uid=%d", uid)
                await _send(writer, {"error": "unknown request; expected a hold command"})
                return
            await self._hold(str(request.get("reason", "local command"))[:64], reader, writer)
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _hold(self, reason: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        async with self.gate.exclusive(reason):
            started = time.monotonic()
            await _send(writer, {"held": True})
            expired = False
            try:
                # Any line or the end of the connection releases the hold.
                await asyncio.wait_for(reader.readline(), MAX_HOLD_SECONDS)
            except asyncio.TimeoutError:
                expired = True
                log.warning("hold expired, resuming syncs reason=%r after_s=%g", reason,
                            MAX_HOLD_SECONDS)
        held_ms = int((time.monotonic() - started) * 1000)
        with contextlib.suppress(ConnectionError):
            await _send(writer, {"released": True, "expired": expired, "held_ms": held_ms})


async def _send(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message).encode("utf-8") + b"\n")
    await writer.drain()


class Hold:
    """A hold on a running server's syncs, taken by a local command; see the module doc."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.held_ms = 0

    def release(self) -> None:
        """Let syncs resume; raise ControlError if the hold had already ended on its own."""
        try:
            self.file.write(b'{"command": "release"}\n')
            self.file.flush()
            reply = json.loads(self.file.readline() or b"{}")
        except (OSError, ValueError) as error:
            raise ControlError(f"the server did not confirm the end of the hold: {error}") from None
        finally:
            self.file.close()
            self.sock.close()
        if not reply.get("released"):
            raise ControlError("the server did not confirm the end of the hold")
        self.held_ms = int(reply.get("held_ms", 0))
        if reply.get("expired"):
            raise ControlError(f"the server resumed syncs after {MAX_HOLD_SECONDS:g} s, before "
                               "the copy was finished, so the copy may be inconsistent")


def hold_syncs(path: Path, reason: str, wait: float) -> Hold | None:
    """Ask the server on `path` to hold syncs; return None when no server is running.

    Blocks until syncs in flight have finished, at most `wait` seconds.
    """
    sock = connect(path, timeout=wait)
    if sock is None:
        return None
    hold = Hold(sock)
    try:
        hold.file.write(json.dumps({"command": "hold", "reason": reason}).encode() + b"\n")
        hold.file.flush()
        reply = json.loads(hold.file.readline() or b"{}")
    except TimeoutError:
        sock.close()
        raise ControlError(f"syncs in flight did not finish within {wait:g} s; try again "
                           "later") from None
    except (OSError, ValueError) as error:
        sock.close()
        raise ControlError(f"the server at {path} did not respond to the hold request: "
                           f"{error}") from None
    if not reply.get("held"):
        sock.close()
        raise ControlError(f"the server rejected the hold request: {reply.get('error', reply)}")
    sock.settimeout(None)
    return hold
