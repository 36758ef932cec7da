"""Helpers shared by the tests: run syncproxy as a real process and drive the real anki client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ANKI_CLIENT = Path(__file__).resolve().parent / "anki_client.py"
START_TIMEOUT = 60.0

# Every syncproxy log file and every password and host key the tests used, so that one test at
# the end of the run can check that no log contains a secret.
LOG_FILES: list[Path] = []
SECRETS: set[str] = set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return os.environ without SYNCPROXY_* and SYNC_* variables, plus `extra`."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("SYNCPROXY_", "SYNC_"))}
    environment.update(extra or {})
    return environment


def syncproxy(*args: str, input: str | None = None, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run one `syncproxy` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "syncproxy", *args], input=input, capture_output=True,
        text=True, env=clean_environment(env), timeout=120, check=check,
    )


def add_user(data_dir: Path, name: str, password: str) -> None:
    SECRETS.add(password)
    syncproxy("user", "add", name, "--password-stdin", "--data-dir", str(data_dir),
              input=password + "\n")
    users = json.loads((data_dir / "users.json").read_text())["users"]
    SECRETS.update(entry["hash"] for entry in users.values())


class SyncProxy:
    """A `syncproxy serve` process on a free loopback port, with its log kept in a file."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, tls: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.args = args
        self.env = env
        self.tls = tls
        self.log_path = self.data_dir.parent / f"syncproxy-{self.port}.log"
        LOG_FILES.append(self.log_path)
        self.process: subprocess.Popen | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def start(self, wait_for_core: bool = True) -> SyncProxy:
        command = [sys.executable, "-m", "syncproxy", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args]
        if not self.tls:
            command.append("--no-tls")
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=clean_environment(self.env))
        self.wait_healthy(require_ok=wait_for_core)
        return self

    def wait_healthy(self, require_ok: bool = True, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.scheme}://127.0.0.1:{self.port}/_syncproxy/health"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"syncproxy exited with {self.process.returncode}:\n"
                                   + self.log())
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(url, verify=False, timeout=2)
                if response.status_code == 200 or not require_ok:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"syncproxy not healthy within {timeout} s:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ca_file(self) -> Path:
        """Write the PEM that `syncproxy cert pem` prints, as a user would, and return its path."""
        path = self.data_dir.parent / f"trust-{self.port}.pem"
        path.write_text(syncproxy("cert", "pem", "--data-dir", str(self.data_dir),
                                  *self.args).stdout)
        return path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log_file.close()

    def __enter__(self) -> SyncProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class AnkiClient:
    """One Anki profile: a collection file driven through tests/anki_client.py."""

    def __init__(self, directory: Path, endpoint: str, ca_file: Path | None,
                 wrapper: Sequence[str] = ()) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.wrapper = tuple(wrapper)  # a command prefix, e.g. one giving it its own /etc/hosts
        self.collection = directory / "collection.anki2"
        self.endpoint = endpoint
        self.ca_file = ca_file
        self.hkey = ""

    def run(self, action: str, *args: str, input: str | None = None,
            check: bool = True) -> dict:
        environment = clean_environment()
        environment.pop("SSL_CERT_FILE", None)
        environment.pop("SSL_CERT_DIR", None)
        if self.ca_file is not None:
            environment["SSL_CERT_FILE"] = str(self.ca_file)
        result = subprocess.run(
            [*self.wrapper, sys.executable, str(ANKI_CLIENT), action, str(self.collection),
             *args],
            input=input, capture_output=True, text=True, env=environment, timeout=600,
        )
        if result.returncode != 0:
            if check:
                raise ClientError(action, result.stderr)
            return {"error": result.stderr}
        return json.loads(result.stdout.strip().splitlines()[-1])

    def build(self, notes: int, media: int = 0, label: str = "", media_size: int = 20_000) -> dict:
        return self.run("build", "--notes", str(notes), "--media", str(media), "--label", label,
                        "--media-size", str(media_size))

    def login(self, user: str, password: str) -> str:
        SECRETS.add(password)
        self.hkey = self.run("login", "--endpoint", self.endpoint, "--user", user,
                             "--password-stdin", input=password + "\n")["hkey"]
        SECRETS.add(self.hkey)
        return self.hkey

    def sync(self, *flags: str, check: bool = True) -> dict:
        return self.run("sync", "--endpoint", self.endpoint, "--hkey", self.hkey, *flags,
                        check=check)

    def edit(self, count: int, tag: str) -> dict:
        return self.run("edit", "--count", str(count), "--tag", tag)

    def dump(self) -> dict:
        return self.run("dump")


class ClientError(RuntimeError):
    """The anki client failed; the message holds its error output."""

    def __init__(self, action: str, stderr: str) -> None:
        super().__init__(f"anki client {action} failed:\n{stderr[-3000:]}")
        self.stderr = stderr


def tls_client_context(ca_file: Path, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(list(alpn))
    return context
