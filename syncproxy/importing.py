"""Bringing an ankisyncd data root into syncproxy's data directory.

The rule that keeps reruns safe: an import only ever adds data that syncproxy does not have, or
replaces a collection that nobody has changed on syncproxy since the previous import. Anything
else is skipped with a reason in the summary, never overwritten.

Where things go, for each user:

- the password: a pending entry in the users file holding ankisyncd's hash, which the front end
  checks at the user's first login and replaces with a PHC hash; the sync core never sees it;
- ``collection.anki2``: copied with SQLite's backup API to ``collections/<user>/collection.anki2``.
  The sync core opens ankisyncd's schema-11 collections as they are;
- media: files copied into ``collections/<user>/media/``, plus ``media.db`` written in the sync
  core's server media schema. The core never scans the folder, so without ``media.db`` a client
  would receive none of the files.

A new user's folder is built beside the others under a hidden name and renamed into place, so a
running sync core sees either no folder or a complete one. Changing a user who already has
data needs syncproxy stopped: the core keeps both databases locked while it runs, and the import
reports those users as skipped until then.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .ankisyncd import MediaFile, SourceUser, is_legacy_hash
from .users import UserError, validate_name

CORE_COLLECTION_NAME = "collection.anki2"
CORE_MEDIA_DIR_NAME = "media"
CORE_MEDIA_DB_NAME = "media.db"

# The sync core's server media database, schema version 4, as the core in the anki 26.09 wheel
# creates it: csum is the raw SHA-1, size 0 marks a deletion, mtime is in seconds. The core
# migrates older versions on open. A newer version means a newer core, whose layout this code
# does not know, so the import leaves such a database alone.
CORE_MEDIA_DB_VERSION = 4
CORE_MEDIA_DB_SCHEMA = """
CREATE TABLE media (
  fname text NOT NULL PRIMARY KEY,
  csum blob NOT NULL,
  size int NOT NULL,
  usn int NOT NULL,
  mtime int NOT NULL
);
CREATE INDEX ix_usn ON media (usn);
CREATE TABLE meta (
  last_usn int NOT NULL,
  total_bytes int NOT NULL,
  total_nonempty_files int NOT NULL
);
INSERT INTO meta (last_usn, total_bytes, total_nonempty_files) VALUES (0, 0, 0);
"""

RECORD_VERSION = 1


class MigrationError(RuntimeError):
    """An import that cannot go ahead."""


# ---------------------------------------------------------------------------------------------
# The record of earlier imports


class ImportRecord:
    """Each user's collection modification time (col.mod) as the last import wrote it.

    A collection whose col.mod still equals the recorded value has not been changed on syncproxy
    since, so a newer copy from ankisyncd may replace it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.users: dict[str, dict] = {}
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError) as error:
            raise MigrationError(f"import record {self.path} cannot be read ({error}); move it away "
                               f"to import again, which skips every existing collection") from None
        self.users = dict(document.get("users", {}))

    def collection_mod(self, name: str) -> int | None:
        value = self.users.get(name, {}).get("collection_mod")
        return int(value) if value is not None else None

    def set_collection_mod(self, name: str, mod: int) -> None:
        self.users.setdefault(name, {})["collection_mod"] = mod
        self.users[name]["imported_at"] = int(time.time())

    def save(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"version": RECORD_VERSION, "users": self.users}, handle, indent=2,
                      sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class UserPlan:
    """The import's decisions for one user; a `*_reason` explains a skip or a keep."""

    source: SourceUser
    skip_reason: str | None = None
    add_user: bool = False
    user_reason: str = ""
    collection_action: str = "none"  # "copy", "replace", "skip" or "none"
    collection_reason: str = ""
    media_new: list[MediaFile] = field(default_factory=list)
    media_same: int = 0
    media_skipped: list[tuple[str, str]] = field(default_factory=list)
    media_reason: str = ""

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def total_bytes(self) -> int:
        collection_bytes = 0
        if self.collection_action in ("copy", "replace"):
            collection_bytes = self.source.collection.stat().st_size
        return collection_bytes + sum(item.size for item in self.media_new)


def _target_collection_mod(path: Path) -> int:
    """Return col.mod of a collection in the data directory; raise sqlite3.Error if busy."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=0.5)
    try:
        return int(db.execute("SELECT mod FROM col").fetchone()[0])
    finally:
        db.close()


def _target_media(path: Path) -> dict[str, tuple[bytes, int]]:
    """Return the sync core's media entries as name to (sha1, size); raise sqlite3.Error if busy."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=0.5)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != CORE_MEDIA_DB_VERSION:
            raise MigrationError(f"{path} has media schema version {version}; this syncproxy "
                               f"writes only version {CORE_MEDIA_DB_VERSION}")
        rows = db.execute("SELECT fname, csum, size FROM media").fetchall()
    finally:
        db.close()
    return {name: (bytes(csum), size) for name, csum, size in rows}


BUSY_REASON = "syncproxy's sync core has its database open; stop syncproxy and run the import again"


def _plan_collection(plan: UserPlan, target_dir: Path, record: ImportRecord) -> None:
    source = plan.source
    if source.collection is None:
        plan.collection_reason = "no collection on ankisyncd"
        return
    target = target_dir / CORE_COLLECTION_NAME
    if not target.exists():
        plan.collection_action = "copy"
        return

    try:
        target_mod = _target_collection_mod(target)
    except sqlite3.Error as error:
        plan.collection_action = "skip"
        plan.collection_reason = BUSY_REASON if "locked" in str(error) else \
            f"syncproxy's copy cannot be read ({error})"
        return
    recorded_mod = record.collection_mod(source.name)
    if recorded_mod is None:
        plan.collection_action = "skip"
        plan.collection_reason = ("syncproxy already has a collection for this user that did not "
                                  "come from an ankisyncd import; kept syncproxy's")
    elif target_mod != recorded_mod:
        plan.collection_action = "skip"
        plan.collection_reason = "changed on syncproxy since the last import; kept syncproxy's"
    elif source.collection_mod == recorded_mod:
        plan.collection_reason = "unchanged since the last import"
    elif source.collection_mod > recorded_mod:
        # NOTE: a running core that has not opened this collection yet leaves no lock to detect,
        # so a replace while syncproxy runs can race a first sync; the docs say to stop it.
        plan.collection_action = "replace"
        plan.collection_reason = "newer on ankisyncd and unchanged on syncproxy since the last import"
    else:
        plan.collection_action = "skip"
        plan.collection_reason = "ankisyncd's copy is older than the one imported before"


def _plan_media(plan: UserPlan, target_dir: Path) -> None:
    if not plan.source.media:
        return
    media_db = target_dir / CORE_MEDIA_DB_NAME
    if not media_db.exists():
        plan.media_new = list(plan.source.media)
        return

    try:
        existing = _target_media(media_db)
    except (sqlite3.Error, MigrationError) as error:
        plan.media_reason = BUSY_REASON if "locked" in str(error) else str(error)
        plan.media_skipped = [(item.name, plan.media_reason) for item in plan.source.media]
        return
    for item in plan.source.media:
        entry = existing.get(item.name)
        if entry is None:
            plan.media_new.append(item)
        elif entry[1] == 0:
            plan.media_skipped.append((item.name, "deleted on syncproxy since the last import"))
        elif entry[0] == item.sha1:
            plan.media_same += 1
        else:
            plan.media_skipped.append((item.name, "differs from syncproxy's file; kept syncproxy's"))


def plan_import(sources: list[SourceUser], collections: Path, existing_users: set[str],
                record: ImportRecord) -> list[UserPlan]:
    """Decide, for each ankisyncd user, what an import adds, replaces or skips, and why."""
    plans = []
    for source in sources:
        plan = UserPlan(source=source)
        plans.append(plan)
        try:
            validate_name(source.name)
        except UserError as error:
            plan.skip_reason = f"the name cannot be used: {error}"
            continue

        if source.name in existing_users:
            plan.user_reason = "already a syncproxy user; password unchanged"
        elif source.legacy_hash is None:
            plan.skip_reason = (f"has data but no entry in auth.db; add the user with 'syncproxy "
                                f"user add {source.name}' and run the import again")
            continue
        elif not is_legacy_hash(source.legacy_hash):
            plan.skip_reason = ("its auth.db hash is not in ankisyncd's format; add the user with "
                                f"'syncproxy user add {source.name}' and run the import again")
            continue
        else:
            plan.add_user = True
            plan.user_reason = "old password accepted until the first login replaces it"

        target_dir = collections / source.name
        _plan_collection(plan, target_dir, record)
        _plan_media(plan, target_dir)
    return plans


# ---------------------------------------------------------------------------------------------
# Carrying out the plan


ProgressCallback = Callable[[int, str], None]


def _copy_collection(source: Path, destination: Path) -> None:
    """Copy a live SQLite database consistently, then move it into place."""
    temporary = destination.with_name(f".{destination.name}.import-tmp")
    temporary.unlink(missing_ok=True)
    reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    writer = sqlite3.connect(temporary)
    try:
        reader.backup(writer)
    finally:
        writer.close()
        reader.close()
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    # A write-ahead log left by a stopped core belongs to the old file and would corrupt the new one.
    for suffix in ("-wal", "-shm"):
        destination.with_name(destination.name + suffix).unlink(missing_ok=True)
    os.replace(temporary, destination)


def _copy_media_file(item: MediaFile, media_dir: Path) -> None:
    destination = media_dir / item.name
    temporary = media_dir / f".{item.name}.import-tmp"
    shutil.copyfile(item.path, temporary)
    os.replace(temporary, destination)


def _register_media(media_db: Path, added: list[MediaFile]) -> None:
    """Add entries to the sync core's media database in one transaction, creating it if needed."""
    create = not media_db.exists()
    db = sqlite3.connect(media_db, isolation_level=None, timeout=0.5)
    try:
        db.execute("BEGIN EXCLUSIVE")
        if create:
            for statement in CORE_MEDIA_DB_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {CORE_MEDIA_DB_VERSION}")
        last_usn, total_bytes, total_files = db.execute(
            "SELECT last_usn, total_bytes, total_nonempty_files FROM meta").fetchone()
        now = int(time.time())
        for item in added:
            last_usn += 1
            db.execute("INSERT OR REPLACE INTO media (fname, csum, size, usn, mtime) "
                       "VALUES (?, ?, ?, ?, ?)", (item.name, item.sha1, item.size, last_usn, now))
            total_bytes += item.size
            total_files += 1
        db.execute("UPDATE meta SET last_usn = ?, total_bytes = ?, total_nonempty_files = ?",
                   (last_usn, total_bytes, total_files))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def _write_user_data(plan: UserPlan, user_dir: Path, progress: ProgressCallback) -> None:
    if plan.collection_action in ("copy", "replace"):
        user_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _copy_collection(plan.source.collection, user_dir / CORE_COLLECTION_NAME)
        progress(plan.source.collection.stat().st_size, f"{plan.name}: collection")
    if plan.media_new:
        media_dir = user_dir / CORE_MEDIA_DIR_NAME
        media_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for item in plan.media_new:
            _copy_media_file(item, media_dir)
            progress(item.size, f"{plan.name}: {item.name}")
        # Files first, entries second: an entry never points at a file that is not there yet.
        _register_media(user_dir / CORE_MEDIA_DB_NAME, plan.media_new)


def apply_plan(plans: list[UserPlan], collections: Path, record: ImportRecord,
               add_pending_user: Callable[[str, str], None],
               progress: ProgressCallback = lambda size, label: None) -> None:
    """Write what `plans` decided into the data directory, one user at a time.

    `add_pending_user(name, legacy_hash)` stores a user whose password is still ankisyncd's.
    A user is added only after their data is in place, so they cannot log in to an empty
    collection half-way through.
    """
    collections.mkdir(mode=0o700, parents=True, exist_ok=True)
    for plan in plans:
        if plan.skip_reason is not None:
            continue
        final_dir = collections / plan.name
        if final_dir.exists():
            _write_user_data(plan, final_dir, progress)
        elif plan.collection_action != "none" or plan.media_new:
            staging = collections / f".import-{plan.name}"
            shutil.rmtree(staging, ignore_errors=True)
            _write_user_data(plan, staging, progress)
            os.rename(staging, final_dir)

        if plan.collection_action in ("copy", "replace"):
            record.set_collection_mod(plan.name, plan.source.collection_mod)
            record.save()
        if plan.add_user:
            add_pending_user(plan.name, plan.source.legacy_hash)


# ---------------------------------------------------------------------------------------------
# What a person reads


def format_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def describe_plan(plans: list[UserPlan]) -> list[str]:
    """Return summary lines that list, per user, what the import does or did and why."""
    lines = []
    for plan in plans:
        lines.append(f"{plan.name}:")
        if plan.skip_reason is not None:
            lines.append(f"  skipped: {plan.skip_reason}")
            continue
        lines.append(f"  user: {'add' if plan.add_user else 'keep'} ({plan.user_reason})")

        source = plan.source
        if plan.collection_action in ("copy", "replace"):
            lines.append(f"  collection: {plan.collection_action}, {source.note_count} notes, "
                         f"{format_bytes(source.collection.stat().st_size)}"
                         + (f" ({plan.collection_reason})" if plan.collection_reason else ""))
        elif plan.collection_action == "skip":
            lines.append(f"  collection: skip ({plan.collection_reason})")
        else:
            lines.append(f"  collection: nothing to do ({plan.collection_reason})")

        new_bytes = sum(item.size for item in plan.media_new)
        media_parts = [f"{len(plan.media_new)} new ({format_bytes(new_bytes)})"]
        if plan.media_same:
            media_parts.append(f"{plan.media_same} already there")
        if plan.media_skipped:
            media_parts.append(f"{len(plan.media_skipped)} skipped")
        lines.append(f"  media: {', '.join(media_parts)}")
        for name, reason in plan.media_skipped[:10]:
            lines.append(f"    skipped {name}: {reason}")
        if len(plan.media_skipped) > 10:
            lines.append(f"    ... and {len(plan.media_skipped) - 10} more skipped")
        for remark in source.remarks:
            lines.append(f"  note: {remark}")
    return lines


def summarize(plans: list[UserPlan]) -> str:
    """Return one closing line with the totals."""
    skipped_users = sum(1 for plan in plans if plan.skip_reason is not None)
    added = sum(1 for plan in plans if plan.add_user)
    kept = len(plans) - skipped_users - added
    collections = {action: sum(1 for plan in plans if plan.collection_action == action)
                   for action in ("copy", "replace", "skip")}
    media_added = sum(len(plan.media_new) for plan in plans)
    media_bytes = sum(item.size for plan in plans for item in plan.media_new)
    media_skipped = sum(len(plan.media_skipped) for plan in plans)
    return (f"{len(plans)} ankisyncd users: {added} added, {kept} kept, {skipped_users} skipped; "
            f"collections: {collections['copy']} copied, {collections['replace']} replaced, "
            f"{collections['skip']} skipped; media: {media_added} files added "
            f"({format_bytes(media_bytes)}), {media_skipped} skipped")


class TerminalProgress:
    """A one-line progress bar on a terminal; silent when the stream is not a terminal."""

    WIDTH = 30

    def __init__(self, total_bytes: int, stream: TextIO = sys.stderr) -> None:
        self.total = max(total_bytes, 1)
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty()

    def __call__(self, size: int, label: str) -> None:
        self.done += size
        if not self.enabled:
            return
        fraction = min(self.done / self.total, 1.0)
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {fraction:4.0%} {format_bytes(self.done)} {label[:40]:<40}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
