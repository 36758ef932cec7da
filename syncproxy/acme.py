"""Certificates from an ACME CA, obtained and renewed by running certbot.

certbot (from PyPI, a dependency of this package) runs as a subprocess with
every directory it uses under the data directory's ``acme/`` folder, so it
needs no root and keeps its state across container re-creation:

    acme/config/   accounts, renewal configs, live/NAME/{fullchain,privkey}.pem
    acme/work/     certbot's scratch space
    acme/logs/     letsencrypt.log: the full story of every run
    acme/webroot/  HTTP-01 tokens, served by the plain-HTTP listener
    acme/status.json  last check, its result and the next check, for ``cert status``

What happened is decided from exit codes and files only (the account
directory, ``live/NAME/``, the challenge requests our own listener saw),
never from certbot's console output, which is not a stable interface.
certbot's output (which carries what the CA said) is only relayed to the log
for a person to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from .acme_http import ChallengeApp, ChallengeRequests
from .certreload import ReloadingCertificate, describe_certificate
from .listener import Listener, hypercorn_config
from .tls import CertificateError

log = logging.getLogger("syncproxy.acme")

DEFAULT_ACME_SERVER = "https://acme-v02.api.letsencrypt.org/directory"
# Renewal is checked twice a day, as Let's Encrypt asks of ACME clients; the
# jitter spreads the checks of many servers started at the same moment.
CHECK_INTERVAL = 12 * 3600.0
CHECK_JITTER = 3600.0
# A failed check is retried after these delays, then at the regular interval.
RETRY_DELAYS = (300.0, 1800.0, 7200.0)
CERTBOT_TIMEOUT = 600.0
# certbot's output after a failure is relayed, unparsed, up to this many characters.
OUTPUT_CHARS_LOGGED = 1500

CERTBOT_COMMAND = (sys.executable, "-c", "import sys; from certbot.main import main; sys.exit(main())")


@dataclass(frozen=True)
class AcmeOptions:
    domains: tuple[str, ...]
    # None means the operator chose to register without an address, so the
    # CA cannot send expiry warnings.
    email: Optional[str]
    server: str = DEFAULT_ACME_SERVER
    ca_bundle: Optional[Path] = None
    http_port: int = 80

    @property
    def cert_name(self) -> str:
        return self.domains[0]


@dataclass
class CertbotRun:
    """The outcome of one certbot invocation, as far as exit code and files tell."""

    step: str
    exit_code: int
    seconds: float
    output: str
    challenge_requests: int = 0
    challenge_served: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class AcmeStatus:
    domains: list[str]
    server: str
    last_check: Optional[str] = None
    last_result: Optional[str] = None
    last_error: Optional[str] = None
    next_check: Optional[str] = None
    failures_in_a_row: int = 0

    @classmethod
    def read(cls, path: Path) -> Optional["AcmeStatus"]:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        tmp.replace(path)


def _utc_iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="seconds")


class Certbot:
    """Runs certbot for one certificate lineage named after the first domain."""

    def __init__(self, options: AcmeOptions, acme_dir: Path,
                 challenge_requests: Optional[ChallengeRequests] = None) -> None:
        self.options = options
        self.acme_dir = acme_dir
        self.config_dir = acme_dir / "config"
        self.work_dir = acme_dir / "work"
        self.logs_dir = acme_dir / "logs"
        self.webroot = acme_dir / "webroot"
        self.status_file = acme_dir / "status.json"
        self.challenge_requests = challenge_requests or ChallengeRequests()

    def prepare(self) -> None:
        """Create certbot's directories; only the server does, so ``cert status`` writes nothing."""
        for directory in (self.config_dir, self.work_dir, self.logs_dir, self.webroot):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def live_dir(self) -> Path:
        return self.config_dir / "live" / self.options.cert_name

    @property
    def fullchain(self) -> Path:
        return self.live_dir / "fullchain.pem"

    @property
    def privkey(self) -> Path:
        return self.live_dir / "privkey.pem"

    @property
    def log_file(self) -> Path:
        return self.logs_dir / "letsencrypt.log"

    def account_exists(self) -> bool:
        # certbot keeps accounts under accounts/<host[:port]><path of the
        # directory URL>/<account id>/ (certbot 2 to 5 on POSIX).
        parsed = urlparse(self.options.server)
        directory = self.config_dir / "accounts" / (parsed.netloc + parsed.path).lstrip("/")
        return directory.is_dir() and any(directory.iterdir())

    def lineage_names(self) -> Optional[set[str]]:
        try:
            return set(describe_certificate(self.fullchain.read_bytes()).names)
        except (OSError, CertificateError):
            return None

    def lineage_server(self) -> Optional[str]:
        conf = self.config_dir / "renewal" / f"{self.options.cert_name}.conf"
        try:
            lines = conf.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip() == "server":
                return value.strip()
        return None

    def why_new_certificate(self) -> Optional[str]:
        """Return why certonly must run now, or None when the lineage matches the options."""
        names = self.lineage_names()
        if names is None:
            return "no certificate yet"
        if names != set(self.options.domains):
            return f"names changed from {','.join(sorted(names))}"
        if self.lineage_server() != self.options.server:
            return "ACME server changed"
        return None

    def _common_args(self) -> list[str]:
        return [
            "--config-dir", str(self.config_dir),
            "--work-dir", str(self.work_dir),
            "--logs-dir", str(self.logs_dir),
            "--server", self.options.server,
            "--non-interactive",
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.options.ca_bundle is not None:
            # certbot talks to the CA through requests, which reads this.
            env["REQUESTS_CA_BUNDLE"] = str(self.options.ca_bundle)
        return env

    async def run(self, step: str, args: list[str]) -> CertbotRun:
        self.prepare()
        requests_before = self.challenge_requests.total
        served_before = self.challenge_requests.served
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *CERTBOT_COMMAND, *args, *self._common_args(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env(),
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CERTBOT_TIMEOUT)
            exit_code = process.returncode
        except asyncio.TimeoutError:
            process.kill()
            output, _ = await process.communicate()
            exit_code = -1
            output += f"\ncertbot did not finish within {CERTBOT_TIMEOUT:.0f} s and was stopped".encode()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise

        lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
        text = " | ".join(line for line in lines if not line.startswith("- - -"))
        return CertbotRun(
            step=step,
            exit_code=exit_code,
            seconds=time.monotonic() - started,
            output=text if len(text) <= OUTPUT_CHARS_LOGGED else text[:OUTPUT_CHARS_LOGGED] + "...",
            challenge_requests=self.challenge_requests.total - requests_before,
            challenge_served=self.challenge_requests.served - served_before,
        )

    async def register(self) -> CertbotRun:
        contact = (["--email", self.options.email, "--no-eff-email"] if self.options.email
                   else ["--register-unsafely-without-email"])
        return await self.run("register account", ["register", "--agree-tos", *contact])

    async def certonly(self, force: bool = False) -> CertbotRun:
        args = ["certonly", "--webroot", "-w", str(self.webroot),
                "--cert-name", self.options.cert_name, "--keep-until-expiring"]
        for domain in self.options.domains:
            args += ["-d", domain]
        if force:
            args.append("--force-renewal")
        return await self.run("request certificate", args)

    async def renew(self, force: bool = False) -> CertbotRun:
        # Without --no-random-sleep-on-renew certbot waits up to 8 minutes
        # whenever it has no terminal, as here.
        args = ["renew", "--cert-name", self.options.cert_name, "--no-random-sleep-on-renew"]
        if force:
            args.append("--force-renewal")
        return await self.run("renew certificate", args)


def explain_failure(run: CertbotRun, options: AcmeOptions, certbot: Certbot) -> str:
    """Say in plain words what to check after a failed certbot run."""
    names = ", ".join(options.domains)
    if run.exit_code == -1:
        return f"certbot timed out: check that the ACME server {options.server} is reachable from this host"
    if run.step == "register account":
        return (f"could not register an account with the ACME server {options.server}: check the address "
                "and, for a private CA, --acme-ca-bundle")
    if run.challenge_requests == 0:
        return (f"the CA never fetched the HTTP-01 challenge from this server: check that DNS for {names} "
                f"points to this host and that port 80 on that address reaches this server's "
                f"plain-HTTP port {options.http_port} (port forwarding, firewall)")
    if run.challenge_served < run.challenge_requests:
        return (f"the CA reached this server but asked for a challenge token that was not in "
                f"{certbot.webroot}: another server may be answering for {names} as well")
    return (f"the CA fetched the challenge from this server, so DNS and port 80 work; "
            f"the CA rejected the request for another reason: see certbot_output and {certbot.log_file}")


class AcmeManager:
    """Obtains the certificate at start and checks renewal twice a day, in the background.

    ``on_certificate(fullchain, privkey)`` is called after every successful
    run; it loads the pair into the front end and returns whether it changed.
    A failure never stops the server: it is logged and retried.
    """

    def __init__(self, certbot: Certbot, on_certificate: Callable[[Path, Path], bool],
                 check_interval: float = CHECK_INTERVAL, retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 jitter: float = CHECK_JITTER) -> None:
        self.certbot = certbot
        self.options = certbot.options
        self.on_certificate = on_certificate
        self.check_interval = check_interval
        self.retry_delays = retry_delays
        self.jitter = jitter
        self.status = AcmeStatus(domains=list(self.options.domains), server=self.options.server)
        previous = AcmeStatus.read(certbot.status_file)
        if previous is not None:
            self.status.failures_in_a_row = previous.failures_in_a_row
        self._lock = asyncio.Lock()

    def has_certificate(self) -> bool:
        return self.certbot.why_new_certificate() is None

    async def check(self, force: bool = False) -> bool:
        """Obtain or renew now; return True when a usable certificate was installed."""
        async with self._lock:
            return await self._check(force)

    async def _check(self, force: bool) -> bool:
        certbot = self.certbot
        names = ",".join(self.options.domains)
        self.status.last_check = _utc_iso(time.time())

        if not certbot.account_exists():
            log.info("acme registering account server=%s email=%s", self.options.server,
                     self.options.email or "none")
            run = await certbot.register()
            if not run.ok:
                return self._failed(run)

        reason = certbot.why_new_certificate()
        if reason is not None or force:
            log.info("acme requesting certificate names=%s reason=%r server=%s webroot=%s",
                     names, reason or "forced", self.options.server, certbot.webroot)
            server_changed = reason == "ACME server changed"
            run = await certbot.certonly(force=force or server_changed)
        else:
            log.info("acme checking renewal names=%s server=%s", names, self.options.server)
            run = await certbot.renew()
        if not run.ok:
            return self._failed(run)

        changed = self.on_certificate(certbot.fullchain, certbot.privkey)
        info = describe_certificate(certbot.fullchain.read_bytes())
        log.info("acme %s done names=%s changed=%s serial=%s expires=%s seconds=%.1f",
                 run.step, names, changed, info.serial_hex, f"{info.not_after:%Y-%m-%d}", run.seconds)
        self.status.last_result = "ok"
        self.status.last_error = None
        self.status.failures_in_a_row = 0
        self._save()
        return True

    def _failed(self, run: CertbotRun) -> bool:
        self.status.failures_in_a_row += 1
        hint = explain_failure(run, self.options, self.certbot)
        log.error(
            "acme %s failed names=%s exit_code=%s challenge_requests=%d what_to_check=%r "
            "certbot_output=%r log=%s",
            run.step, ",".join(self.options.domains), run.exit_code, run.challenge_requests,
            hint, run.output, self.certbot.log_file,
        )
        self.status.last_result = "failed"
        self.status.last_error = f"{run.step}: {hint}"
        self._save()
        return False

    def _save(self) -> None:
        try:
            self.status.write(self.certbot.status_file)
        except OSError as exc:
            log.warning("acme status not saved path=%s error=%s", self.certbot.status_file, exc.strerror)

    def next_delay(self, succeeded: bool) -> float:
        if not succeeded and self.status.failures_in_a_row <= len(self.retry_delays):
            return self.retry_delays[self.status.failures_in_a_row - 1]
        return self.check_interval + random.uniform(0, self.jitter)

    async def run_forever(self) -> None:
        """Check at start, then every CHECK_INTERVAL (sooner after a failure); runs until cancelled."""
        while True:
            try:
                succeeded = await self.check()
            except (OSError, CertificateError) as exc:
                # certbot missing or the data directory unwritable: keep serving and retry.
                self.status.failures_in_a_row += 1
                self.status.last_result = "failed"
                self.status.last_error = str(exc)
                log.error("acme check failed error=%r", str(exc))
                succeeded = False
            delay = self.next_delay(succeeded)
            self.status.next_check = _utc_iso(time.time() + delay)
            self._save()
            if not succeeded:
                log.info("acme retry scheduled in_seconds=%.0f attempt=%d next_check=%s",
                         delay, self.status.failures_in_a_row + 1, self.status.next_check)
            else:
                log.info("acme next renewal check next_check=%s", self.status.next_check)
            await asyncio.sleep(delay)


def options_from(settings) -> AcmeOptions:
    return AcmeOptions(
        domains=tuple(settings.domain),
        email=settings.acme_email or None,
        server=settings.acme_server,
        ca_bundle=Path(settings.acme_ca_bundle) if settings.acme_ca_bundle else None,
        http_port=settings.http_port,
    )


class AcmeService:
    """The plain-HTTP listener plus the background certbot schedule, as the server runs them."""

    def __init__(self, settings, acme_dir: Path, certificate: ReloadingCertificate, https_port: int) -> None:
        self.options = options_from(settings)
        self.certificate = certificate
        self.certbot = Certbot(self.options, acme_dir)
        app = ChallengeApp(self.certbot.webroot, https_port, self.certbot.challenge_requests)
        self.listener = Listener(app, settings.host, settings.http_port, None,
                                 hypercorn_config(settings.keep_alive_timeout))
        self.manager = AcmeManager(self.certbot, self._install)
        self.task: Optional[asyncio.Task] = None

    def _install(self, fullchain: Path, privkey: Path) -> bool:
        return self.certificate.switch(fullchain, privkey, "acme")

    def start(self) -> None:
        self.certbot.prepare()
        try:
            self.listener.open()
        except OSError as error:
            raise OSError(error.errno, f"{error.strerror}. The plain-HTTP listener answers the ACME "
                          f"HTTP-01 challenge: run with permission to bind port {self.options.http_port} "
                          f"(CAP_NET_BIND_SERVICE) or pick --http-port 8080 and forward port 80 "
                          f"to it") from None
        self.listener.start()
        log.info("acme challenge listener url=http://%s:%d/.well-known/acme-challenge/ names=%s",
                 self.listener.host, self.listener.bound_port, ",".join(self.options.domains))
        # A certificate from an earlier run is served at once, even while a new one is requested.
        if self.certbot.lineage_names() is not None:
            self._install(self.certbot.fullchain, self.certbot.privkey)
        self.task = asyncio.create_task(self.manager.run_forever(), name="acme")

    async def close(self, grace: float) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.listener.close(grace)
