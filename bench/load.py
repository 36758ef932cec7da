"""Load the front end on loopback: real-client syncs plus raw keep-alive requests, then report.

    python bench/load.py --seconds 60 --connections 200 --clients 4

Starts its own syncproxy (TLS, bundled sync core) in a temporary directory and stops it when
done. `--clients` real Anki clients each sync in a loop (one user each, so they never collide);
the remaining connections send raw requests over TLS in a loop: the health check, and a
/sync/meta with a host key that does not exist (403 on purpose). Every status of 500 or more
counts as a failure. The front end's resident memory is sampled once a second.

Prints one JSON object. The exit status is 1 if any request failed, or if memory grew by more
than --max-rss-growth-mb in the second half of the run: the first half is where 200 open
connections lift it to its working size, and growth after that would be a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from rawhttp import insecure_context, vm_rss_kib  # noqa: E402
from support import AnkiClient, ClientError, SyncProxy, add_user  # noqa: E402

HEALTH = b"GET /_syncproxy/health HTTP/1.1\r\nHost: bench\r\n\r\n"
BAD_KEY_META = (b"POST /sync/meta HTTP/1.1\r\nHost: bench\r\n"
                b'anki-sync: {"v":11,"k":"0000000000000000000000000000000000000000","c":"b",'
                b'"s":"s"}\r\nContent-Length: 2\r\n\r\n{}')


async def read_status(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return status


async def raw_worker(port: int, context: ssl.SSLContext, stop_at: float,
                     statuses: Counter, errors: Counter, index: int) -> None:
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                           server_hostname="localhost")
        except (OSError, ssl.SSLError) as error:
            errors[f"connect: {type(error).__name__}"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            sent = 0
            while time.monotonic() < stop_at:
                request = BAD_KEY_META if (sent + index) % 5 == 0 else HEALTH
                writer.write(request)
                await writer.drain()
                statuses[await asyncio.wait_for(read_status(reader), 30)] += 1
                sent += 1
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
            errors[f"request: {type(error).__name__}"] += 1
        finally:
            writer.close()


def client_worker(client: AnkiClient, stop_at: float, results: Counter) -> None:
    round_number = 0
    while time.monotonic() < stop_at:
        round_number += 1
        try:
            client.edit(3, f"round-{round_number}")
            client.sync()
            results["ok"] += 1
        except ClientError as error:
            results["failed"] += 1
            print(f"client sync failed: {error.stderr[-300:]}", file=sys.stderr)


def sample_rss(pid: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set():
        samples.append(vm_rss_kib(pid))
        stop.wait(1.0)


def run(seconds: float, connections: int, clients: int, workdir: Path) -> dict:
    data_dir = workdir / "data"
    for number in range(clients):
        add_user(data_dir, f"bench{number}", f"bench-password-{number}")
    with SyncProxy(data_dir, "--max-connections", str(connections * 2)) as server:
        assert server.process is not None
        ca_file = server.ca_file()
        anki_clients = []
        for number in range(clients):
            client = AnkiClient(workdir / f"client{number}", server.endpoint, ca_file)
            client.build(500, 5, label=f"bench{number}")
            client.login(f"bench{number}", f"bench-password-{number}")
            client.sync("--upload")
            anki_clients.append(client)
        rss_start = vm_rss_kib(server.process.pid)

        samples: list[int] = []
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=sample_rss,
                                   args=(server.process.pid, stop_sampling, samples))
        sampler.start()
        started = time.monotonic()
        stop_at = started + seconds

        sync_results: Counter = Counter()
        threads = [threading.Thread(target=client_worker, args=(client, stop_at, sync_results))
                   for client in anki_clients]
        for thread in threads:
            thread.start()

        statuses: Counter = Counter()
        errors: Counter = Counter()
        context = insecure_context()

        async def raw_load() -> None:
            await asyncio.gather(*(raw_worker(server.port, context, stop_at, statuses, errors, i)
                                   for i in range(connections - clients)))

        asyncio.run(raw_load())
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        stop_sampling.set()
        sampler.join()
        rss_end = vm_rss_kib(server.process.pid)
        log = server.log()

    raw_requests = sum(statuses.values())
    return {
        "seconds": round(elapsed, 1),
        "connections": connections,
        "real_clients": clients,
        "raw_requests": raw_requests,
        "raw_requests_per_second": round(raw_requests / elapsed, 1),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "server_errors": sum(count for status, count in statuses.items() if status >= 500),
        "connection_errors": dict(errors),
        "client_syncs_ok": sync_results["ok"],
        "client_syncs_failed": sync_results["failed"],
        "rss_start_mib": round(rss_start / 1024, 1),
        "rss_quarter_mib": round(samples[len(samples) // 4] / 1024, 1),
        "rss_half_mib": round(samples[len(samples) // 2] / 1024, 1),
        "rss_peak_mib": round(max(samples + [rss_end]) / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1),
        "tracebacks_in_log": log.count("Error in ASGI"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-rss-growth-mb", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="syncproxy-load-") as workdir:
        report = run(args.seconds, args.connections, args.clients, Path(workdir))
    print(json.dumps(report, indent=2))
    growth = report["rss_end_mib"] - report["rss_half_mib"]
    failed = (report["server_errors"] or report["client_syncs_failed"]
              or report["tracebacks_in_log"] or growth > args.max_rss_growth_mb)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
