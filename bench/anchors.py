"""Measure syncproxy against its anchors: the sync core, nginx and bare hypercorn.

Everything runs side by side in one run on this machine, on loopback, so the ratios compare like
with like. Part `anchors` measures:

1. the real Anki client (login, full upload with media, incremental syncs, full download with
   media into a fresh profile) through four paths: the core directly, nginx terminating TLS in
   front of the core, syncproxy `--upstream` the same core, and syncproxy with its bundled core.
   Every repeat has fresh server state and a rotated path order;
2. small requests with wrk (a GET of the core's /health and a POST of the sync protocol's
   `meta` request, 1 and 32 connections) against the core, nginx, syncproxy and bare hypercorn;
3. 100 MB uploads and downloads through nginx and syncproxy to a bulk upstream;
4. syncproxy's resident memory idle and during 500 MB transfers.

Part `cores` times 8 concurrent logins and 8 concurrent full uploads through syncproxy's
bundled core with `--cores 1` and `--cores 2`.

    python bench/anchors.py [--part all|anchors|cores] [--repeats 5] [--quick]
                            [--write docs/benchmarks.md] [--syncproxy-source DIR]

Needs Debian's nginx, wrk and curl. Prints Markdown; `--write` replaces the sections this
script owns in the given file and leaves the rest of it alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import load_average, machine_description  # noqa: E402
from measure import (  # noqa: E402
    EDITED_NOTES, Setup, measure_clients, measure_small_requests, measure_transfers,
)
from cores import measure_cores  # noqa: E402
from report import cores_section, anchors_section, replace_section  # noqa: E402
from support import AnkiClient, clean_environment  # noqa: E402

QUICK = {"repeats": 1, "wrk_repeats": 1, "wrk_seconds": 2, "transfer_repeats": 1,
         "incremental": 3, "notes": 2000,
         "media": 10, "transfer_mb": 20, "memory_mb": 100, "cores_repeats": 1}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Defaults take about 15 minutes on 2 CPUs; --quick about 3.")
    parser.add_argument("--part", choices=("all", "anchors", "cores"), default="all",
                        help="which part to run (default: all)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs of the real-client suite per path (default: 5)")
    parser.add_argument("--incremental", type=int, default=10,
                        help="incremental syncs per run; their median is reported (default: 10)")
    parser.add_argument("--notes", type=int, default=20000,
                        help="notes in the test collection (default: 20000)")
    parser.add_argument("--media", type=int, default=50,
                        help="media files in the test collection (default: 50)")
    parser.add_argument("--media-size", type=int, default=200_000,
                        help="bytes per media file (default: 200000)")
    parser.add_argument("--wrk-repeats", type=int, default=3,
                        help="wrk runs per request, connection count and target (default: 3)")
    parser.add_argument("--wrk-seconds", type=int, default=5,
                        help="seconds per wrk run (default: 5)")
    parser.add_argument("--transfer-repeats", type=int, default=5,
                        help="uploads and downloads per path (default: 5)")
    parser.add_argument("--transfer-mb", type=int, default=100,
                        help="size of each timed upload and download in MB (default: 100)")
    parser.add_argument("--memory-mb", type=int, default=500,
                        help="size of the transfers during which memory is watched, in MB "
                             "(default: 500)")
    parser.add_argument("--cores-repeats", type=int, default=3,
                        help="runs of the --cores comparison (default: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of 2 to 3 minutes: one repeat, 2,000 notes, 20 MB "
                             "transfers; its numbers are not for the record")
    parser.add_argument("--syncproxy-source", type=Path, default=None,
                        help="run syncproxy from this checkout instead of the installed package")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE",
                        help="replace this script's sections in FILE (docs/benchmarks.md)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write every sample and median to FILE as JSON")
    arguments = parser.parse_args()
    if arguments.quick:
        for name, value in QUICK.items():
            setattr(arguments, name, value)
    for name in ("repeats", "incremental", "notes", "wrk_repeats", "wrk_seconds",
                 "transfer_repeats", "transfer_mb", "memory_mb", "cores_repeats"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"not {getattr(arguments, name)}")
    if arguments.syncproxy_source:
        arguments.syncproxy_source = arguments.syncproxy_source.resolve()
    if arguments.syncproxy_source and not (arguments.syncproxy_source / "syncproxy").is_dir():
        parser.error(f"--syncproxy-source {arguments.syncproxy_source} has no syncproxy/ "
                     f"package: give the root of a syncproxy checkout")
    return arguments


def prepare(work: Path, arguments: argparse.Namespace) -> Setup:
    """Generate the shared certificate and build the test collection, before any timing."""
    tls_home = work / "certificate"
    trust = work / "trust.pem"
    result = subprocess.run([sys.executable, "-m", "syncproxy", "cert", "pem",
                             "--data-dir", str(tls_home)],
                            capture_output=True, text=True, check=True, timeout=120,
                            cwd=arguments.syncproxy_source, env=clean_environment())
    trust.write_text(result.stdout)

    print(f"building the test collection: {arguments.notes} notes, {arguments.media} media "
          f"files of {arguments.media_size} bytes", flush=True)
    builder = AnkiClient(work / "template", "http://127.0.0.1:1/", None)
    built = builder.build(arguments.notes, arguments.media, label="bench",
                          media_size=arguments.media_size)
    return Setup(work=work, tls_dir=tls_home / "tls", trust=trust,
                 template=builder.collection, notes=built["notes"], media=arguments.media,
                 source=arguments.syncproxy_source)


def main() -> None:
    arguments = parse_arguments()
    machine = machine_description(arguments.syncproxy_source)
    machine["load average before"] = load_average()
    print("machine: " + "; ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    started = time.monotonic()

    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine,
                     "arguments": {key: str(value) for key, value in vars(arguments).items()}}
    with tempfile.TemporaryDirectory(prefix="syncproxy-anchors-") as temporary:
        setup = prepare(Path(temporary), arguments)
        results.update(clients_notes=setup.notes, clients_media=setup.media,
                       edited_notes=EDITED_NOTES)
        if arguments.part in ("all", "anchors"):
            print("real Anki client suite", flush=True)
            results["clients"] = measure_clients(setup, arguments.repeats,
                                                 arguments.incremental)
            print("small requests", flush=True)
            results["small"] = measure_small_requests(setup, arguments.wrk_repeats,
                                                      arguments.wrk_seconds)
            print("bulk transfers and memory", flush=True)
            results["bulk"] = measure_transfers(setup, arguments.transfer_repeats,
                                                arguments.transfer_mb, arguments.memory_mb)
        if arguments.part in ("all", "cores"):
            print(f"--cores 1 against --cores 2 on {os.cpu_count()} CPUs", flush=True)
            results["cores"] = measure_cores(setup, arguments.cores_repeats)
            if "missing" in results["cores"]:
                print("  " + results["cores"]["missing"], flush=True)

    machine["load average after"] = load_average()
    results["minutes"] = (time.monotonic() - started) / 60
    sections = {}
    if "clients" in results:
        sections["anchors"] = anchors_section(results, arguments)
    if "cores" in results:
        sections["cores"] = cores_section(results, arguments)
    print()
    for text in sections.values():
        print(text)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=1) + "\n")

    if arguments.write:
        document = arguments.write.read_text() if arguments.write.exists() else "# Benchmarks\n"
        for name, text in sections.items():
            document = replace_section(document, name, text)
        arguments.write.write_text(document)
        print(f"wrote {arguments.write}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
