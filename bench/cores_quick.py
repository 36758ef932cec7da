"""Quick check of --cores: 8 concurrent logins and 8 concurrent full uploads, 1 core against 2.

    python bench/cores_quick.py [--rounds 9] [--work DIR] [CORES ...]

Eight users, each with a ready-made 20,000-note collection (built once with the real Anki
client and kept in --work). For each core count a syncproxy (TLS, bundled sync cores) is started
on the same data directory with a fresh core assignment. The requests are raw current-protocol
(v11) requests over TLS through the front end, sent at once from one asyncio client over warm
connections, so that no client process start-up is measured. Prints each round and the medians.

The clients share the machine's CPUs with syncproxy and the cores, and the gain from a second
core shrinks when other processes keep the CPUs busy: check that the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import zstandard

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from support import AnkiClient, SyncProxy, add_user  # noqa: E402
from syncproxy.users import host_key  # noqa: E402

USERS = [f"user{index}" for index in range(8)]
NOTES = 20_000
CLIENT_VERSION = "26.09.3,bench,linux"


def sync_header(key: str) -> str:
    return json.dumps({"v": 11, "k": key, "c": CLIENT_VERSION, "s": "bench"})


def upload_bodies(work: Path) -> list[bytes]:
    """Return each user's collection as a zstd upload body, building missing ones."""
    bodies = []
    for name in USERS:
        path = work / "collections" / name / "collection.anki2"
        if not path.exists():
            AnkiClient(path.parent, "https://127.0.0.1:1/", None).build(NOTES, 0, label=name)
        bodies.append(zstandard.compress(path.read_bytes()))
    return bodies


async def timed(url: str, requests: list[tuple[str, str, bytes]]) -> float:
    """Send every (path, anki-sync header, body) at once; return the seconds until all are done."""
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(verify=False, timeout=300, limits=limits) as client:
        # Open one connection per request first, so that TLS handshakes are not measured.
        await asyncio.gather(*(client.get(url + "_syncproxy/health") for _ in requests))
        started = time.perf_counter()
        responses = await asyncio.gather(*(
            client.post(url + path, headers={"anki-sync": header}, content=body)
            for path, header, body in requests))
        elapsed = time.perf_counter() - started
    for response in responses:
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.url.path} returned {response.status_code}: "
                               f"{response.text[:200]}")
    return elapsed


def measure(data_dir: Path, cores: str, rounds: int, bodies: list[bytes]) -> tuple[list, list]:
    users = json.loads((data_dir / "users.json").read_text())["users"]
    keys = [host_key(name, users[name]["hash"]) for name in USERS]
    logins = [("sync/hostKey", sync_header(""),
               zstandard.compress(json.dumps({"u": name, "p": f"{name}-pw"}).encode()))
              for name in USERS]
    uploads = [("sync/upload", sync_header(key), body) for key, body in zip(keys, bodies)]

    (data_dir / "cores.json").unlink(missing_ok=True)
    with SyncProxy(data_dir, "--cores", cores, "--log-level", "warning") as server:
        asyncio.run(timed(server.endpoint, logins))  # warm-up
        login_times = [asyncio.run(timed(server.endpoint, logins)) for _ in range(rounds)]
        asyncio.run(timed(server.endpoint, uploads))
        upload_times = [asyncio.run(timed(server.endpoint, uploads)) for _ in range(rounds)]
    return login_times, upload_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cores", nargs="*", default=["1", "2"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder that keeps the built collections between runs")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="syncproxy-cores-"))
    bodies = upload_bodies(work)
    data_dir = work / "data"
    if not (data_dir / "users.json").exists():
        for name in USERS:
            add_user(data_dir, name, f"{name}-pw")

    medians = {}
    for cores in args.cores:
        login_times, upload_times = measure(data_dir, cores, args.rounds, bodies)
        medians[cores] = (statistics.median(login_times), statistics.median(upload_times))
        print(f"cores={cores} logins_s={[round(t, 3) for t in login_times]} "
              f"uploads_s={[round(t, 3) for t in upload_times]}")
    for cores, (login, upload) in medians.items():
        line = f"cores={cores} median 8 logins {login:.3f} s, 8 full uploads {upload:.3f} s"
        if "1" in medians and cores != "1":
            line += (f" ({medians['1'][0] / login:.2f}x and {medians['1'][1] / upload:.2f}x "
                     f"of one core)")
        print(line)


if __name__ == "__main__":
    main()
