"""Build an ankisyncd data root the way that server left one on disk.

ankisyncd (the archived community sync server) kept, under one folder:

- ``auth.db``: table ``auth (username VARCHAR PRIMARY KEY, hash VARCHAR)``; the hash is
  ``sha256_hex(utf8(username + password) + salt) + salt`` with ``salt`` 16 hex digits;
- ``collections/<username>/collection.anki2``: the collection as the last full upload
  left it, in schema 11 (clients downgrade before a full upload);
- ``collections/<username>/collection.media/``: the media files, and beside it
  ``collection.media.server.db``: table ``media (fname TEXT NOT NULL PRIMARY KEY,
  usn INT NOT NULL, csum TEXT)`` where ``csum`` is the SHA-1 in hex, or NULL once deleted.

Collections are made with the ``anki`` package, so they are real collections.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from anki.collection import Collection


@dataclass
class FixtureUser:
    name: str
    password: str
    fronts: list[str] = field(default_factory=list)
    media: dict[str, bytes] = field(default_factory=dict)
    deleted_media: list[str] = field(default_factory=list)
    has_collection: bool = True


def legacy_hash(username: str, password: str, salt: str | None = None) -> str:
    """Return an auth.db hash in ankisyncd's format."""
    salt = salt or secrets.token_hex(8)
    digest = hashlib.sha256((username + password).encode() + salt.encode()).hexdigest()
    return digest + salt


def default_users() -> list[FixtureUser]:
    """Three users who cover the cases an import meets: media, deletions, no collection."""
    return [
        FixtureUser(
            name="alice",
            password="correct horse:battery",
            fronts=[f"alice question {i}" for i in range(12)],
            media={
                "cat.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200_000),
                "Grüße.mp3": os.urandom(30_000),
                "notes.txt": "plain text with ünïcode\n".encode(),
            },
        ),
        FixtureUser(
            name="bob",
            password="pässwörd",
            fronts=[f"bob question {i}" for i in range(5)],
            media={"diagram.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>"},
            deleted_media=["old.jpg"],
        ),
        FixtureUser(name="carol", password="never synced", has_collection=False),
    ]


def build_collection(user_dir: Path, user: FixtureUser) -> None:
    """Write a schema-11 collection and its media folder into ``user_dir``."""
    scratch = Path(tempfile.mkdtemp(prefix="ankisyncd-fixture-"))
    try:
        col = Collection(str(scratch / "collection.anki2"))
        notetype = col.models.by_name("Basic")
        deck_id = col.decks.id("Default")
        media_names = list(user.media)
        for index, front in enumerate(user.fronts):
            note = col.new_note(notetype)
            note["Front"] = front
            if media_names:
                note["Back"] = f'<img src="{media_names[index % len(media_names)]}">'
            col.add_note(note, deck_id)
        col.close(downgrade=True)

        user_dir.mkdir(parents=True)
        shutil.copyfile(scratch / "collection.anki2", user_dir / "collection.anki2")
    finally:
        shutil.rmtree(scratch)

    media_dir = user_dir / "collection.media"
    media_dir.mkdir()
    db = sqlite3.connect(user_dir / "collection.media.server.db")
    db.executescript(
        "CREATE TABLE media (fname TEXT NOT NULL PRIMARY KEY, usn INT NOT NULL, csum TEXT);"
        "CREATE INDEX idx_media_usn ON media (usn);"
    )
    usn = 0
    for name, data in user.media.items():
        (media_dir / name).write_bytes(data)
        usn += 1
        db.execute("INSERT INTO media VALUES (?, ?, ?)", (name, usn, hashlib.sha1(data).hexdigest()))
    for name in user.deleted_media:
        usn += 1
        db.execute("INSERT INTO media VALUES (?, ?, NULL)", (name, usn))
    db.commit()
    db.close()


def build_root(root: Path, users: list[FixtureUser] | None = None) -> list[FixtureUser]:
    """Create ``root/auth.db`` and ``root/collections/`` for ``users``; return the users."""
    users = default_users() if users is None else users
    root.mkdir(parents=True, exist_ok=True)
    collections = root / "collections"
    collections.mkdir(exist_ok=True)

    auth = sqlite3.connect(root / "auth.db")
    auth.execute("CREATE TABLE IF NOT EXISTS auth (username VARCHAR PRIMARY KEY, hash VARCHAR)")
    for user in users:
        auth.execute("INSERT INTO auth VALUES (?, ?)", (user.name, legacy_hash(user.name, user.password)))
        if user.has_collection:
            build_collection(collections / user.name, user)
    auth.commit()
    auth.close()
    return users
