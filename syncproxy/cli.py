"""The `syncproxy` command line. Serving is the default command: `syncproxy --port 444`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sqlite3
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .ankisyncd import AnkisyncdError
from .backup import BackupError, create_backup, restore_backup
from .control import ControlError, connect
from .core import CoreError
from .cores import CoreAssignment, CoreAssignmentError, resolve_core_count
from .datadir import DataDir, DataDirError
from .importing import MigrationError
from .settings import (
    OPTIONS,
    LoadedSettings,
    SettingsError,
    convert_cli_value,
    display_value,
    example_toml,
    load_settings,
    nearest_name,
)
from .tls import (
    CertificateError,
    CertificatePaths,
    ensure_generated,
    generated_names,
    trust_anchor_pem,
)
from .users import UserError, UserStore

COMMANDS = ("serve", "user", "cert", "config", "health", "import", "backup", "restore", "cores")
log = logging.getLogger("syncproxy")


class CommandError(Exception):
    """A command failed in a way the user can fix; the message explains how."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that takes only whole flag names and names the nearest one.

    Abbreviations are off because they would let `--max-body 5` stand for `--max-body-mb` and
    keep the flags from mapping one to one onto the settings' other names.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [option.flag for option in OPTIONS] + [
                "--config", "--password-stdin", "--no-tls", "--help", "--version"]
            hints = [nearest_name(word.split("=")[0], known) for word in message.split()[2:]
                     if word.startswith("--")]
            message += "".join(hint for hint in hints if hint)
        super().error(message)


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every option in the settings table; unset flags stay out of the result."""
    group = parser.add_argument_group("settings (each also SYNCPROXY_<NAME> or a TOML key)")
    group.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                       help="TOML settings file (default: SYNCPROXY_CONFIG, then "
                            "syncproxy.toml in the data directory)")
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS,
                                  "help": f"{option.help} [{option.env}]"}
        if option.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif option.kind == "list":
            kwargs["action"] = "append"
        else:
            kwargs["type"] = {"int": int, "float": float}.get(option.kind, str)
        if option.choices:
            kwargs["choices"] = option.choices
        group.add_argument(option.flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    options = _Parser(add_help=False)
    _add_option_flags(options)

    parser = _Parser(
        prog="syncproxy",
        description="HTTP/1.1-only TLS front end and bundled sync server for Anki.",
        epilog="Without a command, syncproxy serves: 'syncproxy --port 444'.",
    )
    parser.add_argument("--version", action="version", version=f"syncproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser("serve", parents=[options], help="run the front end and the sync core")

    user = commands.add_parser("user", help="add, list, remove users or change passwords")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    for action, help_text in (("add", "add a user"), ("passwd", "change a user's password")):
        sub = user_commands.add_parser(action, parents=[options], help=help_text)
        sub.add_argument("name")
        sub.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of standard input")
    user_commands.add_parser("list", parents=[options],
                             help="list users with their collection size and last sync")
    sub = user_commands.add_parser("remove", parents=[options], help="remove a user")
    sub.add_argument("name")
    sub = user_commands.add_parser(
        "revoke", parents=[options],
        help="end every session of a user: each device must log in again (same password)")
    sub.add_argument("name")

    cert = commands.add_parser("cert", help="certificate tools")
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    cert_commands.add_parser("pem", parents=[options],
                             help="print the PEM certificate clients must trust")
    cert_commands.add_parser("status", parents=[options],
                             help="show the served certificate's names, issuer, expiry, source "
                                  "and next renewal check")

    config = commands.add_parser("config", help="show or check settings")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION",
                                            required=True)
    config_commands.add_parser("show", parents=[options],
                               help="print every effective setting and where it came from")
    sub = config_commands.add_parser("check", help="validate a TOML settings file")
    sub.add_argument("file", type=Path)
    config_commands.add_parser("example", help="print a settings file that documents every key")

    sub = commands.add_parser("backup", parents=[options],
                              help="write a consistent archive of the data directory, also "
                                   "while the server runs")
    sub.add_argument("dest", type=Path, metavar="DEST",
                     help="archive file (.tar.gz, .tgz or .tar) or an existing directory")
    sub = commands.add_parser("restore", parents=[options],
                              help="fill an empty data directory from a backup archive")
    sub.add_argument("archive", type=Path, metavar="ARCHIVE")

    importer = commands.add_parser("import", help="bring users and data over from another "
                                                  "sync server")
    import_sources = importer.add_subparsers(dest="import_source", metavar="SOURCE",
                                             required=True)
    sub = import_sources.add_parser(
        "ankisyncd", parents=[options],
        help="import users, collections and media from an ankisyncd data root",
        description="Import users, collections and media from ankisyncd. Users keep their "
                    "passwords. Running it again adds only what is missing and never "
                    "overwrites data changed on syncproxy.")
    sub.add_argument("path", type=Path,
                     help="ankisyncd's folder with auth.db and collections/, or its "
                          "collections folder")
    sub.add_argument("--auth-db", type=Path, default=None,
                     help="ankisyncd's users database (auth_db_path in ankisyncd.conf) when it "
                          "is not in PATH or its parent")
    sub.add_argument("--dry-run", action="store_true",
                     help="print what would be imported and write nothing")

    commands.add_parser("health", parents=[options],
                        help="exit 0 if the local server is healthy (for container checks)")

    cores = commands.add_parser("cores", help="show or even out which sync core serves which "
                                              "user (with --cores N)")
    cores_commands = cores.add_subparsers(dest="cores_command", metavar="ACTION", required=True)
    cores_commands.add_parser("show", parents=[options],
                              help="print the users of each sync core")
    sub = cores_commands.add_parser(
        "rebalance", parents=[options],
        help="move users so that every sync core serves about as many users; a running "
             "server applies the moves within seconds")
    sub.add_argument("--dry-run", action="store_true",
                     help="print the moves and change nothing")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]
    return build_parser().parse_args(argv)


def settings_from(args: argparse.Namespace) -> LoadedSettings:
    cli_values = {
        option.name: convert_cli_value(option, getattr(args, option.name))
        for option in OPTIONS if hasattr(args, option.name)
    }
    return load_settings(cli_values, cli_config=getattr(args, "config", None))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO, and a legacy media URL carries the host key.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ")
            repeated = getpass.getpass("Repeat password: ")
        except EOFError:
            raise CommandError("no terminal to ask for the password (with docker exec, add -it); "
                               "or pass it on standard input with --password-stdin") from None
        if repeated != password:
            raise CommandError("the two passwords differ; nothing was changed")
    if not password:
        raise CommandError("the password is empty; nothing was changed")
    return password


def server_running(data_dir: DataDir) -> bool:
    """Return True if a server accepts connections on the data directory's control socket."""
    try:
        connection = connect(data_dir.control_socket, timeout=2.0)
    except OSError:
        return False  # a socket this user may not use counts as no server for the message
    if connection is None:
        return False
    connection.close()
    return True


def command_user(args: argparse.Namespace, settings: Any) -> int:
    data_dir = DataDir.from_settings(settings)
    store = UserStore(data_dir.users_file)
    if args.user_command == "add":
        from .users import validate_name
        validate_name(args.name)
        store.add(args.name, read_password(args))
        if server_running(data_dir):
            print(f"added user {args.name}; the running server picks it up within seconds")
        else:
            print(f"added user {args.name}; the server picks it up when it starts")
    elif args.user_command == "passwd":
        store.set_password(args.name, read_password(args))
        print(f"changed the password of {args.name}; its devices must log in again")
    elif args.user_command == "remove":
        store.remove(args.name)
        print(f"removed user {args.name}; its collection stays in {data_dir.collections}")
    elif args.user_command == "revoke":
        store.revoke(args.name)
        print(f"revoked every session of {args.name}; each device must log in again with the "
              f"same password")
    elif args.user_command == "list":
        users = store.load()
        pending = store.load_pending()
        if not users and not pending:
            print("no users; add one with: syncproxy user add NAME")
            return 0
        names = sorted(set(users) | set(pending))
        width = max(len("USER"), *(len(name) for name in names))
        core_of = user_cores(data_dir, store, settings)
        core_header = "CORE  " if core_of is not None else ""
        print(f"{'USER':<{width}}  {core_header}{'COLLECTION':>10}  LAST SYNC")
        for name in names:
            size, last = collection_usage(data_dir.collections / name)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never"
            note = ""
            if name in pending:
                note = ("  (sessions revoked; not logged in since)" if pending[name].phc
                        else "  (imported from ankisyncd; not logged in yet)")
            core = ""
            if core_of is not None:
                # A user added since the server's last look gets its core within seconds.
                core = f"{core_of.get(name, '-')!s:<4}  "
            print(f"{name:<{width}}  {core}{_format_size(size):>10}  {when}{note}")
    return 0


def user_cores(data_dir: DataDir, store: UserStore, settings: Any) -> dict[str, int] | None:
    """Return each user's sync core, or None when one core serves everyone."""
    assignment = CoreAssignment(data_dir.cores_file, store.lock_path)
    try:
        core_of, recorded = assignment.read()
    except CoreAssignmentError as error:
        print(f"syncproxy: warning: cores not shown: {error}", file=sys.stderr)
        return None
    count = recorded if recorded is not None else resolve_core_count(settings.cores)
    return core_of if count > 1 else None


def command_cores(args: argparse.Namespace, settings: Any) -> int:
    data_dir = DataDir.from_settings(settings)
    store = UserStore(data_dir.users_file)
    assignment = CoreAssignment(data_dir.cores_file, store.lock_path)
    if args.cores_command == "show":
        core_of, count = assignment.read()
        if count is None:
            print(f"no core assignment yet in {data_dir.cores_file}; the server writes it when "
                  f"it starts")
            return 0
        print(f"{count} sync core(s), as the server last ran:")
        for index in range(count):
            names = sorted(name for name, core in core_of.items() if core == index)
            print(f"core {index}: {len(names)} user(s)  {' '.join(names)}".rstrip())
        waiting = sorted(set(store.load()) - set(core_of))
        if waiting:
            print(f"no core yet: {' '.join(waiting)} (the server assigns them when it next reads "
                  f"the users file)")
        return 0

    moves, count = assignment.rebalance(dry_run=args.dry_run)
    if not moves:
        print(f"the {count} sync core(s) already serve about as many users each; nothing to move")
        return 0
    for move in moves:
        print(f"move {move.user}: core {move.source} -> core {move.target}")
    if args.dry_run:
        print(f"dry run: {len(moves)} move(s) planned over {count} cores; nothing was changed")
        return 0
    if server_running(data_dir):
        print(f"moved {len(moves)} user(s) in {data_dir.cores_file}. The running server applies "
              f"it within seconds: it restarts the cores involved once their syncs in flight "
              f"finish. No collection moves on disk.")
    else:
        print(f"moved {len(moves)} user(s) in {data_dir.cores_file}; the server uses it at its "
              f"next start. No collection moves on disk.")
    return 0


def collection_usage(folder: Path) -> tuple[int, float | None]:
    """Return the bytes under a user's folder and the time of the newest synced change.

    Only file metadata is read, because the running sync core holds the databases open
    exclusively. The sync core opens media.db (and empties its WAL) at every start, so those
    two files say nothing about syncs; the collection, its WAL and the media files do. A
    checkpoint when the core stops can move the time from the last sync to that stop.
    """
    total = 0
    newest: float | None = None
    for directory, _folders, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue  # removed by a sync while we walked
            total += info.st_size
            if name in ("media.db", "media.db-wal") or (name.endswith("-wal")
                                                         and info.st_size == 0):
                continue
            newest = info.st_mtime if newest is None else max(newest, info.st_mtime)
    return total, newest


def _format_size(size: int) -> str:
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KiB" if size else "0"
    return f"{size / (1024 * 1024):.1f} MiB"


def command_cert(args: argparse.Namespace, settings: Any) -> int:
    if args.cert_command == "status":
        return command_cert_status(settings)
    if settings.cert:
        paths = CertificatePaths(chain=Path(settings.cert), key=Path(settings.key),
                                 source="files")
    else:
        data_dir = DataDir.from_settings(settings)
        data_dir.prepare()
        paths = ensure_generated(data_dir.tls_dir, generated_names(settings))
    sys.stdout.write(trust_anchor_pem(paths).decode("ascii"))
    return 0


def command_cert_status(settings: Any) -> int:
    """Print what the server serves with these settings, read from the files it would load."""
    from .acme import AcmeStatus, Certbot, options_from
    from .certreload import describe_certificate

    data_dir = DataDir.from_settings(settings)
    renewal = ""
    if settings.cert:
        source, chain = "files", Path(settings.cert)
        renewal = "not renewed by syncproxy; a change to the files is loaded within seconds"
    elif settings.domain:
        certbot = Certbot(options_from(settings), data_dir.acme_dir)
        status = AcmeStatus.read(certbot.status_file)
        if certbot.fullchain.exists():
            source, chain = "acme", certbot.fullchain
        else:
            source, chain = "generated (no ACME certificate yet)", data_dir.tls_dir / "server.pem"
        renewal = "checked when the server starts"
        if status is not None and status.next_check:
            renewal = f"next check {status.next_check}"
        if status is not None and status.last_result:
            renewal += f"; last check {status.last_check}: {status.last_result}"
            if status.last_error:
                renewal += f" ({status.last_error})"
    else:
        source, chain = "generated", data_dir.tls_dir / "server.pem"
        renewal = "reissued by the server at start when fewer than 30 days are left"

    try:
        info = describe_certificate(chain.read_bytes())
    except FileNotFoundError:
        raise CommandError(f"no certificate at {chain} yet; start the server once to create it") from None
    days = info.days_left()
    rows = [
        ("names", ", ".join(info.names) or "(none)"),
        ("issuer", info.issuer + (" (self-signed)" if info.self_signed else "")),
        ("expires", f"{info.not_after:%Y-%m-%d %H:%M} UTC ({days} days left)"
                    if days >= 0 else f"{info.not_after:%Y-%m-%d %H:%M} UTC (EXPIRED)"),
        ("serial", info.serial_hex),
        ("source", source),
        ("file", str(chain)),
        ("renewal", renewal),
    ]
    for label, value in rows:
        print(f"{label + ':':<9} {value}")
    return 0


def command_config(args: argparse.Namespace, loaded: LoadedSettings | None) -> int:
    if args.config_command == "check":
        from .settings import read_config_file
        values = read_config_file(args.file)
        print(f"{args.file}: valid, {len(values)} setting(s)")
        return 0
    if args.config_command == "example":
        sys.stdout.write(example_toml())
        return 0
    assert loaded is not None
    rows = []
    for option in OPTIONS:
        source = loaded.sources[option.name]
        hidden = loaded.overridden.get(option.name)
        if hidden:
            source += " (overrides " + "; ".join(hidden) + ")"
        rows.append((option.name, display_value(option, getattr(loaded.settings, option.name)),
                     source))
    name_width = max(len(row[0]) for row in rows)
    value_width = min(40, max(len(row[1]) for row in rows))
    print(f"{'SETTING':<{name_width}}  {'VALUE':<{value_width}}  FROM")
    for name, value, source in rows:
        print(f"{name:<{name_width}}  {value:<{value_width}}  {source}")
    file_note = loaded.config_file or "none found"
    print(f"config file: {file_note}")
    for notice in loaded.notices:
        print(f"notice: {notice}")
    return 0


def command_backup(args: argparse.Namespace, settings: Any) -> int:
    result = create_backup(DataDir.from_settings(settings), args.dest)
    how = (f"syncs held for {result.held_ms} ms" if result.server_running
           else "no server was running")
    print(f"wrote {result.archive}: {result.files} files, {_format_size(result.bytes)}; {how}")
    return 0


def command_restore(args: argparse.Namespace, settings: Any) -> int:
    data_dir = DataDir.from_settings(settings)
    count = restore_backup(args.archive, data_dir)
    print(f"restored {count} files from {args.archive} into {data_dir.root}; start the server "
          f"on it with: syncproxy --data-dir {data_dir.root}")
    return 0


def command_import(args: argparse.Namespace, settings: Any) -> int:
    from .ankisyncd import AnkisyncdRoot
    from .importing import (ImportRecord, TerminalProgress, apply_plan, describe_plan,
                            plan_import, summarize)

    data_dir = DataDir.from_settings(settings)
    source = AnkisyncdRoot(args.path, args.auth_db)
    print(f"ankisyncd users: {source.auth_db}; collections: {source.collections}")
    print(f"syncproxy data directory: {data_dir.root}")
    store = UserStore(data_dir.users_file)
    existing = set(store.load()) | set(store.load_pending())
    record = ImportRecord(data_dir.ankisyncd_import_record)
    plans = plan_import(source.scan(), data_dir.collections, existing, record)

    if args.dry_run:
        print("\n".join(describe_plan(plans)))
        print(summarize(plans))
        print("dry run: nothing was written")
        return 0

    data_dir.prepare()
    progress = TerminalProgress(sum(plan.total_bytes for plan in plans))
    try:
        apply_plan(plans, data_dir.collections, record, store.add_pending, progress)
    except sqlite3.Error as error:
        raise CommandError(f"import stopped: {error}. If syncproxy is running, stop it and run "
                           f"the import again; users already imported are skipped.") from None
    finally:
        progress.close()
    print("\n".join(describe_plan(plans)))
    print(summarize(plans))
    if any(plan.add_user for plan in plans):
        print("Imported users log in with their ankisyncd password. Each device must log in "
              "once with the new server address, because ankisyncd's sessions do not carry over.")
    return 0


HEALTH_OPTIONS = ("host", "port", "tls", "health_path")


def health_target(loaded: LoadedSettings) -> dict[str, Any]:
    """Return host, port, tls and health_path of the server to check.

    Flags given to `health` itself win. Otherwise the running server's own record is used:
    `docker run IMAGE --port 444` passes the port to the server only, and the image's
    HEALTHCHECK runs plain `syncproxy health`.
    """
    settings = loaded.settings
    target = {name: getattr(settings, name) for name in HEALTH_OPTIONS}
    if any(loaded.sources[name].startswith("command line") for name in HEALTH_OPTIONS):
        return target
    try:
        record = json.loads(DataDir.from_settings(settings).listening_file.read_text())
    except FileNotFoundError:
        return target
    except (OSError, ValueError) as error:
        print(f"syncproxy: warning: ignoring unreadable listening record: {error}",
              file=sys.stderr)
        return target
    target.update({name: record[name] for name in HEALTH_OPTIONS if name in record})
    return target


def command_health(loaded: LoadedSettings) -> int:
    target = health_target(loaded)
    host = target["host"]
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if target["tls"] else "http"
    url = f"{scheme}://{host}:{target['port']}{target['health_path']}"
    # The check runs on the server's own machine, so it verifies liveness, not the certificate.
    context = ssl._create_unverified_context() if target["tls"] else None
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            print(response.read().decode("utf-8", "replace").strip())
            return 0
    except urllib.error.HTTPError as error:
        print(f"unhealthy: {error.code} {error.read().decode('utf-8', 'replace').strip()}")
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: cannot reach {url}: {getattr(error, 'reason', error)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        loaded = None
        if not (args.command == "config" and args.config_command in ("check", "example")):
            loaded = settings_from(args)
        settings = loaded.settings if loaded else None
        if args.command == "serve":
            setup_logging(settings.log_level)
            log.info("settings loaded config_file=%s", loaded.config_file or "-")
            for notice in loaded.notices:
                log.warning("compatibility: %s", notice)
            from .server import run
            return asyncio.run(run(settings, loaded.seed_users))
        setup_logging("warning")
        if args.command == "user":
            return command_user(args, settings)
        if args.command == "cert":
            return command_cert(args, settings)
        if args.command == "config":
            return command_config(args, loaded)
        if args.command == "health":
            return command_health(loaded)
        if args.command == "import":
            return command_import(args, settings)
        if args.command == "backup":
            return command_backup(args, settings)
        if args.command == "restore":
            return command_restore(args, settings)
        if args.command == "cores":
            return command_cores(args, settings)
    except (SettingsError, UserError, DataDirError, CertificateError, CommandError,
            CoreError, AnkisyncdError, MigrationError, BackupError, ControlError,
            CoreAssignmentError) as error:
        print(f"syncproxy: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"syncproxy: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
