"""Benchmark: a large HTTP/2 download from nginx, direct and through syncproxy's splice.

Starts Debian's nginx (the test harness's setup: www.test, HTTP/2, PROXY protocol required) and
syncproxy in front of it with `--passthrough` and a v1 PROXY header, then downloads one file with
curl, alternating direct and spliced runs. Reports the median throughput of each, their ratio,
syncproxy's CPU time per spliced run, and its resident memory before, during (peak of samples
every 20 ms) and after.

    python bench/passthrough_download.py [--size-mb 200] [--runs 3]

Needs nginx and curl (apt-get install nginx curl) and the syncproxy test dependencies. Everything
listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trustme

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from nginx_server import Nginx  # noqa: E402
from support import SyncProxy, add_user  # noqa: E402


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """Samples a process's resident memory in a thread until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_kib(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def download(port: int, nginx: Nginx, *extra: str) -> dict[str, float]:
    completed = subprocess.run(
        ["curl", "--silent", "--show-error", "--http2", "--cacert", str(nginx.ca_file),
         "--connect-to", f"www.test:443:127.0.0.1:{port}", "--output", "/dev/null",
         "--write-out", "%{http_version} %{size_download} %{time_total}", *extra,
         "https://www.test/big.bin"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    version, size, seconds = completed.stdout.split()
    if version != "2":
        raise RuntimeError(f"expected HTTP/2 from nginx, got HTTP/{version}")
    return {"bytes": int(size), "seconds": float(seconds), "mb_per_s": int(size) / float(seconds) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="syncproxy-bench-") as scratch, Nginx(trustme.CA()) as nginx:
        with open(nginx.html / "big.bin", "wb") as handle:
            for _ in range(args.size_mb):
                handle.write(os.urandom(1024 * 1024))
        (nginx.html / "big.bin").chmod(0o644)

        data_dir = Path(scratch) / "data"
        add_user(data_dir, "bench", "bench-password")
        proxy = SyncProxy(data_dir, "--sync-name", "sync.test", "--passthrough", f"127.0.0.1:{nginx.port}",
                          "--passthrough-proxy-protocol", "v1", "--log-level", "warning").start()
        try:
            pid = proxy.process.pid
            rss_before = resident_kib(pid)
            direct, spliced = [], []
            with MemorySampler(pid) as sampler:
                for _ in range(args.runs):
                    direct.append(download(nginx.port, nginx, "--haproxy-protocol"))
                    cpu_before = cpu_seconds(pid)
                    spliced.append(download(proxy.port, nginx))
                    spliced[-1]["syncproxy_cpu_s"] = cpu_seconds(pid) - cpu_before
            rss_after = resident_kib(pid)
        finally:
            proxy.stop()

    direct_speed = statistics.median(run["mb_per_s"] for run in direct)
    spliced_speed = statistics.median(run["mb_per_s"] for run in spliced)
    print(json.dumps({
        "size_mb": args.size_mb,
        "runs": args.runs,
        "direct_mb_per_s": [round(run["mb_per_s"]) for run in direct],
        "spliced_mb_per_s": [round(run["mb_per_s"]) for run in spliced],
        "median_direct_mb_per_s": round(direct_speed),
        "median_spliced_mb_per_s": round(spliced_speed),
        "ratio": round(spliced_speed / direct_speed, 3),
        "syncproxy_cpu_s_per_spliced_run": [round(run["syncproxy_cpu_s"], 2) for run in spliced],
        "load_average_1min": round(os.getloadavg()[0], 1),
        "syncproxy_rss_kib": {"before": rss_before, "peak": sampler.peak, "after": rss_after},
    }, indent=2))


if __name__ == "__main__":
    main()
