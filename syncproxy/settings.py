"""Every setting of syncproxy, and the layers it can come from.

Each option is declared once, in OPTIONS. From that one declaration it gets a command-line flag
(`--max-body-mb`), an environment variable (`SYNCPROXY_MAX_BODY_MB`) and a TOML key
(`max_body_mb`). Layers apply in this order, later wins:

    built-in default  <  TOML file  <  SYNCPROXY_* environment  <  command line

`load_settings` returns the effective `Settings` together with the layer each value came from, so
that `syncproxy config show` can say why a value is what it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import textwrap
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .passthrough import PassthroughOptions
from .proxyheader import IPNetwork, parse_trusted_networks
from .routing import RoutingTable, parse_host_port, parse_route

ENV_PREFIX = "SYNCPROXY_"
CONFIG_FILE_NAME = "syncproxy.toml"


class SettingsError(ValueError):
    """A setting that cannot be used, with a message that names it and explains the fix."""


def default_data_dir() -> Path:
    """Return the data directory used when none is configured."""
    if os.geteuid() == 0:
        return Path("/var/lib/syncproxy")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "syncproxy"


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its name, value type, default and help text."""

    name: str
    kind: str  # "str", "int", "float", "bool", "path", "list", "int_or_auto"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("data_dir", "path", None, "directory that holds users, collections, media, "
           "certificates and ACME state (default: /var/lib/syncproxy as root, "
           "~/.local/share/syncproxy otherwise); not settable in the data directory's own "
           "syncproxy.toml"),
    Option("collections_dir", "path", None, "folder for the sync core's collections and media "
           "(its SYNC_BASE); default: collections/ in the data directory"),
    Option("host", "str", "0.0.0.0", "address the front end listens on; 0.0.0.0 is every IPv4 "
           "address, :: every IPv4 and IPv6 address"),
    Option("port", "int", 8443, "TCP port the front end listens on", minimum=0, maximum=65535),
    Option("upstream", "str", "", "URL of an existing sync server to forward to instead of "
           "running the bundled sync core, e.g. http://127.0.0.1:8080"),
    Option("tls", "bool", True, "serve TLS; --no-tls serves plain HTTP, only for use behind "
           "another TLS terminator"),
    Option("cert", "path", None, "PEM file with the server certificate and its full chain"),
    Option("key", "path", None, "PEM file with the private key of --cert"),
    Option("hostname", "list", (), "extra DNS name or IP address for the generated certificate "
           "(repeatable; comma-separated in the environment)"),
    Option("domain", "list", (), "DNS name to get a certificate for from an ACME CA such as "
           "Let's Encrypt (repeatable; the first one names the certificate); needs --acme-email "
           "or --acme-no-email, and port 80 reachable from outside"),
    Option("acme_email", "str", "", "contact address registered with the ACME CA, which sends "
           "expiry warnings there"),
    Option("acme_no_email", "bool", False, "register with the ACME CA without a contact "
           "address (no expiry warnings)"),
    Option("acme_server", "str", "https://acme-v02.api.letsencrypt.org/directory",
           "ACME directory URL; use https://acme-staging-v02.api.letsencrypt.org/directory to "
           "try things out, or a private CA's"),
    Option("acme_ca_bundle", "path", None, "PEM file of CA certificates to trust when talking "
           "to --acme-server (for a private CA)"),
    Option("http_port", "int", 80, "port of the plain-HTTP listener that answers ACME HTTP-01 "
           "challenges and redirects everything else to https; runs only with --domain",
           minimum=1, maximum=65535),
    Option("max_body_mb", "int", 100, "largest request body in MiB; also the sync core's "
           "MAX_SYNC_PAYLOAD_MEGS", minimum=1, maximum=65536),
    Option("upstream_connect_timeout", "float", 10.0, "seconds to wait for a connection to the "
           "upstream", minimum=0.1, maximum=600),
    Option("upstream_idle_timeout", "float", 600.0, "seconds the upstream may send nothing "
           "while a request is in flight", minimum=1, maximum=86400),
    Option("keep_alive_timeout", "float", 75.0, "seconds an idle client connection stays open",
           minimum=1, maximum=3600),
    Option("request_head_timeout", "float", 20.0, "seconds a client gets to send a whole "
           "request line and headers once it has started; a slower one gets 408",
           minimum=1, maximum=3600),
    Option("client_idle_timeout", "float", 120.0, "seconds a client may send nothing while "
           "its request body is expected, or read nothing while a response waits for it",
           minimum=1, maximum=86400),
    Option("max_head_kb", "int", 64, "largest request line plus headers in KiB; a larger "
           "one gets 431", minimum=4, maximum=1024),
    Option("max_connections", "int", 1000, "client connections served at once; more are "
           "closed at once and counted in the metrics", minimum=1, maximum=1_000_000),
    Option("core_port", "int", 0, "loopback port for the bundled sync core (with several "
           "cores, core N uses this port + N); 0 picks free ports", minimum=0, maximum=65535),
    Option("cores", "int_or_auto", 1, "number of sync core processes; each serves a fixed "
           "share of the users, so syncs of users on different cores run in parallel. 'auto' "
           "starts one per CPU this process may use", minimum=1, maximum=64),
    Option("core_stop_timeout", "float", 10.0, "seconds the sync core gets to stop after "
           "SIGINT before it is killed", minimum=0.1, maximum=600),
    Option("core_probe_interval", "float", 30.0, "seconds between checks that the sync core "
           "still serves syncs (it is also checked at once when a sync request fails); 0 checks "
           "only on failures", minimum=0, maximum=86400),
    Option("login_max_failures", "int", 10, "failed logins from one client address, or for one "
           "user name, after which further logins are refused for login_block_seconds; 0 turns "
           "login throttling off", minimum=0, maximum=1_000_000),
    Option("login_block_seconds", "float", 900.0, "seconds logins stay refused after "
           "login_max_failures failures; failures older than this are forgotten",
           minimum=1, maximum=86400 * 30),
    Option("shutdown_grace", "float", 300.0, "seconds requests in flight get to finish when "
           "syncproxy is stopped", minimum=0, maximum=86400),
    Option("health_path", "str", "/_syncproxy/health", "path of syncproxy's own health check"),
    Option("path_prefix", "str", "/", "path under which clients reach the sync server, for a "
           "sync URL such as https://host/anki/ (the prefix is removed before forwarding)"),
    Option("metrics_host", "str", "127.0.0.1", "address of the Prometheus metrics listener; "
           "keep it on loopback or a private network"),
    Option("metrics_port", "int", 0, "TCP port of the Prometheus metrics listener (plain "
           "HTTP, path /metrics); 0 turns it off", minimum=0, maximum=65535),
    Option("log_level", "str", "info", "log level", choices=("debug", "info", "warning", "error")),
    Option("sync_name", "list", (), "server name (SNI) whose TLS the front end terminates; "
           "'*.example.com' matches one label (repeatable). With --passthrough or --route, "
           "other names are passed through unread"),
    Option("passthrough", "str", "", "HOST:PORT that receives, still encrypted, every TLS "
           "connection whose name is neither a sync name nor a --route name"),
    Option("route", "list", (), "NAME=HOST:PORT: pass TLS connections for this server name "
           "or '*.example.com' wildcard to HOST:PORT (repeatable)"),
    Option("no_sni", "str", "terminate", "where a TLS connection without a server name (SNI) "
           "goes", choices=("terminate", "passthrough")),
    Option("passthrough_proxy_protocol", "str", "off", "PROXY protocol header sent first to "
           "passthrough routes so they see the client's address", choices=("off", "v1", "v2")),
    Option("passthrough_idle_timeout", "float", 600.0, "seconds a passed-through connection "
           "may move no bytes before it is closed", minimum=1, maximum=86400),
    Option("proxy_protocol_from", "list", (), "address or CIDR block allowed to send a PROXY "
           "protocol header to the front end, e.g. a load balancer (repeatable); its address "
           "then replaces the peer's in logs and X-Forwarded-For"),
)

OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}

# Values shown in the example settings file for options whose default is empty.
EXAMPLE_VALUES: dict[str, Any] = {
    "data_dir": "/var/lib/syncproxy",
    "collections_dir": "/var/lib/syncproxy/collections",
    "upstream": "http://127.0.0.1:8080",
    "cert": "/etc/letsencrypt/live/anki.example.org/fullchain.pem",
    "key": "/etc/letsencrypt/live/anki.example.org/privkey.pem",
    "hostname": ("anki.example.org", "192.168.1.10"),
    "domain": ("anki.example.org",),
    "acme_email": "admin@example.org",
    "acme_ca_bundle": "/etc/ssl/private-ca.pem",
    "sync_name": ("anki.example.org",),
    "passthrough": "127.0.0.1:8443",
    "route": ("www.example.org=127.0.0.1:8444",),
    "proxy_protocol_from": ("10.0.0.0/8",),
}

Settings = dataclasses.make_dataclass(
    "Settings",
    [(option.name, Any, dataclasses.field(default=option.default)) for option in OPTIONS],
    frozen=True,
)
Settings.__doc__ = "The effective value of every option in OPTIONS."


def nearest_name(name: str, candidates: Sequence[str]) -> str:
    """Return a hint naming the closest valid candidate, or an empty string."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_KIND_WORDS = {
    "str": "a string", "path": "a path", "int": "an integer", "float": "a number",
    "bool": "true or false", "list": "a list of strings", "int_or_auto": "an integer",
}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _expected(option: Option) -> str:
    """Describe the values an option accepts, for error messages."""
    words = _KIND_WORDS[option.kind]
    if option.minimum is not None and option.maximum is not None:
        words += f" from {_number(option.minimum)} to {_number(option.maximum)}"
    if option.choices:
        words = "one of " + ", ".join(option.choices)
    if option.kind == "int_or_auto":
        words += " or auto"
    return words


def _convert_text(option: Option, text: str) -> Any:
    """Convert a string from the environment or the command line to the option's type."""
    stripped = text.strip()
    if option.kind == "bool":
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ValueError
    if option.kind == "list":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if option.kind == "int":
        return int(stripped)
    if option.kind == "int_or_auto":
        return "auto" if stripped.lower() == "auto" else int(stripped)
    if option.kind == "float":
        return float(stripped)
    if option.kind == "path":
        if not stripped:
            raise ValueError
        return Path(stripped).expanduser()
    return text


def _convert_toml(option: Option, value: Any) -> Any:
    """Check and convert a value read from TOML, which already carries a type."""
    expected: dict[str, tuple[type, ...]] = {
        "str": (str,), "path": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
        "list": (list, str), "int_or_auto": (int, str),
    }
    # TOML booleans are Python ints, so `port = true` must not pass as 1.
    if isinstance(value, bool) and option.kind != "bool":
        raise ValueError
    if not isinstance(value, expected[option.kind]):
        raise ValueError
    if option.kind == "list":
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(item, str) for item in items):
            raise ValueError
        return tuple(items)
    if option.kind == "path":
        if not value.strip():
            raise ValueError
        return Path(value).expanduser()
    if option.kind == "float":
        return float(value)
    if option.kind == "int_or_auto" and isinstance(value, str):
        if value.strip().lower() != "auto":
            raise ValueError
        return "auto"
    return value


def _type_error(option: Option, value: Any, where: str) -> SettingsError:
    return SettingsError(f"{where}: invalid value {value!r} for {option.name}: expected "
                         f"{_expected(option)}")


def _check_range(option: Option, value: Any, where: str) -> None:
    if value == "auto" and option.kind == "int_or_auto":
        return
    if option.kind == "float" and not math.isfinite(value):
        raise _type_error(option, value, where)
    outside = ((option.minimum is not None and value < option.minimum)
               or (option.maximum is not None and value > option.maximum))
    if outside:
        raise SettingsError(f"{where}: {value!r} is out of range for {option.name}: expected "
                            f"{_expected(option)}")
    if option.choices and value not in option.choices:
        hint = nearest_name(str(value), option.choices)
        raise SettingsError(f"{where}: {value!r} is not valid for {option.name}: expected "
                            f"{_expected(option)}{hint}")


def parse_text(option: Option, text: str, where: str) -> Any:
    """Convert and check a value given as text, as environment variables are."""
    try:
        value = _convert_text(option, text)
    except ValueError:
        raise _type_error(option, text, where) from None
    _check_range(option, value, where)
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and validate a TOML settings file; return option values by name."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SettingsError(f"config file {path} is a directory; give the path of a "
                            f"TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {path} is not valid TOML: {error}") from None

    values: dict[str, Any] = {}
    for key, value in raw.items():
        option = OPTIONS_BY_NAME.get(key)
        if option is None:
            hint = nearest_name(key, list(OPTIONS_BY_NAME))
            kind = "table" if isinstance(value, dict) else "key"
            raise SettingsError(f"{path}: unknown {kind} {key!r}{hint} (settings are top-level "
                                f"keys; 'syncproxy config example' lists them all)")
        try:
            converted = _convert_toml(option, value)
        except ValueError:
            raise _type_error(option, value, f"{path}: key {key}") from None
        _check_range(option, converted, f"{path}: key {key}")
        values[key] = converted
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read SYNCPROXY_* variables; an unknown one is an error, not silently ignored."""
    known = {option.env: option for option in OPTIONS}
    values: dict[str, Any] = {}
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable == ENV_PREFIX + "CONFIG":
            continue
        option = known.get(variable)
        if option is None:
            hint = nearest_name(variable, list(known) + [ENV_PREFIX + "CONFIG"])
            raise SettingsError(f"unknown environment variable {variable}{hint}")
        values[option.name] = parse_text(option, text, variable)
    return values


def convert_cli_value(option: Option, value: Any) -> Any:
    """Convert a value argparse produced, checking its range."""
    if option.kind == "path" and value is not None:
        value = Path(value).expanduser()
    if option.kind == "list":
        value = tuple(value)
    if option.kind == "int_or_auto":
        return parse_text(option, value, option.flag)
    if value is not None and option.kind != "list":
        _check_range(option, value, option.flag)
    return value


@dataclasses.dataclass(frozen=True)
class LoadedSettings:
    """The effective settings and where each value came from.

    `sources` names the layer that won for each option; `overridden` lists the lower layers
    that also set it, so that an edit that "has no effect" shows what hides it.
    """

    settings: Any
    sources: dict[str, str]
    config_file: Path | None
    overridden: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notices: list[str] = dataclasses.field(default_factory=list)
    seed_users: list[Any] = dataclasses.field(default_factory=list)


def find_config_file(
    cli_config: Path | None, environ: Mapping[str, str], data_dir: Path | None
) -> Path | None:
    """Return the TOML file to read: --config, then SYNCPROXY_CONFIG, then the data directory's."""
    if cli_config is not None:
        return cli_config
    if environ.get(ENV_PREFIX + "CONFIG"):
        return Path(environ[ENV_PREFIX + "CONFIG"]).expanduser()
    if data_dir is not None:
        candidate = data_dir / CONFIG_FILE_NAME
        try:
            found = candidate.is_file()
        except PermissionError as error:
            # A data directory of another user (a container volume with the wrong owner) must
            # get the message that names owner and running user, not a bare EACCES.
            from .datadir import DataDir
            raise DataDir(data_dir).not_writable(data_dir, error) from None
        if found:
            return candidate
    return None


def load_settings(
    cli_values: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    cli_config: Path | None = None,
) -> LoadedSettings:
    """Merge the four layers. `cli_values` holds only the options given on the command line."""
    from .compat import read_compat_environment

    environ = os.environ if environ is None else environ
    env_values = read_environment(environ)
    compat = read_compat_environment(environ)

    # The data directory decides where the default config file lives, so it is resolved from
    # the layers that cannot come from that file first.
    early_data_dir = cli_values.get("data_dir") or env_values.get("data_dir")
    data_dir_for_file = early_data_dir or default_data_dir()
    config_file = find_config_file(cli_config, environ, data_dir_for_file)
    file_values = read_config_file(config_file) if config_file else {}
    if (config_file is not None and "data_dir" in file_values
            and config_file == Path(data_dir_for_file) / CONFIG_FILE_NAME):
        raise SettingsError(
            f"{config_file}: key data_dir cannot be set in the data directory's own "
            f"{CONFIG_FILE_NAME}, because that file is only found once the data directory is "
            f"known. Remove the key, or keep the file elsewhere and pass it with --config or "
            f"SYNCPROXY_CONFIG."
        )

    layers = (
        ("file " + str(config_file), file_values, {}),
        ("environment", compat.values, compat.sources),
        ("environment", env_values, {}),
        ("command line", cli_values, {}),
    )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    overridden: dict[str, list[str]] = {}
    notices = list(compat.notices)
    for option in OPTIONS:
        values[option.name] = option.default
        sources[option.name] = "default"
        for layer_name, layer_values, layer_sources in layers:
            if option.name not in layer_values:
                continue
            label = _layer_label(option, layer_name, layer_sources, layer_values is env_values)
            if sources[option.name] != "default":
                overridden.setdefault(option.name, []).append(sources[option.name])
            values[option.name] = layer_values[option.name]
            sources[option.name] = label
        for lower in overridden.get(option.name, []):
            if lower.startswith("environment ") and lower.split()[1] in compat.sources.values():
                notices.append(f"{lower.split()[1]} is overridden by {sources[option.name]}")

    if values["data_dir"] is None:
        values["data_dir"] = default_data_dir()
    values["data_dir"] = Path(values["data_dir"]).expanduser().absolute()
    if values["collections_dir"] is None:
        values["collections_dir"] = values["data_dir"] / "collections"
    values["collections_dir"] = Path(values["collections_dir"]).expanduser().absolute()
    settings = Settings(**values)
    validate(settings)
    return LoadedSettings(settings=settings, sources=sources, config_file=config_file,
                          overridden=overridden, notices=notices,
                          seed_users=list(compat.seed_users))


def _layer_label(option: Option, layer: str, layer_sources: Mapping[str, str],
                 native_env: bool) -> str:
    """Name the exact place a value came from: the file, the variable or the flag."""
    if layer_sources:
        return f"environment {layer_sources[option.name]}"
    if native_env:
        return f"environment {option.env}"
    if layer == "command line":
        return f"command line {option.flag}"
    return layer


def validate(settings: Any) -> None:
    """Check rules that involve more than one option."""
    if (settings.cert is None) != (settings.key is None):
        raise SettingsError("--cert and --key must be given together (or neither, to use a "
                            "generated certificate)")
    _validate_acme(settings)
    if not (settings.path_prefix.startswith("/") and settings.path_prefix.endswith("/")):
        raise SettingsError(f"path_prefix {settings.path_prefix!r} must start and end with /, "
                            f"e.g. /anki/")
    if not settings.health_path.startswith("/"):
        raise SettingsError(f"health_path {settings.health_path!r} must start with /")
    for reserved in ("/sync", "/msync"):
        if settings.health_path == reserved or settings.health_path.startswith(reserved + "/"):
            raise SettingsError(f"health_path {settings.health_path!r} collides with the sync "
                                f"protocol's {reserved}/ paths; choose another path")
    routing_table(settings)
    trusted_proxy_networks(settings)
    if settings.metrics_port and settings.metrics_port == settings.port:
        raise SettingsError(f"metrics_port {settings.metrics_port} is also the front end's port; "
                            f"choose another port for the metrics, or 0 to turn them off")
    if settings.upstream and not settings.upstream.startswith(("http://", "https://")):
        raise SettingsError(f"upstream {settings.upstream!r} must be an http:// or https:// URL")
    if settings.upstream and settings.cores != 1:
        raise SettingsError(f"cores {settings.cores!r} applies to the bundled sync core, and "
                            f"--upstream replaces it; remove one of the two settings")
    if settings.core_port and isinstance(settings.cores, int) and (
            settings.core_port + settings.cores - 1 > 65535):
        raise SettingsError(f"core_port {settings.core_port} with cores {settings.cores} needs "
                            f"ports up to {settings.core_port + settings.cores - 1}, beyond "
                            f"65535; choose a lower core_port or 0 for free ports")


def routing_table(settings: Any) -> RoutingTable:
    """Build the server-name routes from the settings, raising SettingsError if invalid."""
    try:
        passthrough = parse_host_port(settings.passthrough, what="passthrough") if settings.passthrough else None
        routes = [parse_route(value) for value in settings.route]
        table = RoutingTable.build(settings.sync_name, routes, passthrough, settings.no_sni)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    if table.splices and not settings.tls:
        raise SettingsError("--passthrough and --route need TLS: routing reads the server name "
                            "from the TLS handshake; remove --no-tls or the routes")
    return table


def trusted_proxy_networks(settings: Any) -> tuple[IPNetwork, ...]:
    """Parse proxy_protocol_from, raising SettingsError if an entry is invalid."""
    try:
        return parse_trusted_networks(settings.proxy_protocol_from)
    except ValueError as error:
        raise SettingsError(str(error)) from None


def passthrough_options(settings: Any) -> PassthroughOptions:
    """Return the options every passed-through connection shares."""
    versions = {"off": None, "v1": 1, "v2": 2}
    return PassthroughOptions(proxy_protocol=versions[settings.passthrough_proxy_protocol],
                              idle_timeout=settings.passthrough_idle_timeout)


_DNS_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _validate_acme(settings: Any) -> None:
    if not settings.domain:
        return
    if not settings.tls:
        raise SettingsError("--domain gets a certificate for the TLS front end, which --no-tls "
                            "turns off: drop one of them")
    if settings.cert:
        raise SettingsError("--domain gets a certificate from an ACME CA, --cert/--key serve "
                            "certificate files: give one or the other")
    for name in settings.domain:
        if name.startswith("*."):
            raise SettingsError(f"domain {name!r}: wildcard names need a DNS-01 challenge, "
                                f"which syncproxy does not do; list each name instead")
        if not _DNS_NAME.fullmatch(name) or name.replace(".", "").isdigit():
            raise SettingsError(f"domain {name!r} is not a DNS name; give a name such as "
                                f"anki.example.org")
    if bool(settings.acme_email) == bool(settings.acme_no_email):
        raise SettingsError("--domain needs exactly one of --acme-email ADDRESS (the CA sends "
                            "expiry warnings there) or --acme-no-email")
    if settings.acme_email and "@" not in settings.acme_email:
        raise SettingsError(f"acme_email {settings.acme_email!r} is not an e-mail address")
    if not settings.acme_server.startswith("https://"):
        raise SettingsError(f"acme_server {settings.acme_server!r} must be an https:// URL")
    if settings.acme_ca_bundle is not None and not Path(settings.acme_ca_bundle).is_file():
        raise SettingsError(f"acme_ca_bundle {settings.acme_ca_bundle} is not a file")
    if settings.http_port == settings.port and settings.http_port != 0:
        raise SettingsError(f"http_port and port are both {settings.port}; the plain-HTTP "
                            f"listener needs a port of its own")


def display_value(option: Option, value: Any) -> str:
    """Format a value for `config show`, hiding secrets and passwords inside URLs."""
    if option.secret and value:
        return "********"
    if isinstance(value, tuple):
        return ",".join(value) or "(none)"
    if value is None or value == "":
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if option.kind == "str" and "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.password:
            netloc = f"{parts.username}:********@{parts.hostname}"
            if parts.port:
                netloc += f":{parts.port}"
            text = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return text


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    return json.dumps(str(value))


def example_toml() -> str:
    """Return the example settings file: every option, commented out, with its default."""
    lines = [
        "# syncproxy settings file. Every key is optional and shown with its default.",
        "#",
        "# syncproxy reads this file from --config FILE, else SYNCPROXY_CONFIG, else",
        f"# {CONFIG_FILE_NAME} in the data directory. Later layers win:",
        "#   built-in default < this file < SYNCPROXY_* environment < command-line flag",
        "# 'syncproxy config show' prints each effective value and the layer it came from;",
        "# 'syncproxy config check FILE' validates a file without starting anything.",
        "#",
        "# Generated by 'syncproxy config example'; do not edit by hand.",
    ]
    for option in OPTIONS:
        lines.append("")
        lines.extend("# " + line for line in textwrap.wrap(option.help[0].upper()
                                                            + option.help[1:] + ".", 92))
        lines.append(f"# Type: {_expected(option)}. Environment: {option.env}. "
                     f"Flag: {option.flag}.")
        shown = option.default
        if shown is None or shown == "" or shown == ():
            shown = EXAMPLE_VALUES[option.name]
            lines.append("# (empty by default; example value below)")
        lines.append(f"# {option.name} = {_toml_literal(shown)}")
    return "\n".join(lines) + "\n"
