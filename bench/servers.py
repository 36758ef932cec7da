"""Start and stop the servers the benchmarks compare, all on loopback, each by its own PID.

The sync core (`python -m anki.syncserver`), Debian's nginx terminating TLS in front of an
upstream, syncproxy (forwarding with `--upstream` or with its bundled core), bare hypercorn
returning a constant (`constant_app.py`) and a bulk upstream (`bulk_upstream.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
from support import clean_environment, free_port  # noqa: E402

START_TIMEOUT = 60.0

# One worker, like syncproxy's single front-end process. `keepalive` lets nginx reuse upstream
# connections, as syncproxy does; the buffering settings are the ones a streaming sync proxy needs.
NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream sync_core {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        location / {{
            proxy_pass http://sync_core;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def wait_for_port(port: int, process: subprocess.Popen, what: str,
                  timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def wait_for_url(url: str, process: subprocess.Popen, what: str,
                 timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, verify=False, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not return status 200 at {url} within {timeout} s")


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak resident set) of a process, in KiB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak_memory(pid: int) -> None:
    """Reset VmHWM to the current VmRSS (Linux 4.0+), so the next peak is the transfer's own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Core:
    """A bare sync core on a free port, with plain (unhashed) passwords in SYNC_USERn."""

    def __init__(self, base: Path, users: dict[str, str]) -> None:
        self.port = free_port()
        environment = {"SYNC_HOST": "127.0.0.1", "SYNC_PORT": str(self.port),
                       "SYNC_BASE": str(base), "RUST_LOG": "warn"}
        for number, (name, password) in enumerate(users.items(), start=1):
            environment[f"SYNC_USER{number}"] = f"{name}:{password}"
        self.process = subprocess.Popen([sys.executable, "-m", "anki.syncserver"],
                                        env=clean_environment(environment),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_url(f"{self.url}health", self.process, "sync core")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        # SIGINT is the core's graceful stop; SIGTERM kills it at once.
        stop(self.process, signal.SIGINT)


class Nginx:
    """nginx terminating TLS with a given certificate and forwarding to one upstream port."""

    def __init__(self, directory: Path, upstream_port: int, cert: Path, key: Path) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        config = directory / "nginx.conf"
        config.write_text(NGINX_CONF.format(dir=directory, port=self.port,
                                            upstream_port=upstream_port, cert=cert, key=key))
        self.process = subprocess.Popen(["nginx", "-e", str(directory / "error.log"),
                                         "-p", str(directory), "-c", str(config)],
                                        stdout=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, "nginx")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        stop(self.process, signal.SIGQUIT)


class Syncproxy:
    """`syncproxy serve` on a free port, run from `source` (a checkout) or the installed package.

    With `tls_from`, the data directory starts with a copy of that TLS directory, so every
    instance serves the same generated certificate and one trust file fits them all.
    """

    def __init__(self, data_dir: Path, *args: str, source: Path | None = None,
                 tls_from: Path | None = None) -> None:
        self.data_dir = data_dir
        self.args = args
        self.source = source
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        if tls_from is not None:
            shutil.copytree(tls_from, data_dir / "tls")
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def command(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """Run one syncproxy command (not `serve`) against this data directory."""
        return subprocess.run(
            [sys.executable, "-m", "syncproxy", *args, "--data-dir", str(self.data_dir)],
            input=input, capture_output=True, text=True, timeout=120, check=True,
            cwd=self.source, env=self._environment(),
        )

    def add_user(self, name: str, password: str) -> None:
        self.command("user", "add", name, "--password-stdin", input=password + "\n")

    def start(self) -> Syncproxy:
        command = [sys.executable, "-m", "syncproxy", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--data-dir", str(self.data_dir),
                   "--log-level", "warning", *self.args]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            cwd=self.source, env=self._environment())
        try:
            wait_for_url(f"{self.url}_syncproxy/health", self.process, "syncproxy")
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"{error}; its log:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def _environment(self) -> dict[str, str]:
        # `python -m` puts the working directory first on sys.path, and PYTHONPATH comes before
        # the editable install, so a checkout given as `source` wins over the installed package.
        extra = {"PYTHONPATH": str(self.source)} if self.source else {}
        return clean_environment(extra)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        stop(self.process)


class Script:
    """One of the helper servers in bench/ (`constant_app.py`, `bulk_upstream.py`)."""

    def __init__(self, name: str, *args: str, tls: bool = False) -> None:
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / name), "--port", str(self.port), *args],
            env=clean_environment())
        wait_for_port(self.port, self.process, name)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        stop(self.process)


def version_of(command: list[str]) -> str:
    """Return the first line a `--version`-style command prints, or 'unknown'."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        output = (result.stdout + result.stderr).strip()
        if output:
            return output.splitlines()[0]
    return "unknown"


def machine_description(source: Path | None) -> dict[str, str]:
    """Describe the CPU, memory, kernel and the versions of everything compared."""
    from importlib.metadata import version

    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_gib = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_gib = int(line.split()[1]) / 1024 / 1024
    description = {
        "cpu": f"{cpu_model}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)",
        "memory": f"{memory_gib:.1f} GiB",
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "nginx": version_of(["nginx", "-v"]).split("/")[-1],
        "wrk": version_of(["wrk", "--version"]).split()[1],
        "curl": version_of(["curl", "--version"]).split()[1],
    }
    for package in ("anki", "hypercorn", "httpx", "httpcore", "h11"):
        try:
            description[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            description[package] = "not installed"
    description.update(describe_syncproxy(source))
    return description


def describe_syncproxy(source: Path | None) -> dict[str, str]:
    """Name the syncproxy code measured (its git commit) and the event loop its CLI runs on."""
    if source is None:
        import syncproxy

        source = Path(syncproxy.__file__).resolve().parent.parent
    commit = version_of(["git", "-C", str(source), "describe", "--always", "--dirty"])
    cli = (source / "syncproxy" / "cli.py").read_text()
    loop = ("uvloop (syncproxy/cli.py mentions uvloop)" if "uvloop" in cli
            else "asyncio's default loop (syncproxy/cli.py does not install uvloop)")
    return {"syncproxy": f"{source} at {commit}", "event loop": loop}


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
