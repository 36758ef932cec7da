"""Sync users: name rules, PHC password hashes and the users file.

The sync core takes users as `SYNC_USERn=name:hash` with `PASSWORDS_HASHED` set, and derives each
client's host key as hex(sha1("name:hash")). The users file therefore decides both who may log in
and which host keys are valid: a new hash (a new password, or the same password with a new salt)
invalidates every host key the user had.

Users imported from ankisyncd first sit in the file's "pending" section with ankisyncd's own
password hash. The sync core never sees them: at their first login the front end checks the
password against that hash and moves the user into "users" with a PHC hash.

`user revoke` uses the same section to end every session of a user without knowing the
password: the user moves to "pending" with its current PHC hash, so every host key stops working,
and the next login re-hashes the same password with a new salt, which gives a new host key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .ankisyncd import is_legacy_hash, verify_legacy_password

PBKDF2_ROUNDS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256; about 0.15 s per login.
SALT_BYTES = 16
MAX_NAME_BYTES = 64

# The format the sync core accepts: $pbkdf2-sha256$i=ROUNDS,l=32$SALT$HASH, unpadded base64.
# The core parses hashes with the Rust `password-hash` crate, which takes a salt of at most
# 64 base64 characters and a hash output of 10 to 64 bytes. A longer one passes a looser check
# and then panics the core at login (seen with anki 26.9.3).
_PHC_RE = re.compile(
    r"^\$pbkdf2-(?P<digest>sha256|sha512)\$i=(?P<rounds>[0-9]{1,9}),l=(?P<length>[0-9]{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/]{11,64})\$(?P<hash>[A-Za-z0-9+/]{22,86})$"
)
MAX_HASH_OUTPUT_BYTES = 64


class UserError(ValueError):
    """A user name, password or users file that cannot be used."""


def validate_name(name: str) -> None:
    """Raise UserError unless `name` is safe as the sync core's folder name for the user."""
    if not name:
        raise UserError("user name is empty")
    if name in (".", ".."):
        raise UserError(f"user name {name!r} is not allowed: it names a directory, not a folder "
                        "of its own")
    if "/" in name or "\\" in name:
        raise UserError(f"user name {name!r} contains a path separator; the name becomes a "
                        "folder name, so use letters, digits, '-', '_', '.' or '@'")
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise UserError(f"user name {name!r} contains a control character")
    if ":" in name:
        raise UserError(f"user name {name!r} contains ':', which separates name and password "
                        "for the sync core")
    if name != name.strip():
        raise UserError(f"user name {name!r} starts or ends with white space")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UserError(f"user name is {len(name.encode('utf-8'))} bytes long; the limit is "
                        f"{MAX_NAME_BYTES} bytes")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, rounds: int = PBKDF2_ROUNDS) -> str:
    """Return a PHC pbkdf2-sha256 string for `password` with a fresh random salt."""
    if not password:
        raise UserError("password is empty")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds)
    return f"$pbkdf2-sha256$i={rounds},l={len(digest)}${_b64(salt)}${_b64(digest)}"


def check_phc(phc: str) -> None:
    """Raise UserError unless `phc` is a hash the sync core can verify.

    The core does not check hashes at start: a malformed one panics at the first login that
    touches it, while holding the core's only lock, and every later sync then fails.
    """
    match = _PHC_RE.match(phc)
    if match is None:
        raise UserError("password hash is not in the $pbkdf2-sha256$i=N,l=32$salt$hash format")
    try:
        salt = _unb64(match["salt"])
        digest = _unb64(match["hash"])
    except binascii.Error:
        raise UserError("password hash has invalid base64 in its salt or hash") from None
    if not 1_000 <= int(match["rounds"]) <= 10_000_000:
        raise UserError(f"password hash has {match['rounds']} rounds; expected 1000 to 10000000")
    if int(match["length"]) != len(digest) or len(salt) < 8:
        raise UserError("password hash has a salt or length that does not match its parameters")
    if len(digest) > MAX_HASH_OUTPUT_BYTES:
        raise UserError(f"password hash output is {len(digest)} bytes; the sync core accepts at "
                        f"most {MAX_HASH_OUTPUT_BYTES}")


def verify_password(phc: str, password: str) -> bool:
    """Return whether `password` matches the PHC string `phc`."""
    match = _PHC_RE.match(phc)
    if match is None:
        return False
    digest = hashlib.pbkdf2_hmac(
        match["digest"], password.encode("utf-8"), _unb64(match["salt"]), int(match["rounds"]),
        dklen=int(match["length"]),
    )
    return hmac.compare_digest(digest, _unb64(match["hash"]))


def host_key(name: str, phc: str) -> str:
    """Return the host key the sync core issues for this user entry."""
    return hashlib.sha1(f"{name}:{phc}".encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class User:
    """One sync user as stored in the users file."""

    name: str
    phc: str
    created: float

    @property
    def host_key(self) -> str:
        return host_key(self.name, self.phc)


@dataclass(frozen=True)
class PendingUser:
    """A user whose password is checked by the front end at the next login, then re-hashed.

    Exactly one of the secret hashes is set: `ankisyncd_hash` for a user imported from
    ankisyncd, `phc` for a user whose sessions were revoked.
    """

    name: str
    ankisyncd_hash: str = field(repr=False)
    created: float
    phc: str = field(default="", repr=False)

    def verify(self, password: str) -> bool:
        if self.phc:
            return verify_password(self.phc, password)
        return verify_legacy_password(self.name, password, self.ankisyncd_hash)


def write_json_file(path: Path, document: dict) -> None:
    """Replace `path` with `document` as JSON, atomically, mode 0600, synced to disk."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """Return a fingerprint of `path` that changes whenever the file is rewritten, or None."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class UserStore:
    """The users file: a JSON document written atomically with mode 0600.

    Every change takes an exclusive lock on a sibling lock file, so two `syncproxy user`
    commands run at once cannot lose each other's change.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def _read_document(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as error:
            raise UserError(f"users file {self.path} is not valid JSON ({error}); restore it "
                            "from a backup or remove it and add the users again") from None

    def load(self) -> dict[str, User]:
        """Return the users by name; a missing file means no users."""
        document = self._read_document()
        users = {}
        for name, entry in document.get("users", {}).items():
            try:
                validate_name(name)
                check_phc(entry["hash"])
            except (UserError, KeyError, TypeError) as error:
                raise UserError(f"users file {self.path}: entry {name!r} is invalid: "
                                f"{error}") from None
            users[name] = User(name=name, phc=entry["hash"], created=entry.get("created", 0.0))
        return users

    def load_pending(self) -> dict[str, PendingUser]:
        """Return the users whose password the front end checks at their next login."""
        pending = {}
        for name, entry in self._read_document().get("pending", {}).items():
            try:
                validate_name(name)
                if "hash" in entry:
                    check_phc(entry["hash"])
                elif not is_legacy_hash(entry["ankisyncd_hash"]):
                    raise UserError("ankisyncd_hash is not 80 lower-case hex digits")
            except (UserError, KeyError, TypeError) as error:
                raise UserError(f"users file {self.path}: pending entry {name!r} is invalid: "
                                f"{error}") from None
            pending[name] = PendingUser(name=name, ankisyncd_hash=entry.get("ankisyncd_hash", ""),
                                        phc=entry.get("hash", ""),
                                        created=entry.get("created", 0.0))
        return pending

    def signature(self) -> tuple[int, int, int] | None:
        """Return a cheap fingerprint of the file that changes whenever it is rewritten."""
        return file_signature(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[dict[str, User], dict[str, PendingUser]]]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users = self.load()
            pending = self.load_pending()
            yield users, pending
            self._write(users, pending)
        finally:
            os.close(fd)

    def _write(self, users: dict[str, User], pending: dict[str, PendingUser]) -> None:
        document: dict = {
            "version": 1,
            "users": {
                user.name: {"hash": user.phc, "created": user.created}
                for user in sorted(users.values(), key=lambda user: user.name)
            },
        }
        if pending:
            document["pending"] = {
                user.name: ({"hash": user.phc} if user.phc
                            else {"ankisyncd_hash": user.ankisyncd_hash})
                | {"created": user.created}
                for user in sorted(pending.values(), key=lambda user: user.name)
            }
        write_json_file(self.path, document)

    def add(self, name: str, password: str) -> User:
        validate_name(name)
        phc = hash_password(password)
        with self._locked() as (users, pending):
            if name in users or name in pending:
                raise UserError(f"user {name!r} already exists; use 'syncproxy user passwd "
                                f"{name}' to change the password")
            user = User(name=name, phc=phc, created=time.time())
            users[name] = user
        return user

    def set_password(self, name: str, password: str) -> User:
        phc = hash_password(password)
        with self._locked() as (users, pending):
            if name in pending:
                user = User(name=name, phc=phc, created=pending.pop(name).created)
            elif name in users:
                user = User(name=name, phc=phc, created=users[name].created)
            else:
                raise UserError(f"user {name!r} not found; 'syncproxy user list' shows the users")
            users[name] = user
        return user

    def put_hash(self, name: str, phc: str) -> User:
        """Add the user or replace its hash with `phc`; a pending user becomes an active one."""
        validate_name(name)
        check_phc(phc)
        with self._locked() as (users, pending):
            if name in pending:
                created = pending.pop(name).created
            else:
                created = users[name].created if name in users else time.time()
            user = User(name=name, phc=phc, created=created)
            users[name] = user
        return user

    def remove(self, name: str) -> None:
        with self._locked() as (users, pending):
            if name in pending:
                del pending[name]
            elif name in users:
                del users[name]
            else:
                raise UserError(f"user {name!r} not found; 'syncproxy user list' shows the users")

    def revoke(self, name: str) -> None:
        """End every session of `name`; the next login with the same password starts anew."""
        with self._locked() as (users, pending):
            if name in pending:
                return
            if name not in users:
                raise UserError(f"user {name!r} not found; 'syncproxy user list' shows the users")
            user = users.pop(name)
            pending[name] = PendingUser(name=name, ankisyncd_hash="", phc=user.phc,
                                        created=user.created)

    def add_pending(self, name: str, ankisyncd_hash: str) -> PendingUser:
        """Add a user who logs in with their ankisyncd password until the first login."""
        validate_name(name)
        if not is_legacy_hash(ankisyncd_hash):
            raise UserError(f"password hash of {name!r} is not in ankisyncd's salted SHA-256 "
                            f"format")
        with self._locked() as (users, pending):
            if name in users or name in pending:
                raise UserError(f"user {name!r} already exists")
            user = PendingUser(name=name, ankisyncd_hash=ankisyncd_hash, created=time.time())
            pending[name] = user
        return user

    def upgrade_pending(self, name: str, password: str, rounds: int = PBKDF2_ROUNDS) -> User | None:
        """Replace a pending user's ankisyncd hash with a PHC hash if `password` matches it.

        Return the upgraded user, or None if `name` is not pending or the password is wrong.
        """
        entry = self.load_pending().get(name)
        if entry is None or not entry.verify(password):
            return None
        phc = hash_password(password, rounds)
        with self._locked() as (users, pending):
            current = pending.get(name)
            # Another login or a 'user passwd' may have changed the entry while this one hashed.
            if current is None or current != entry:
                return users.get(name)
            user = User(name=name, phc=phc, created=current.created)
            del pending[name]
            users[name] = user
        return user
