"""The data directory: the one place that holds everything syncproxy must keep across restarts."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path


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
        collections/     the sync core's SYNC_BASE: one folder per user
        tls/             generated CA and server certificate
        acme/            certbot's configuration, account, webroot and logs
        listening.json   where the running server listens, for 'syncproxy health'
        ankisyncd-import.json
                         what 'syncproxy import ankisyncd' copied, so a rerun can tell
                         untouched collections from changed ones
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config_file(self) -> Path:
        return self.root / "syncproxy.toml"

    @property
    def users_file(self) -> Path:
        return self.root / "users.json"

    @property
    def collections(self) -> Path:
        return self.root / "collections"

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
        for path in (self.root, self.collections, self.tls_dir):
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except PermissionError:
                raise self._not_writable(path) from None
        try:
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except PermissionError:
            raise self._not_writable(self.root) from None

    def _not_writable(self, path: Path) -> DataDirError:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            owner = _user_name(existing.stat().st_uid)
        except OSError:
            owner = "unknown"
        running_as = _user_name(os.geteuid())
        return DataDirError(
            f"data directory {path} is not writable: {existing} is owned by {owner} and "
            f"syncproxy runs as {running_as} (uid {os.geteuid()}). Give that user write access "
            f"(for a container volume: chown it to the container's UID) or choose another "
            f"directory with --data-dir."
        )
