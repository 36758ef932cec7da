"""The multi-core part of bench/anchors.py: syncproxy's bundled core with `--cores 1` and `2`.

Eight users log in at once, then eight full uploads of ready-made collections run at once. Each
real client runs in its own process, and all of them wait for one shared wall-clock start time
(`anki_client.py --start-at`), so Python's start-up is not timed. A workload's time runs from
that start to the last client's finish.

Both workloads are also timed as bare HTTP requests (`POST /sync/hostKey` and `POST
/sync/upload`, zstd bodies) sent over eight connections opened beforehand, which leaves out the
clients' CPU use and TLS handshakes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import zstandard

from measure import CLIENT_VERSION, MB, PASSWORD, Setup
from servers import Syncproxy
from support import AnkiClient, clean_environment

USERS = 8
CORE_COUNTS = (1, 2)
WORKLOADS = ("8 concurrent logins, real clients", "8 concurrent logins, HTTP requests",
             "8 concurrent full uploads, real clients", "8 concurrent full uploads, HTTP requests")
# Time for eight client processes to import anki and open their collections before the start.
LAUNCH_MARGIN_SECONDS = 6.0


def cores_flag_missing(source: Path | None) -> str | None:
    """Return why `--cores` cannot be measured with this syncproxy, or None if it can."""
    result = subprocess.run([sys.executable, "-m", "syncproxy", "serve", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=source,
                            env=clean_environment({"PYTHONPATH": str(source)} if source else {}))
    if "--cores" in result.stdout:
        return None
    where = f"the checkout {source}" if source else "the installed syncproxy"
    return (f"not measured: {where} has no --cores option ('syncproxy serve --help' does not "
            f"list it). Run again with --syncproxy-source pointing at a checkout that has it.")


def run_together(clients: list[AnkiClient], action: str, arguments: list[list[str]],
                 inputs: list[str | None]) -> tuple[float, float, list[dict]]:
    """Start one client process per user, all released at one wall-clock time.

    Returns the time from that start to the last finish, how late the slowest process was
    ready (0 when all were ready in time), and each client's output.
    """
    start_at = time.time() + LAUNCH_MARGIN_SECONDS
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(client.run, action, *extra, "--start-at", str(start_at),
                               input=text)
                   for client, extra, text in zip(clients, arguments, inputs)]
        outputs = [future.result() for future in futures]
    late = max(0.0, max(output["ready"] for output in outputs) - start_at)
    return max(output["finished"] for output in outputs) - start_at, late, outputs


def login_request(user: str) -> tuple[bytes, dict[str, str]]:
    """Return the zstd body and headers of the sync protocol's login (`hostKey`) request."""
    body = zstandard.ZstdCompressor().compress(json.dumps({"u": user, "p": PASSWORD}).encode())
    sync_header = json.dumps({"v": 11, "k": "", "c": CLIENT_VERSION, "s": ""},
                             separators=(",", ":"))
    return body, {"anki-sync": sync_header, "content-type": "application/octet-stream"}


def upload_request(host_key: str, collection: bytes) -> tuple[bytes, dict[str, str]]:
    """Return the zstd body and headers of the sync protocol's full upload request."""
    sync_header = json.dumps({"v": 11, "k": host_key, "c": CLIENT_VERSION, "s": ""},
                             separators=(",", ":"))
    return (zstandard.ZstdCompressor().compress(collection),
            {"anki-sync": sync_header, "content-type": "application/octet-stream"})


async def send_at_once(url: str, trust: Path, path: str,
                       requests: list[tuple[bytes, dict[str, str]]]) -> tuple[float, list]:
    """Send the requests at once, each on its own open connection; return seconds, responses."""
    context = ssl.create_default_context(cafile=str(trust))
    clients = [httpx.AsyncClient(verify=context, timeout=300) for _ in requests]
    try:
        # syncproxy responds to its own health path itself: this opens each connection, TLS included.
        await asyncio.gather(*(client.get(url + "_syncproxy/health") for client in clients))
        started = time.perf_counter()
        responses = await asyncio.gather(*(
            client.post(url + path, content=body, headers=headers)
            for client, (body, headers) in zip(clients, requests)))
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    for response in responses:
        if response.status_code != 200:
            raise RuntimeError(f"{path} returned status {response.status_code}: "
                               f"{response.text[:200]}")
    return seconds, responses


async def send_logins(url: str, trust: Path, users: list[str]) -> float:
    """Send one login per user at once; return the seconds."""
    seconds, responses = await send_at_once(url, trust, "sync/hostKey",
                                            [login_request(user) for user in users])
    for user, response in zip(users, responses):
        answer = json.loads(zstandard.ZstdDecompressor().decompress(response.content,
                                                                    max_output_size=MB))
        if "key" not in answer:
            raise RuntimeError(f"login of {user} returned no host key")
    return seconds


async def send_uploads(url: str, trust: Path, host_keys: list[str], collection: bytes) -> float:
    """Send one full upload of `collection` per host key at once; return the seconds."""
    seconds, responses = await send_at_once(url, trust, "sync/upload",
                                            [upload_request(key, collection) for key in host_keys])
    for response in responses:
        answer = zstandard.ZstdDecompressor().decompress(response.content, max_output_size=MB)
        if answer != b"OK":
            raise RuntimeError(f"a full upload returned {answer[:200]!r} instead of OK")
    return seconds


def measure_cores(setup: Setup, repeats: int) -> dict:
    """Time eight concurrent logins and full uploads with one and with two sync cores."""
    source = setup.source
    missing = cores_flag_missing(source)
    if missing:
        return {"missing": missing}

    base = setup.work / "cores"
    users = [f"user{number}" for number in range(USERS)]
    # Adding users hashes passwords, which is slow: do it once and copy the data directory.
    seeded = Syncproxy(base / "seeded", source=source, tls_from=setup.tls_dir)
    for user in users:
        seeded.add_user(user, PASSWORD)

    times: dict[int, dict[str, list[float]]] = {
        cores: {workload: [] for workload in WORKLOADS} for cores in CORE_COUNTS}
    worst_late = 0.0
    for repeat in range(repeats):
        order = CORE_COUNTS if repeat % 2 == 0 else tuple(reversed(CORE_COUNTS))
        for cores in order:
            run_dir = base / f"run-{repeat}-cores-{cores}"
            shutil.copytree(seeded.data_dir, run_dir / "data")
            proxy = Syncproxy(run_dir / "data", "--cores", str(cores), source=source).start()
            try:
                clients = []
                for user in users:
                    client = AnkiClient(run_dir / user, proxy.url, setup.trust)
                    shutil.copy(setup.template, client.collection)
                    clients.append(client)

                login_args = [["--endpoint", proxy.url, "--user", user, "--password-stdin"]
                              for user in users]
                seconds, late, outputs = run_together(clients, "login", login_args,
                                                      [PASSWORD + "\n"] * USERS)
                times[cores][WORKLOADS[0]].append(seconds)
                worst_late = max(worst_late, late)
                for client, output in zip(clients, outputs):
                    client.hkey = output["hkey"]

                seconds = asyncio.run(send_logins(proxy.url, setup.trust, users))
                times[cores][WORKLOADS[1]].append(seconds)

                upload_args = [["--endpoint", proxy.url, "--hkey", client.hkey, "--upload",
                                "--no-media"] for client in clients]
                seconds, late, outputs = run_together(clients, "sync", upload_args,
                                                      [None] * USERS)
                if any(output["notes"] != setup.notes for output in outputs):
                    raise RuntimeError(f"a full upload with --cores {cores} lost notes: "
                                       f"{[output['notes'] for output in outputs]}")
                times[cores][WORKLOADS[2]].append(seconds)
                worst_late = max(worst_late, late)

                seconds = asyncio.run(send_uploads(proxy.url, setup.trust,
                                                   [client.hkey for client in clients],
                                                   setup.template.read_bytes()))
                times[cores][WORKLOADS[3]].append(seconds)
            finally:
                proxy.stop()
            print(f"  --cores {cores}, repeat {repeat + 1}/{repeats}: " + ", ".join(
                f"{workload} {values[-1]:.3f} s" for workload, values in times[cores].items()),
                flush=True)

    medians = {cores: {workload: statistics.median(values)
                       for workload, values in workloads.items()}
               for cores, workloads in times.items()}
    return {"times": times, "medians": medians, "late_seconds": worst_late,
            "repeats": repeats, "notes": setup.notes}
