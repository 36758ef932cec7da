"""The data directory: the one place that holds everything syncproxy must keep across restarts."""

from __future__ import annotations

import errno
import os
import pwd
import tempfile
from pathlib import Path
from typing import Any


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class DataDirError(RuntimeError):
    """The data directory cannot be created or written."""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class DataDir:
    """Paths inside the data directory.

    Layout:
        syncproxy.toml   optional settings file
        users.json       user names and PHC password hashes (mode 0600)
        cores.json       which sync core serves which user (mode 0600; see `cores`)
        collections/     the sync core's SYNC_BASE: one folder per user (collections_dir moves it)
        tls/             generated CA and server certificate
        acme/            certbot's configuration, account, webroot and logs
        listening.json   where the running server listens, for 'syncproxy health'
        ankisyncd-import.json
                         what 'syncproxy import ankisyncd' copied, so a rerun can tell
                         untouched collections from changed ones
        control.sock     the running server's control socket (mode 0600), for local commands
    """

    def __init__(self, root: Path, collections: Path | None = None) -> None:
        self.root = Path(root)
        self._collections = Path(collections) if collections is not None else None

    @classmethod
    def from_settings(cls, settings: Any) -> DataDir:
        return cls(settings.data_dir, getattr(settings, "collections_dir", None))

    @property
    def config_file(self) -> Path:
        return self.root / "syncproxy.toml"

    @property
    def users_file(self) -> Path:
        return self.root / "users.json"

    @property
    def cores_file(self) -> Path:
        return self.root / "cores.json"

    @property
    def collections(self) -> Path:
        return self._collections or self.root / "collections"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def listening_file(self) -> Path:
        return self.root / "listening.json"

    @property
    def ankisyncd_import_record(self) -> Path:
        return self.root / "ankisyncd-import.json"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def acme_dir(self) -> Path:
        return self.root / "acme"

    def describe(self) -> dict[str, Path]:
        """Return each kept path by name, for the start-up log line."""
        return {
            "config": self.config_file,
            "users": self.users_file,
            "collections": self.collections,
            "tls": self.tls_dir,
            "acme": self.acme_dir,
        }

    def prepare(self) -> None:
        """Create the directory tree if missing and check that it can be written."""
        # Checked folder by folder, so the error names the first one that cannot be used. A
        # volume restored or copied by another user can leave single folders unwritable.
        for path in (self.root, self.collections, self.tls_dir, self.acme_dir):
            try:
                if path is not self.acme_dir:
                    path.mkdir(mode=0o700, parents=True, exist_ok=True)
                if path.is_dir():
                    with tempfile.TemporaryFile(dir=path):
                        pass
            except OSError as error:
                if error.errno not in _NOT_WRITABLE:
                    raise
                raise self.not_writable(path, error) from None
        users = self.users_file
        if users.exists() and not os.access(users, os.R_OK | os.W_OK):
            raise self.not_writable(users)

    def is_empty(self) -> bool:
        """Return whether nothing worth keeping is in the data directory yet."""
        kept = (self.config_file, self.users_file, self.cores_file, self.collections, self.tls_dir,
                self.acme_dir)
        for path in kept:
            if path.is_dir() and any(path.iterdir()):
                return False
            if path.is_file():
                return False
        return True

    def not_writable(self, path: Path, error: OSError | None = None) -> DataDirError:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if isinstance(error, OSError) and error.errno == errno.EROFS:
            return DataDirError(f"data directory path {path} is on a read-only file system; "
                                f"mount it read-write or choose another directory with "
                                f"--data-dir.")
        try:
            uid = existing.stat().st_uid
            owner = f"{_user_name(uid)} (uid {uid})"
        except OSError:
            owner = "unknown"
        running_as = _user_name(os.geteuid())
        problem = "is not writable" if existing == path else "cannot be created"
        return DataDirError(
            f"data directory path {path} {problem}: {existing} is owned by {owner} and "
            f"syncproxy runs as {running_as} (uid {os.geteuid()}). Give that user write access "
            f"(for a container volume: chown it to the container's UID) or choose another "
            f"directory with --data-dir."
        )
