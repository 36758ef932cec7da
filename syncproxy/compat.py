"""Environment variables of the bare sync core and of ankisyncd, read as syncproxy settings.

People move to syncproxy with a container definition or a service file written for
`python -m anki.syncserver` or for ankisyncd. Their variables are read, never silently ignored:
each one maps to a native setting, seeds a user, or is reported as having no equivalent, always
with a one-line notice that gives the native name. A variable under one of these prefixes that
is not listed here stops the start with the nearest known name, because a misspelled limit
(MAX_SYNC_UPLOAD_MEGS for MAX_SYNC_PAYLOAD_MEGS) that is silently ignored looks like a limit
that "has no effect".

Variable names come from the sync core's rslib/src/sync/http_server/mod.rs (anki 26.9) and
from ankisyncd's ankisyncd.conf keys, which it reads as ANKISYNCD_<KEY> (ankicommunity's
anki-sync-server), plus ANKISYNCD_USERNAME and ANKISYNCD_PASSWORD of its container images.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from .settings import OPTIONS, OPTIONS_BY_NAME, SettingsError, nearest_name, parse_text
from .users import UserError, UserStore, check_phc, hash_password, validate_name, verify_password

log = logging.getLogger("syncproxy.compat")

PREFIXES = ("SYNC_", "MAX_SYNC_", "ANKISYNCD_", "PASSWORDS_")

# Variable -> the option it sets.
RENAMED: dict[str, str] = {
    "SYNC_HOST": "host",
    "SYNC_PORT": "port",
    "SYNC_BASE": "collections_dir",
    "MAX_SYNC_PAYLOAD_MEGS": "max_body_mb",
    "ANKISYNCD_HOST": "host",
    "ANKISYNCD_PORT": "port",
}

_IMPORT = "ankisyncd's data is not served in place: bring it over once with 'syncproxy import " \
          "ankisyncd DATA_ROOT'"
# Variable -> why it has no effect, and what to do instead.
NO_EFFECT: dict[str, str] = {
    "SYNC_IP_HEADER": "the front end passes each client's address to the sync core itself",
    "ANKISYNCD_DATA_ROOT": _IMPORT,
    "ANKISYNCD_AUTH_DB_PATH": _IMPORT,
    "ANKISYNCD_ROOT": _IMPORT,
    "ANKISYNCD_SESSION_DB_PATH": "host keys need no session database and survive restarts",
    "ANKISYNCD_BASE_URL": "clients use the server's base URL and syncproxy serves /sync/ under it",
    "ANKISYNCD_BASE_MEDIA_URL": "clients use the server's base URL and syncproxy serves /msync/ "
                                "under it",
    "ANKISYNCD_FULL_SYNC_MANAGER": "ankisyncd's Python plug-in classes have no equivalent",
    "ANKISYNCD_SESSION_MANAGER": "ankisyncd's Python plug-in classes have no equivalent",
    "ANKISYNCD_USER_MANAGER": "ankisyncd's Python plug-in classes have no equivalent",
    "ANKISYNCD_COLLECTION_WRAPPER": "ankisyncd's Python plug-in classes have no equivalent",
}

# Read together with SYNC_USERn or each other, never alone.
USER_VARIABLES = ("PASSWORDS_HASHED", "ANKISYNCD_USERNAME", "ANKISYNCD_PASSWORD")
_SYNC_USER_RE = re.compile(r"^SYNC_USER([1-9][0-9]*)$")


@dataclasses.dataclass(frozen=True)
class SeedUser:
    """A user declared in the environment; `secret` is a password or, if `hashed`, a PHC hash.

    The secret never appears in `repr`, logs or messages.
    """

    name: str
    secret: str = dataclasses.field(repr=False)
    hashed: bool
    variable: str


@dataclasses.dataclass
class CompatReading:
    """Settings, notices and users read from the compatibility variables of one environment."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    notices: list[str] = dataclasses.field(default_factory=list)
    seed_users: list[SeedUser] = dataclasses.field(default_factory=list)


def known_names() -> list[str]:
    """Return every variable name this module or the settings table understands."""
    return sorted({*RENAMED, *NO_EFFECT, *USER_VARIABLES, "SYNC_USER1",
                   *(option.env for option in OPTIONS)})


def read_compat_environment(environ: Mapping[str, str]) -> CompatReading:
    """Translate the compatibility variables in `environ`; raise SettingsError on unknown ones."""
    reading = CompatReading()
    for variable in sorted(environ):
        if not variable.startswith(PREFIXES) or variable.startswith("SYNCPROXY_"):
            continue
        if variable in RENAMED:
            option = OPTIONS_BY_NAME[RENAMED[variable]]
            if option.name in reading.values:
                raise SettingsError(
                    f"{variable} and {reading.sources[option.name]} both set {option.name}; "
                    f"unset one, or set {option.env} instead"
                )
            reading.values[option.name] = parse_text(option, environ[variable], variable)
            reading.sources[option.name] = variable
            reading.notices.append(f"{variable} is read as {option.name}; the native name is "
                                   f"{option.env} (or {option.flag})")
        elif variable in NO_EFFECT:
            reading.notices.append(f"{variable} has no effect: {NO_EFFECT[variable]}")
        elif _SYNC_USER_RE.match(variable) or variable in USER_VARIABLES:
            continue
        else:
            hint = nearest_name(variable, known_names())
            nearest = hint.removeprefix("; did you mean ").removesuffix("?")
            if nearest in RENAMED:
                native = OPTIONS_BY_NAME[RENAMED[nearest]]
                hint = f"; did you mean {nearest} (read as {native.name}, natively {native.env})?"
            raise SettingsError(
                f"unknown environment variable {variable}{hint} (syncproxy reads "
                f"{', '.join(p + '*' for p in PREFIXES[:3])} as settings of the sync core or "
                f"ankisyncd; rename or unset it)"
            )
    reading.seed_users = _read_users(environ)
    for user in reading.seed_users:
        reading.notices.append(
            f"{user.variable} declares user {user.name}: it is added to the users file, or its "
            f"password updated, at start; the native way is 'syncproxy user add {user.name}'"
        )
    return reading


def _read_users(environ: Mapping[str, str]) -> list[SeedUser]:
    hashed = "PASSWORDS_HASHED" in environ
    users: list[SeedUser] = []
    numbered = sorted((int(match[1]), variable) for variable in environ
                      if (match := _SYNC_USER_RE.match(variable)))
    for _, variable in numbered:
        # The value contains a password: messages name the variable, never the value.
        name, colon, secret = environ[variable].partition(":")
        if not colon:
            raise SettingsError(f"{variable} has no ':'; expected NAME:PASSWORD"
                                + (" with a PHC hash as the password, because "
                                   "PASSWORDS_HASHED is set" if hashed else ""))
        users.append(SeedUser(name=name, secret=secret, hashed=hashed, variable=variable))

    username = environ.get("ANKISYNCD_USERNAME")
    password = environ.get("ANKISYNCD_PASSWORD")
    if (username is None) != (password is None):
        missing = "ANKISYNCD_PASSWORD" if password is None else "ANKISYNCD_USERNAME"
        raise SettingsError(f"ANKISYNCD_USERNAME and ANKISYNCD_PASSWORD go together; "
                            f"{missing} is missing")
    if username is not None and password is not None:
        users.append(SeedUser(name=username, secret=password, hashed=False,
                              variable="ANKISYNCD_USERNAME"))
    if hashed and not numbered:
        raise SettingsError("PASSWORDS_HASHED is set but no SYNC_USERn variable is; unset it, "
                            "or declare users as SYNC_USER1=NAME:PHC_HASH")

    seen: dict[str, str] = {}
    for user in users:
        try:
            validate_name(user.name)
            if not user.secret:
                raise UserError("the password is empty")
            if user.hashed:
                check_phc(user.secret)
        except UserError as error:
            raise SettingsError(f"{user.variable}: {error}") from None
        if user.name in seen:
            raise SettingsError(f"{seen[user.name]} and {user.variable} both declare user "
                                f"{user.name}; keep one")
        seen[user.name] = user.variable
    return users


def seed_users(store: UserStore, users: list[SeedUser]) -> None:
    """Make the users file agree with users declared in the environment.

    A user not yet in the file is added; one whose password differs gets the declared one,
    as the sync core would. Users that are only in the file stay. A declared PHC hash is
    stored as it is, so host keys that clients got from a bare core in hashed mode stay valid.
    """
    existing = store.load()
    for user in users:
        current = existing.get(user.name)
        if current is not None:
            same = (current.phc == user.secret if user.hashed
                    else verify_password(current.phc, user.secret))
            if same:
                continue
        phc = user.secret if user.hashed else hash_password(user.secret)
        store.put_hash(user.name, phc)
        action = "added" if current is None else "password updated"
        log.info("user %s from environment variable=%s name=%s native='syncproxy user %s %s'",
                 action, user.variable, user.name, "add" if current is None else "passwd",
                 user.name)
