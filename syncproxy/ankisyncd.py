"""Reading an ankisyncd data root: users, password hashes, collections and media.

ankisyncd, the archived community sync server, keeps everything under one folder:

    auth.db                                   users: table auth (username, hash)
    collections/<user>/collection.anki2       the collection, usually in schema 11
    collections/<user>/collection.media/      the media files
    collections/<user>/collection.media.server.db
                                              media (fname, usn, csum): SHA-1 in hex,
                                              NULL once the file was deleted

Its password hash is ``sha256_hex(utf8(username + password) + salt) + salt``, where ``salt``
is 16 lower-case hex digits stored as text: 80 hex digits in all. Releases before the table's
columns were renamed called the first column ``user`` instead of ``username``.

This module only reads. Every database is opened read-only, so an import can run while
ankisyncd still serves, and it never changes the old server's data.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sqlite3
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

AUTH_DB_NAME = "auth.db"
COLLECTIONS_DIR_NAME = "collections"
COLLECTION_NAME = "collection.anki2"
MEDIA_DIR_NAME = "collection.media"
MEDIA_DB_NAME = "collection.media.server.db"

LEGACY_HASH_RE = re.compile(r"^[0-9a-f]{64}[0-9a-f]{16}$")
_SALT_LENGTH = 16


class AnkisyncdError(RuntimeError):
    """An ankisyncd data root that cannot be read."""


def is_legacy_hash(value: str) -> bool:
    """Return whether `value` has the shape of an ankisyncd password hash."""
    return LEGACY_HASH_RE.match(value) is not None


def verify_legacy_password(username: str, password: str, legacy_hash: str) -> bool:
    """Return whether `password` matches ankisyncd's stored hash for `username`."""
    if not is_legacy_hash(legacy_hash):
        return False
    salt = legacy_hash[-_SALT_LENGTH:]
    digest = hashlib.sha256((username + password + salt).encode("utf-8")).hexdigest()
    return hmac.compare_digest(digest + salt, legacy_hash)


@dataclass(frozen=True)
class MediaFile:
    """One media file to bring over; `name` is NFC, the form the sync core stores."""

    name: str
    path: Path
    size: int
    sha1: bytes


@dataclass
class SourceUser:
    """The data ankisyncd has for one user."""

    name: str
    legacy_hash: str | None
    folder: Path | None
    collection: Path | None = None
    collection_mod: int | None = None
    note_count: int | None = None
    media: list[MediaFile] = field(default_factory=list)
    # Things a person should know about this user's data, each a full sentence.
    remarks: list[str] = field(default_factory=list)

    @property
    def media_bytes(self) -> int:
        return sum(item.size for item in self.media)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


class AnkisyncdRoot:
    """An ankisyncd data root on disk.

    `path` is the folder holding ``auth.db`` and ``collections/``, or the collections folder
    itself with ``auth.db`` inside it or beside it. `auth_db` names the users database where
    it lives elsewhere.
    """

    def __init__(self, path: Path, auth_db: Path | None = None) -> None:
        path = Path(path)
        if not path.is_dir():
            raise AnkisyncdError(f"ankisyncd data root {path} is not a directory; pass the folder "
                                 f"that holds {AUTH_DB_NAME} and {COLLECTIONS_DIR_NAME}/")
        self.collections = path / COLLECTIONS_DIR_NAME
        if not self.collections.is_dir():
            self.collections = path

        if auth_db is None:
            candidates = [path / AUTH_DB_NAME, path.parent / AUTH_DB_NAME]
            auth_db = next((item for item in candidates if item.is_file()), None)
            if auth_db is None:
                raise AnkisyncdError(
                    f"no {AUTH_DB_NAME} found in {path} or {path.parent}; pass its location "
                    f"with --auth-db (ankisyncd's setting auth_db_path names it)")
        elif not Path(auth_db).is_file():
            raise AnkisyncdError(f"users database {auth_db} not found; check --auth-db")
        self.auth_db = Path(auth_db)

    def read_hashes(self) -> dict[str, str]:
        """Return each user's stored hash by user name, from either auth table layout."""
        try:
            db = _connect_read_only(self.auth_db)
            try:
                columns = [row[1] for row in db.execute("PRAGMA table_info(auth)")]
                if not columns:
                    raise AnkisyncdError(f"{self.auth_db} has no auth table; is it ankisyncd's "
                                         f"users database?")
                name_column = "username" if "username" in columns else "user"
                if name_column not in columns or "hash" not in columns:
                    raise AnkisyncdError(f"{self.auth_db}: auth table has columns {columns}; "
                                         f"expected username and hash")
                rows = db.execute(f"SELECT {name_column}, hash FROM auth").fetchall()
            finally:
                db.close()
        except sqlite3.Error as error:
            raise AnkisyncdError(f"cannot read users database {self.auth_db}: {error}") from None
        return {str(name): str(stored) for name, stored in rows if name is not None}

    def user_folders(self) -> dict[str, Path]:
        """Return each user folder, found by its collection or media folder, by name."""
        folders = {}
        for entry in sorted(self.collections.iterdir()):
            if not entry.is_dir():
                continue
            if (entry / COLLECTION_NAME).is_file() or (entry / MEDIA_DIR_NAME).is_dir():
                folders[entry.name] = entry
        return folders

    def scan(self) -> list[SourceUser]:
        """Return every user found in the users database or as a folder, sorted by name."""
        hashes = self.read_hashes()
        folders = self.user_folders()
        users = []
        for name in sorted(set(hashes) | set(folders)):
            user = SourceUser(name=name, legacy_hash=hashes.get(name), folder=folders.get(name))
            if user.legacy_hash is not None and not is_legacy_hash(user.legacy_hash):
                user.remarks.append("Its password hash in auth.db is not in ankisyncd's salted "
                                    "SHA-256 format, so the old password cannot be checked.")
            if user.folder is not None:
                _read_collection(user)
                _read_media(user)
            users.append(user)
        return users


def _read_collection(user: SourceUser) -> None:
    path = user.folder / COLLECTION_NAME
    if not path.is_file():
        return
    try:
        db = _connect_read_only(path)
        try:
            user.collection_mod = int(db.execute("SELECT mod FROM col").fetchone()[0])
            user.note_count = int(db.execute("SELECT count() FROM notes").fetchone()[0])
        finally:
            db.close()
    except (sqlite3.Error, TypeError) as error:
        user.remarks.append(f"Its collection {path} cannot be read ({error}), so it is not "
                            f"imported; run ankisyncd's or Anki's Check Database on it first.")
        return
    user.collection = path


def _listed_media(media_db: Path) -> dict[str, str | None] | None:
    """Return the media database's entries as name to hex SHA-1 (None if deleted)."""
    try:
        db = _connect_read_only(media_db)
        try:
            rows = db.execute("SELECT fname, csum FROM media").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return {str(name): csum for name, csum in rows}


def _read_media(user: SourceUser) -> None:
    """Collect the user's live media files.

    The media database records what ankisyncd sent to clients, so a file it marks deleted or
    does not list is left behind even if it is still in the folder. Without a readable
    database every file in the folder counts.
    """
    media_dir = user.folder / MEDIA_DIR_NAME
    on_disk = {entry.name: entry for entry in media_dir.iterdir() if entry.is_file()} \
        if media_dir.is_dir() else {}
    listed = _listed_media(user.folder / MEDIA_DB_NAME)
    if listed is None:
        if on_disk:
            user.remarks.append(f"It has no readable {MEDIA_DB_NAME}, so every file in "
                                f"{MEDIA_DIR_NAME}/ is imported.")
        listed = {name: "" for name in on_disk}

    missing = sorted(name for name, csum in listed.items() if csum is not None and name not in on_disk)
    unlisted = sorted(name for name in on_disk if name not in listed)
    deleted_present = sorted(name for name, csum in listed.items() if csum is None and name in on_disk)
    if missing:
        user.remarks.append(f"{len(missing)} media file(s) listed in the media database are "
                            f"missing from {MEDIA_DIR_NAME}/ and cannot be imported: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unlisted or deleted_present:
        skipped = unlisted + deleted_present
        user.remarks.append(f"{len(skipped)} file(s) in {MEDIA_DIR_NAME}/ are deleted or unknown "
                            f"in the media database and are left behind: "
                            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")

    by_nfc: dict[str, MediaFile] = {}
    for name, csum in sorted(listed.items()):
        if csum is None or name not in on_disk:
            continue
        path = on_disk[name]
        data_hash = hashlib.sha1()
        size = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                data_hash.update(chunk)
                size += len(chunk)
        if size == 0:
            # The sync core marks deletions with size 0, so an empty file cannot be stored.
            user.remarks.append(f"Media file {name} is empty and is left behind.")
            continue
        nfc_name = unicodedata.normalize("NFC", name)
        if nfc_name in by_nfc:
            user.remarks.append(f"Media files {by_nfc[nfc_name].path.name!r} and {name!r} have the "
                                f"same name in Unicode NFC form; only the first is imported.")
            continue
        by_nfc[nfc_name] = MediaFile(name=nfc_name, path=path, size=size, sha1=data_hash.digest())
    user.media = list(by_nfc.values())
