"""Compare HTTP clients for the upstream side of syncproxy, alone, against the sync core.

Small GET requests to the core's /health on loopback, from one event loop, with 1 and 32
concurrent tasks. It measures the client's own cost per request (CPU time of this process),
which is what the front end pays on every forwarded request:

- httpx as syncproxy uses it (`syncproxy.upstream_client.UpstreamTransports`);
- plain `httpx.AsyncClient` with its defaults (anyio network layer, one pool);
- aiohttp's ClientSession, if aiohttp is installed (it is not a syncproxy dependency).

    python bench/upstream_clients.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import Core  # noqa: E402

from syncproxy.upstream_client import UpstreamTransports  # noqa: E402


async def run_tasks(fetch, requests: int, tasks: int) -> None:
    per_task = requests // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await fetch()

    await asyncio.gather(*(worker() for _ in range(tasks)))


async def measure(name: str, url: str, requests: int, tasks: int) -> tuple[float, float]:
    """Return (requests per second, CPU microseconds per request) for one client."""
    if name == "httpx, as syncproxy uses it":
        transports = UpstreamTransports(5.0, 30.0, tls=False)

        async def fetch() -> None:
            async with transports.borrow() as transport:
                request = httpx.Request("GET", url, extensions={"timeout": transports.timeouts})
                response = await transport.handle_async_request(request)
                async for _ in response.aiter_raw():
                    pass
                await response.aclose()

        close = transports.aclose
    elif name == "httpx.AsyncClient, defaults":
        client = httpx.AsyncClient(trust_env=False)

        async def fetch() -> None:
            async with client.stream("GET", url) as response:
                async for _ in response.aiter_raw():
                    pass

        close = client.aclose
    else:
        import aiohttp
        session = aiohttp.ClientSession(auto_decompress=False)

        async def fetch() -> None:
            async with session.get(url) as response:
                async for _ in response.content.iter_any():
                    pass

        close = session.close
    await run_tasks(fetch, min(requests, 200), tasks)  # warm up the pools
    wall, cpu = time.perf_counter(), time.process_time()
    await run_tasks(fetch, requests, tasks)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await close()
    return requests / wall, cpu / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = ["httpx, as syncproxy uses it", "httpx.AsyncClient, defaults"]
    if importlib.util.find_spec("aiohttp") is not None:
        names.append("aiohttp.ClientSession")
    else:
        print("aiohttp is not installed: measuring httpx only", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="syncproxy-bench-") as temporary:
        core = Core(Path(temporary) / "core", {"bench": "bench-password"})
        try:
            url = f"{core.url}health"
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _ in range(args.repeats):
                for tasks in (1, 32):
                    for name in names:
                        results.setdefault((name, tasks), []).append(
                            asyncio.run(measure(name, url, args.requests, tasks)))
        finally:
            core.stop()

    print(f"{args.requests} GET /health to the sync core, median of {args.repeats} runs\n")
    print("| client | tasks | requests/s | CPU µs per request |")
    print("|---|---|---|---|")
    for (name, tasks), runs in results.items():
        rate = statistics.median(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        print(f"| {name} | {tasks} | {rate:,.0f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
