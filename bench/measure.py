"""The measurements behind bench/anchors.py: real-client syncs, small requests, bulk transfers
and syncproxy's memory. Each function starts its own servers and stops them before it returns.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import ssl
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import zstandard

from servers import (
    Core, Nginx, Script, Syncproxy, memory_kib, reset_peak_memory,
)
from support import AnkiClient

PASSWORD = "bench-password"
MB = 1_000_000
CLIENT_VERSION = "anki,26.9.3 (bench),linux"
EDITED_NOTES = 5


@dataclass
class Setup:
    """Inputs shared by every measurement: the work directory, the certificate and the template."""

    work: Path
    tls_dir: Path    # a syncproxy TLS directory: server.pem, server-key.pem, ca.pem
    trust: Path      # the PEM a client trusts (`syncproxy cert pem`)
    template: Path   # collection.anki2 with collection.media beside it
    notes: int
    media: int
    source: Path | None  # a syncproxy checkout to run instead of the installed package

    @property
    def cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.tls_dir / "server-key.pem"


def rotated(items: list, repeat: int) -> list:
    """Return `items` rotated by `repeat`, so each one goes first in turn across repeats."""
    shift = repeat % len(items)
    return items[shift:] + items[:shift]


# ---------------------------------------------------------------- real Anki client


CLIENT_PATHS = ("core direct (http)", "nginx (https)", "syncproxy --upstream (https)",
                "syncproxy, bundled core (https)")
PHASES = ("login", "full upload with media", "incremental sync", "full download with media")


def client_phases(setup: Setup, directory: Path, endpoint: str, ca_file: Path | None,
                  user: str, incremental_syncs: int) -> dict[str, float]:
    """Run one user's login, full upload, incremental syncs and full download; return seconds."""
    uploader = AnkiClient(directory / "up", endpoint, ca_file)
    shutil.copy(setup.template, uploader.collection)
    shutil.copytree(setup.template.with_suffix(".media"), uploader.collection.with_suffix(".media"))

    login = uploader.run("login", "--endpoint", endpoint, "--user", user, "--password-stdin",
                         input=PASSWORD + "\n")
    uploader.hkey = login["hkey"]
    upload = uploader.sync("--upload")

    incremental = []
    for number in range(incremental_syncs):
        uploader.edit(EDITED_NOTES, f"edit-{number}")
        incremental.append(uploader.sync()["seconds"])

    downloader = AnkiClient(directory / "down", endpoint, ca_file)
    downloader.login(user, PASSWORD)
    download = downloader.sync("--download")
    media_files = len(list(downloader.collection.with_suffix(".media").iterdir()))
    if download["notes"] != setup.notes or media_files != setup.media:
        raise RuntimeError(f"full download through {endpoint} got {download['notes']} notes and "
                           f"{media_files} media files; expected {setup.notes} and {setup.media}")
    return {"login": login["seconds"], "full upload with media": upload["seconds"],
            "incremental sync": statistics.median(incremental),
            "full download with media": download["seconds"]}


def warm_up(endpoint: str, ca_file: Path | None) -> None:
    """Forward one untimed GET /health, so a fresh server's first-request set-up is not timed.

    A freshly started syncproxy took about 30 ms longer for its first forwarded request than
    for later ones, which a login, as the first request, would otherwise carry.
    """
    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else False
    response = httpx.get(endpoint + "health", verify=verify, timeout=30)
    if response.status_code != 200:
        raise RuntimeError(f"GET {endpoint}health returned status {response.status_code}")


def measure_clients(setup: Setup, repeats: int, incremental_syncs: int) -> dict:
    """Measure every client phase through every path, with fresh server state per repeat."""
    samples: dict[str, dict[str, list[float]]] = {
        path: {phase: [] for phase in PHASES} for path in CLIENT_PATHS}
    memory: dict[str, dict[str, int]] = {}
    users = {path: f"bench{number}" for number, path in enumerate(CLIENT_PATHS)}
    for repeat in range(repeats):
        base = setup.work / f"clients-{repeat}"
        core = Core(base / "core", {users[path]: PASSWORD for path in CLIENT_PATHS[:3]})
        servers: list = [core]
        try:
            nginx = Nginx(base / "nginx", core.port, setup.cert, setup.key)
            servers.append(nginx)
            forwarder = Syncproxy(base / "syncproxy-upstream", "--upstream", core.url,
                                  tls_from=setup.tls_dir, source=setup.source)
            servers.append(forwarder.start())
            bundled = Syncproxy(base / "syncproxy-bundled", tls_from=setup.tls_dir,
                                source=setup.source)
            bundled.add_user(users[CLIENT_PATHS[3]], PASSWORD)
            servers.append(bundled.start())

            endpoints = {CLIENT_PATHS[0]: (core.url, None),
                         CLIENT_PATHS[1]: (nginx.url, setup.trust),
                         CLIENT_PATHS[2]: (forwarder.url, setup.trust),
                         CLIENT_PATHS[3]: (bundled.url, setup.trust)}
            for endpoint, ca_file in endpoints.values():
                warm_up(endpoint, ca_file)
            order = rotated(list(CLIENT_PATHS), repeat)
            print(f"  clients, repeat {repeat + 1}/{repeats}: " + ", ".join(order), flush=True)
            for path in order:
                endpoint, ca_file = endpoints[path]
                directory = base / "clients" / users[path]
                result = client_phases(setup, directory, endpoint, ca_file, users[path],
                                       incremental_syncs)
                for phase, seconds in result.items():
                    samples[path][phase].append(seconds)
                print(f"    {path}: " + ", ".join(f"{phase} {seconds:.3f} s"
                                                for phase, seconds in result.items()), flush=True)
            memory = {"sync core (anki.syncserver)": memory_kib(core.process.pid),
                      "syncproxy front end, bundled core": memory_kib(bundled.process.pid),
                      "syncproxy front end, --upstream": memory_kib(forwarder.process.pid)}
        finally:
            for server in reversed(servers):
                server.stop()
    medians = {path: {phase: statistics.median(values) for phase, values in phases.items()}
               for path, phases in samples.items()}
    return {"samples": samples, "medians": medians, "memory_after_last_repeat": memory}


# ---------------------------------------------------------------- small requests with wrk


SMALL_TARGETS = ("core direct (http)", "nginx (https)", "bare hypercorn (https)",
                 "syncproxy --upstream (https)")
WRK_REQUESTS = ("GET /health", "POST /sync/meta")


def host_key(user: str, password: str) -> str:
    """Return the sync core's host key for a user with a plain password: sha1 of `user:password`."""
    return hashlib.sha1(f"{user}:{password}".encode()).hexdigest()


def meta_request(user: str) -> tuple[bytes, dict[str, str]]:
    """Return the zstd body and headers of the sync protocol's `meta` request (version 11)."""
    body = zstandard.ZstdCompressor().compress(json.dumps({"v": 11, "cv": CLIENT_VERSION}).encode())
    sync_header = json.dumps({"v": 11, "k": host_key(user, PASSWORD), "c": CLIENT_VERSION,
                              "s": "bench"}, separators=(",", ":"))
    return body, {"anki-sync": sync_header, "content-type": "application/octet-stream"}


def lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{byte}" for byte in data) + '"'


def write_post_script(path: Path, user: str) -> None:
    body, headers = meta_request(user)
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(body)}"]
    lines += [f"wrk.headers[{lua_string(name.encode())}] = {lua_string(value.encode())}"
              for name, value in headers.items()]
    path.write_text("\n".join(lines) + "\n")


def check_small_requests(url: str, trust: Path | None, user: str, expect_meta: bool) -> None:
    """Raise unless the GET and the POST that wrk repeats return 200 (and real sync metadata)."""
    verify = str(trust) if trust else False
    with httpx.Client(verify=verify if url.startswith("https") else False, timeout=10) as client:
        response = client.get(url + "health")
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}health returned status {response.status_code}")
        body, headers = meta_request(user)
        response = client.post(url + "sync/meta", content=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"POST {url}sync/meta returned status {response.status_code}: "
                               f"{response.text[:200]}")
        if expect_meta:
            meta = json.loads(zstandard.ZstdDecompressor().decompress(response.content,
                                                                      max_output_size=MB))
            if "usn" not in meta:
                raise RuntimeError(f"POST {url}sync/meta returned no sync metadata: {meta}")


def run_wrk(url: str, connections: int, seconds: int, script: Path | None) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    if script is not None:
        command += ["-s", str(script)]
    result = subprocess.run([*command, url], capture_output=True, text=True,
                            timeout=seconds + 60)
    output = result.stdout + result.stderr
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    total = re.search(r"([0-9]+) requests in", output)
    if result.returncode != 0 or not rate or not total:
        raise RuntimeError(f"wrk failed on {url}:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", output)
    socket_errors = re.search(r"Socket errors: connect ([0-9]+), read ([0-9]+), "
                              r"write ([0-9]+), timeout ([0-9]+)", output)
    return {"rate": float(rate.group(1)), "requests": int(total.group(1)),
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0}


def measure_small_requests(setup: Setup, repeats: int, seconds: int) -> dict:
    """Measure requests/s of a small GET and POST at 1 and 32 connections on every target."""
    user = "bench-wrk"
    base = setup.work / "small"
    core = Core(base / "core", {user: PASSWORD})
    servers: list = [core]
    try:
        nginx = Nginx(base / "nginx", core.port, setup.cert, setup.key)
        servers.append(nginx)
        constant = Script("constant_app.py", "--certfile", str(setup.cert),
                          "--keyfile", str(setup.key), tls=True)
        servers.append(constant)
        forwarder = Syncproxy(base / "syncproxy", "--upstream", core.url, tls_from=setup.tls_dir,
                              source=setup.source)
        servers.append(forwarder.start())
        urls = dict(zip(SMALL_TARGETS, (core.url, nginx.url, constant.url, forwarder.url)))
        for target, url in urls.items():
            check_small_requests(url, setup.trust, user, expect_meta="hypercorn" not in target)

        script = base / "post-meta.lua"
        write_post_script(script, user)
        runs: dict[str, list[dict]] = {}
        for repeat in range(repeats):
            print(f"  small requests, repeat {repeat + 1}/{repeats}", flush=True)
            for connections in (1, 32):
                for request in WRK_REQUESTS:
                    for target in rotated(list(SMALL_TARGETS), repeat):
                        is_post = request.startswith("POST")
                        url = urls[target] + ("sync/meta" if is_post else "health")
                        result = run_wrk(url, connections, seconds, script if is_post else None)
                        runs.setdefault(f"{request}|{connections}|{target}", []).append(result)
    finally:
        for server in reversed(servers):
            server.stop()

    table = {}
    for key, results in runs.items():
        table[key] = {"rate": statistics.median(result["rate"] for result in results),
                      "requests": sum(result["requests"] for result in results),
                      "non_2xx": sum(result["non_2xx"] for result in results),
                      "socket_errors": sum(result["socket_errors"] for result in results)}
    return {"runs": runs, "medians": table, "seconds": seconds, "repeats": repeats}


# ---------------------------------------------------------------- bulk transfers and memory


BULK_TARGETS = ("upstream direct (http)", "nginx (https)", "syncproxy --upstream (https)")
CURL_FORMAT = "%{http_code} %{time_total} %{size_upload} %{size_download}"


def curl(url: str, upload: Path | None, trust: Path) -> dict:
    """Upload a file (chunked, like the Anki client) or download to /dev/null with curl."""
    command = ["curl", "--silent", "--show-error", "--http1.1", "--cacert", str(trust),
               "--output", "/dev/null", "--write-out", CURL_FORMAT, "--max-time", "600"]
    if upload is not None:
        command += ["--request", "POST", "--upload-file", str(upload),
                    "--header", "Transfer-Encoding: chunked", "--header", "Expect:",
                    "--header", "Content-Type: application/octet-stream"]
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=660)
    fields = result.stdout.split()
    if result.returncode != 0 or len(fields) != 4 or fields[0] != "200":
        raise RuntimeError(f"curl {url} failed (exit {result.returncode}): "
                           f"{result.stdout} {result.stderr}")
    return {"seconds": float(fields[1]), "uploaded": int(fields[2]),
            "downloaded": int(fields[3])}


def make_file(path: Path, size: int) -> Path:
    block = hashlib.sha256(b"bench").digest() * (MB // 32)
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            part = block[: size - written]
            handle.write(part)
            written += len(part)
    return path


def transfer(url: str, size: int, upload_file: Path | None, trust: Path) -> float:
    """Return MB/s of one upload (when `upload_file` is given) or one download of `size` bytes."""
    if upload_file is not None:
        result = curl(url + "sync/upload", upload_file, trust)
        # curl counts the chunked framing too, a few bytes per chunk.
        complete = size <= result["uploaded"] < size * 1.01
    else:
        result = curl(url + f"sync/download?bytes={size}", None, trust)
        complete = result["downloaded"] == size
    if not complete:
        raise RuntimeError(f"{url}: transfer of {size} bytes incomplete: {result}")
    return size / MB / result["seconds"]


def measure_transfers(setup: Setup, repeats: int, size_mb: int, memory_mb: int) -> dict:
    """Measure upload and download MB/s through each path, then syncproxy's memory."""
    base = setup.work / "bulk"
    base.mkdir()
    size = size_mb * MB
    payload = make_file(base / "upload.bin", size)
    upstream = Script("bulk_upstream.py")
    servers: list = [upstream]
    rates: dict[str, dict[str, list[float]]] = {target: {"upload": [], "download": []}
                                                for target in BULK_TARGETS}
    try:
        nginx = Nginx(base / "nginx", upstream.port, setup.cert, setup.key)
        servers.append(nginx)
        forwarder = Syncproxy(base / "syncproxy", "--upstream", upstream.url,
                              "--max-body-mb", "4096", tls_from=setup.tls_dir,
                              source=setup.source)
        servers.append(forwarder.start())
        urls = dict(zip(BULK_TARGETS, (upstream.url, nginx.url, forwarder.url)))
        for repeat in range(repeats):
            print(f"  {size_mb} MB transfers, repeat {repeat + 1}/{repeats}", flush=True)
            for target in rotated(list(BULK_TARGETS), repeat):
                rates[target]["upload"].append(transfer(urls[target], size, payload, setup.trust))
                rates[target]["download"].append(transfer(urls[target], size, None, setup.trust))
        payload.unlink()

        print(f"  syncproxy memory around {memory_mb} MB transfers", flush=True)
        memory = measure_memory(setup, base, upstream.url, memory_mb)
    finally:
        for server in reversed(servers):
            server.stop()
    medians = {target: {direction: statistics.median(values)
                        for direction, values in directions.items()}
               for target, directions in rates.items()}
    return {"rates": rates, "medians": medians, "size_mb": size_mb, "repeats": repeats,
            "memory": memory}


def measure_memory(setup: Setup, base: Path, upstream_url: str, size_mb: int) -> dict:
    """Return syncproxy's VmRSS idle after start and its peak (VmHWM) during each transfer."""
    size = size_mb * MB
    payload = make_file(base / "memory.bin", size)
    forwarder = Syncproxy(base / "syncproxy-memory", "--upstream", upstream_url,
                          "--max-body-mb", "4096", tls_from=setup.tls_dir,
                          source=setup.source).start()
    try:
        time.sleep(2.0)  # let start-up work settle before calling it idle
        pid = forwarder.process.pid
        idle = memory_kib(pid)
        peaks = {}
        for direction in ("upload", "download"):
            reset_peak_memory(pid)
            transfer(forwarder.url, size, payload if direction == "upload" else None, setup.trust)
            peaks[direction] = memory_kib(pid)["VmHWM"]
        after = memory_kib(pid)
    finally:
        forwarder.stop()
        payload.unlink()
    return {"idle_rss_kib": idle["VmRSS"], "idle_hwm_kib": idle["VmHWM"],
            "peak_upload_kib": peaks["upload"], "peak_download_kib": peaks["download"],
            "after_rss_kib": after["VmRSS"], "size_mb": size_mb}
