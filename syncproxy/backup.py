"""Backups of the data directory, and restoring one into an empty data directory.

A backup must be consistent: a collection's SQLite file and its write-ahead log must come from
the same moment, and the users file must match the collections. When a server runs, the copy is
therefore taken while it holds syncs (see `control`). Holding is enough without stopping the
sync core: with no request in flight the core writes nothing, and the pair of database file and
WAL copied at such a moment is what SQLite recovers from after a crash. The hold lasts only for
a plain file copy into a staging folder next to the archive; hashing and archiving happen after
syncs have resumed. With several sync cores the hold covers every core.

Archive layout (tar, gzip-compressed unless the name ends in .tar), relative to the data
directory: syncproxy.toml, users.json, cores.json, collections/, tls/, acme/,
ankisyncd-import.json, and syncproxy-backup.json, a manifest with the size and SHA-256 of every file that restore checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from . import __version__
from .control import ControlError, hold_syncs
from .datadir import DataDir

MANIFEST = "syncproxy-backup.json"
FORMAT = 1
TOP_LEVEL = ("syncproxy.toml", "users.json", "cores.json", "collections", "tls", "acme",
             "ankisyncd-import.json")
# Derived or per-process files that a copy must not carry.
SKIPPED_SUFFIXES = ("-shm", ".lock", ".sock", ".tmp")
DRAIN_WAIT_SECONDS = 600.0


class BackupError(RuntimeError):
    """A backup or restore failed; the message says which file and what to do."""


@dataclasses.dataclass(frozen=True)
class BackupResult:
    """Summary of an archive written by `create_backup`."""

    archive: Path
    files: int
    bytes: int
    server_running: bool
    held_ms: int


def _sources(data_dir: DataDir) -> dict[str, Path]:
    return {
        "syncproxy.toml": data_dir.config_file,
        "users.json": data_dir.users_file,
        "cores.json": data_dir.cores_file,
        "collections": data_dir.collections,
        "tls": data_dir.tls_dir,
        "acme": data_dir.acme_dir,
        "ankisyncd-import.json": data_dir.ankisyncd_import_record,
    }


def archive_path(dest: Path) -> Path:
    """Return the archive file for DEST: a new file inside it if DEST is a directory."""
    if dest.is_dir():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return dest / f"syncproxy-backup-{stamp}.tar.gz"
    if not dest.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise BackupError(f"backup destination {dest} must be a directory or a file name ending "
                          f"in .tar.gz, .tgz or .tar")
    if dest.exists():
        raise BackupError(f"backup destination {dest} already exists; choose a new name or a "
                          f"directory")
    if not dest.parent.is_dir():
        raise BackupError(f"backup destination folder {dest.parent} does not exist")
    return dest


@contextlib.contextmanager
def _users_locked(data_dir: DataDir) -> Iterator[None]:
    """Keep `syncproxy user ...` from rewriting the users file during the copy."""
    lock_path = data_dir.users_file.with_name(data_dir.users_file.name + ".lock")
    if not data_dir.root.is_dir():
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _copy_tree(source: Path, target: Path) -> None:
    """Copy files, folders and symbolic links (certbot's live/ links into archive/)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_file():
        shutil.copy2(source, target)
    elif source.is_dir():
        target.mkdir(mode=stat.S_IMODE(source.stat().st_mode) | 0o700)
        for child in sorted(source.iterdir()):
            if child.name.endswith(SKIPPED_SUFFIXES) or child.name.startswith(".syncproxy-"):
                continue
            if child.is_symlink() or child.is_file() or child.is_dir():
                _copy_tree(child, target / child.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(staging: Path, server_running: bool) -> dict:
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and not path.is_symlink():
            relative = path.relative_to(staging).as_posix()
            files[relative] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "syncproxy": __version__, "server_running": server_running, "files": files}


def create_backup(data_dir: DataDir, dest: Path) -> BackupResult:
    """Write a consistent archive of the data directory to DEST."""
    if not data_dir.root.is_dir():
        raise BackupError(f"data directory {data_dir.root} does not exist; nothing to back up")
    archive = archive_path(dest)
    staging = Path(tempfile.mkdtemp(prefix=".syncproxy-backup-", dir=archive.parent))
    try:
        try:
            hold = hold_syncs(data_dir.control_socket, "backup", DRAIN_WAIT_SECONDS)
        except ControlError as error:
            raise BackupError(f"cannot hold syncs for the copy: {error}") from None
        try:
            with _users_locked(data_dir):
                for name, source in _sources(data_dir).items():
                    if source.exists() or source.is_symlink():
                        _copy_tree(source, staging / name)
        finally:
            if hold is not None:
                try:
                    hold.release()
                except ControlError as error:
                    raise BackupError(f"backup discarded: {error}") from None

        manifest = _manifest(staging, server_running=hold is not None)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _write_archive(staging, archive)
        total = sum(entry["size"] for entry in manifest["files"].values())
        return BackupResult(archive=archive, files=len(manifest["files"]), bytes=total,
                            server_running=hold is not None,
                            held_ms=hold.held_ms if hold is not None else 0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_archive(staging: Path, archive: Path) -> None:
    mode = "w" if archive.name.endswith(".tar") else "w:gz"
    partial = archive.with_name(f".{archive.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        with tarfile.open(fileobj=handle, mode=mode) as tar:
            tar.add(staging / MANIFEST, arcname=MANIFEST)
            for name in TOP_LEVEL:
                if (staging / name).exists() or (staging / name).is_symlink():
                    tar.add(staging / name, arcname=name)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, archive)


def _member_target(member: tarfile.TarInfo) -> PurePosixPath:
    """Return the member's path relative to the data directory; reject anything unsafe."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BackupError(f"archive member {member.name!r} has an unsafe path; this is not a "
                          f"syncproxy backup")
    if path.parts[0] not in TOP_LEVEL and member.name != MANIFEST:
        raise BackupError(f"archive member {member.name!r} is not part of a syncproxy backup")
    if not (member.isfile() or member.isdir() or member.issym()):
        raise BackupError(f"archive member {member.name!r} is not a file, folder or link")
    if member.issym():
        resolved = posixpath.normpath(posixpath.join(str(path.parent), member.linkname))
        if posixpath.isabs(member.linkname) or resolved.split("/")[0] != path.parts[0]:
            raise BackupError(f"archive member {member.name!r} links outside its folder")
    return path


def restore_backup(archive: Path, data_dir: DataDir) -> int:
    """Fill an empty data directory from ARCHIVE; return the number of files restored."""
    if data_dir.root.exists() and not data_dir.is_empty():
        present = sorted(path.name for path in _sources(data_dir).values()
                         if path.exists() and (not path.is_dir() or any(path.iterdir())))
        raise BackupError(
            f"data directory {data_dir.root} is not empty (it contains {', '.join(present)}); "
            f"restore only fills an empty one, so it never mixes two states. Choose a new "
            f"--data-dir, or move the current contents away first."
        )
    try:
        tar = tarfile.open(archive, mode="r:*")
    except FileNotFoundError:
        raise BackupError(f"archive {archive} not found") from None
    except tarfile.TarError as error:
        raise BackupError(f"archive {archive} cannot be read: {error}") from None

    created: list[Path] = []
    with tar:
        members = tar.getmembers()
        manifest = _read_manifest(tar, members, archive)
        targets = {member.name: _member_target(member) for member in members}
        try:
            restored = _extract(tar, members, targets, manifest, data_dir, created)
        except BaseException:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            raise
    os.chmod(data_dir.root, 0o700)
    return restored


def _read_manifest(tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: Path) -> dict:
    for member in members:
        if member.name == MANIFEST and member.isfile():
            handle = tar.extractfile(member)
            assert handle is not None
            manifest = json.loads(handle.read())
            if manifest.get("format") != FORMAT:
                raise BackupError(f"archive {archive} has backup format "
                                  f"{manifest.get('format')!r}; this syncproxy reads format "
                                  f"{FORMAT}")
            return manifest
    raise BackupError(f"archive {archive} has no {MANIFEST}; it is not a syncproxy backup")


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo],
             targets: dict[str, PurePosixPath], manifest: dict, data_dir: DataDir,
             created: list[Path]) -> int:
    roots = _sources(data_dir)
    for path in (data_dir.root, data_dir.collections):
        if not path.exists():
            path.mkdir(mode=0o700, parents=True)
            created.append(path)
    expected = dict(manifest["files"])
    for member in members:
        relative = targets[member.name]
        if member.name == MANIFEST:
            continue
        target = roots[relative.parts[0]].joinpath(*relative.parts[1:])
        if member.isdir():
            if not target.exists():
                target.mkdir(mode=0o700)
                created.append(target)
            continue
        if target.exists() or target.is_symlink():
            raise BackupError(f"archive member {member.name!r} appears twice")
        if member.issym():
            os.symlink(member.linkname, target)
            created.append(target)
            continue
        entry = expected.pop(relative.as_posix(), None)
        if entry is None:
            raise BackupError(f"archive member {member.name!r} is not in the manifest; the "
                              f"archive was changed after it was written")
        source = tar.extractfile(member)
        assert source is not None
        digest = hashlib.sha256()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, member.mode & 0o700)
        created.append(target)
        with os.fdopen(fd, "wb") as handle:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
        os.utime(target, (member.mtime, member.mtime))
        if digest.hexdigest() != entry["sha256"]:
            raise BackupError(f"archive member {member.name!r} does not match its checksum; "
                              f"the archive is damaged")
    if expected:
        missing = ", ".join(sorted(expected)[:5])
        raise BackupError(f"archive lacks {len(expected)} file(s) its manifest lists ({missing}); "
                          f"the archive is truncated or damaged")
    return len(manifest["files"])
