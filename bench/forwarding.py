"""Benchmark the forwarding path: the sync core direct, through syncproxy, and through nginx.

All three paths serve the same sync core in one run, on loopback, so the ratios compare like with
like on whatever machine runs this. It measures what a user feels (a real client's incremental
sync, full upload and full download) and small-request throughput with h2load in HTTP/1.1 mode.

    python bench/forwarding.py [--rounds 15] [--notes 20000] [--media 50]

Needs Debian's nginx and nghttp2-client (h2load). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import AnkiClient, SyncProxy, clean_environment, free_port  # noqa: E402

USER, PASSWORD = "bench", "bench-password"

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
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        location / {{
            proxy_pass http://127.0.0.1:{core_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, verify=False, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(url)


def start_core(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environment = clean_environment({
        "SYNC_USER1": f"{USER}:{PASSWORD}", "SYNC_HOST": "127.0.0.1", "SYNC_PORT": str(port),
        "SYNC_BASE": str(work / "core"), "RUST_LOG": "warn",
    })
    process = subprocess.Popen([sys.executable, "-m", "anki.syncserver"], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(f"http://127.0.0.1:{port}/health")
    return process, port


def start_nginx(work: Path, core_port: int, tls_dir: Path) -> tuple[subprocess.Popen, int]:
    directory = work / "nginx"
    directory.mkdir()
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(NGINX_CONF.format(dir=directory, port=port, core_port=core_port,
                                        cert=tls_dir / "server.pem",
                                        key=tls_dir / "server-key.pem"))
    process = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(config)])
    wait_for(f"https://127.0.0.1:{port}/health")
    return process, port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def h2load_rps(url: str, seconds: int = 10, connections: int = 32) -> float:
    result = subprocess.run(
        ["h2load", "--h1", "-D", str(seconds), "-c", str(connections), "-t", "1", url],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    match = re.search(r"finished in .*?, ([0-9.]+) req/s", result.stdout)
    failed = re.search(r"requests: .*? ([0-9]+) failed", result.stdout)
    if not match:
        raise RuntimeError(result.stdout + result.stderr)
    if failed and int(failed.group(1)):
        print(f"warning: {failed.group(1)} failed requests at {url}", file=sys.stderr)
    return float(match.group(1))


def measure_path(name: str, endpoint: str, ca_file: Path | None, work: Path,
                 args: argparse.Namespace, template: Path) -> dict:
    """Full upload, full download and incremental syncs of one client through one path."""
    uploader = AnkiClient(work / f"{name}-up", endpoint, ca_file)
    shutil.copy(template, uploader.collection)
    shutil.copytree(template.with_suffix(".media"), uploader.collection.with_suffix(".media"))
    uploader.login(USER, PASSWORD)
    upload = uploader.sync("--upload", "--no-media")["seconds"]
    downloader = AnkiClient(work / f"{name}-down", endpoint, ca_file)
    downloader.login(USER, PASSWORD)
    download = downloader.sync("--download", "--no-media")["seconds"]
    incremental = []
    for round_number in range(args.rounds):
        uploader.edit(5, f"{name}-{round_number}")
        incremental.append(uploader.sync("--no-media")["seconds"])
    return {"upload": upload, "download": download,
            "incremental": statistics.median(incremental)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--notes", type=int, default=20000)
    parser.add_argument("--media", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="syncproxy-bench-") as temporary:
        work = Path(temporary)
        template_client = AnkiClient(work / "template", "http://unused/", None)
        template_client.build(args.notes, args.media, label="bench")
        template = template_client.collection

        core, core_port = start_core(work)
        proxy = SyncProxy(work / "data", "--upstream", f"http://127.0.0.1:{core_port}",
                          "--log-level", "warning").start()
        nginx = None
        try:
            trust = proxy.ca_file()
            nginx, nginx_port = start_nginx(work, core_port, work / "data" / "tls")
            paths = {
                "core direct (http)": (f"http://127.0.0.1:{core_port}/", None),
                "syncproxy (https)": (proxy.endpoint, trust),
                "nginx 1.22 (https)": (f"https://127.0.0.1:{nginx_port}/", trust),
            }
            results = {}
            for name, (endpoint, ca_file) in paths.items():
                label = name.split()[0]
                results[name] = measure_path(label, endpoint, ca_file, work, args, template)
                results[name]["rps"] = h2load_rps(endpoint + "health", args.seconds)
            results["syncproxy (https)"]["rss"] = rss_mib(proxy.process.pid)
        finally:
            proxy.stop()
            if nginx is not None:
                nginx.send_signal(signal.SIGQUIT)
                nginx.wait(30)
            core.send_signal(signal.SIGINT)
            core.wait(30)

    base = results["nginx 1.22 (https)"]
    print(f"Collection: {args.notes} notes; incremental sync: median of {args.rounds}; "
          f"small requests: h2load --h1, 32 connections, {args.seconds} s, GET /health.\n")
    print("| path | full upload s | full download s | incremental sync ms | small requests/s |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['upload']:.2f} | {row['download']:.2f} | "
              f"{row['incremental'] * 1000:.0f} | {row['rps']:.0f} |")
    ours = results["syncproxy (https)"]
    print(f"\nsyncproxy / nginx: upload {ours['upload'] / base['upload']:.2f}x the time, "
          f"download {ours['download'] / base['download']:.2f}x, incremental "
          f"{ours['incremental'] / base['incremental']:.2f}x, requests/s "
          f"{ours['rps'] / base['rps']:.2f}x; syncproxy RSS after the run "
          f"{ours['rss']:.0f} MiB")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
