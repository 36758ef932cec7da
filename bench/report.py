"""Turn bench/anchors.py's results into Markdown and check them against syncproxy's targets.

Targets (each row of the tables is marked met or not met):
- every real-client phase through syncproxy `--upstream` takes at most 1.05 x nginx's time;
- small requests through syncproxy reach at least 50% of bare hypercorn's rate at 32 connections;
- 100 MB uploads and downloads through syncproxy reach at least 70% of nginx's throughput;
- syncproxy idles at 60 MB resident or less and peaks within 20 MB of that during 500 MB transfers;
- with `--cores 2`, 8 concurrent logins run at least 1.8 x and 8 full uploads 1.15 x as fast.
"""

from __future__ import annotations

import argparse
import re
import textwrap

from measure import BULK_TARGETS, CLIENT_PATHS, PHASES, SMALL_TARGETS, WRK_REQUESTS
from cores import CORE_COUNTS, WORKLOADS

MAX_PHASE_RATIO = 1.05
MIN_SMALL_SHARE = 0.50
MIN_BULK_SHARE = 0.70
MAX_IDLE_MB = 60
MAX_PEAK_GROWTH_MB = 20
MIN_SPEEDUP = {WORKLOADS[0]: 1.8, WORKLOADS[1]: 1.8, WORKLOADS[2]: 1.15, WORKLOADS[3]: 1.15}

SECTION_TITLES = {
    "anchors": "## Against the anchors: the sync core, nginx and bare hypercorn",
    "cores": "## Several sync cores: `--cores 1` against `--cores 2`",
}
# The section this script's output replaced when docs/benchmarks.md was written by hand.
OLD_TITLES = {"anchors": "## Forwarding: the sync core direct, through syncproxy, through nginx"}
INSERT_BEFORE = "## Passthrough on a shared port 443"


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def megabytes(kib: int) -> float:
    return kib * 1024 / 1_000_000


def machine_lines(results: dict) -> list[str]:
    machine = results["machine"]
    return [f"Run of {results['date']}, {results['minutes']:.1f} minutes: "
            + "; ".join(f"{key} {value}" for key, value in machine.items()) + "."]


def client_table(results: dict, arguments: argparse.Namespace) -> tuple[list[str], list[bool]]:
    medians = results["clients"]["medians"]
    core, nginx, proxy, bundled = CLIENT_PATHS
    lines = [
        f"Real Anki client, seconds, median of {arguments.repeats} runs (each incremental sync "
        f"figure is itself the median of {arguments.incremental} syncs):",
        "",
        "| phase | core direct (http) | nginx (https) | syncproxy --upstream | "
        "syncproxy, bundled core | syncproxy / nginx | nginx / core | "
        f"target: syncproxy <= {MAX_PHASE_RATIO} x nginx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for phase in PHASES:
        ratio = medians[proxy][phase] / medians[nginx][phase]
        checks.append(ratio <= MAX_PHASE_RATIO)
        lines.append(
            f"| {phase} | {medians[core][phase]:.3f} | {medians[nginx][phase]:.3f} | "
            f"{medians[proxy][phase]:.3f} | {medians[bundled][phase]:.3f} | {ratio:.2f} | "
            f"{medians[nginx][phase] / medians[core][phase]:.2f} | {verdict(checks[-1])} |")
    return lines, checks


def small_table(results: dict) -> tuple[list[str], list[bool]]:
    small = results["small"]
    medians = small["medians"]
    core, nginx, hypercorn, proxy = SMALL_TARGETS
    lines = [
        f"Small requests, requests/s, median of {small['repeats']} wrk runs of "
        f"{small['seconds']} s (`wrk -t1`); errors are non-2xx responses plus socket errors "
        "summed over all runs of the row:",
        "",
        "| request | connections | core direct (http) | nginx | bare hypercorn | syncproxy | "
        "syncproxy / nginx | syncproxy / hypercorn | nginx / core | errors | "
        f"target at 32: syncproxy >= {MIN_SMALL_SHARE:.0%} of hypercorn |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for connections in (1, 32):
        for request in WRK_REQUESTS:
            row = {target: medians[f"{request}|{connections}|{target}"] for target in SMALL_TARGETS}
            errors = sum(cell["non_2xx"] + cell["socket_errors"] for cell in row.values())
            share = row[proxy]["rate"] / row[hypercorn]["rate"]
            target = "-"
            if connections == 32:
                checks.append(share >= MIN_SMALL_SHARE and errors == 0)
                target = verdict(checks[-1])
            lines.append(
                f"| {request} | {connections} | {number(row[core]['rate'])} | "
                f"{number(row[nginx]['rate'])} | {number(row[hypercorn]['rate'])} | "
                f"{number(row[proxy]['rate'])} | "
                f"{row[proxy]['rate'] / row[nginx]['rate']:.2f} | {share:.2f} | "
                f"{row[nginx]['rate'] / row[core]['rate']:.2f} | {errors} | {target} |")
    return lines, checks


def bulk_table(results: dict) -> tuple[list[str], list[bool]]:
    bulk = results["bulk"]
    medians = bulk["medians"]
    direct, nginx, proxy = BULK_TARGETS
    lines = [
        f"{bulk['size_mb']} MB transfers with curl (uploads chunked like the Anki client), "
        f"MB/s, median of {bulk['repeats']} runs:",
        "",
        "| direction | upstream direct (http) | nginx | syncproxy | syncproxy / nginx | "
        f"target: syncproxy >= {MIN_BULK_SHARE:.0%} of nginx |",
        "|---|---|---|---|---|---|",
    ]
    checks = []
    for direction in ("upload", "download"):
        share = medians[proxy][direction] / medians[nginx][direction]
        checks.append(share >= MIN_BULK_SHARE)
        lines.append(f"| {direction} | {number(medians[direct][direction])} | "
                     f"{number(medians[nginx][direction])} | {number(medians[proxy][direction])} "
                     f"| {share:.2f} | {verdict(checks[-1])} |")
    return lines, checks


def memory_table(results: dict) -> tuple[list[str], list[bool]]:
    memory = results["bulk"]["memory"]
    idle = megabytes(memory["idle_rss_kib"])
    peak = megabytes(max(memory["peak_upload_kib"], memory["peak_download_kib"]))
    idle_ok, peak_ok = idle <= MAX_IDLE_MB, peak - idle <= MAX_PEAK_GROWTH_MB
    lines = [
        f"syncproxy's front end (`--upstream`), MB (10^6 bytes) from /proc: VmRSS idle 2 s after "
        f"start; VmHWM reset before, and read after, a {memory['size_mb']} MB upload and then a "
        f"{memory['size_mb']} MB download:",
        "",
        "| idle VmRSS | peak, upload | peak, download | peak - idle | "
        f"target: idle <= {MAX_IDLE_MB} MB | target: peak - idle <= {MAX_PEAK_GROWTH_MB} MB |",
        "|---|---|---|---|---|---|",
        f"| {idle:.1f} | {megabytes(memory['peak_upload_kib']):.1f} | "
        f"{megabytes(memory['peak_download_kib']):.1f} | {peak - idle:.1f} | "
        f"{verdict(idle_ok)} | {verdict(peak_ok)} |",
    ]
    after_clients = results["clients"]["memory_after_last_repeat"]
    if after_clients:
        lines += ["", "For information, after the last real-client run: " + "; ".join(
            f"{name} VmRSS {megabytes(values['VmRSS']):.1f} MB, "
            f"VmHWM {megabytes(values['VmHWM']):.1f} MB"
            for name, values in after_clients.items()) + "."]
    return lines, [idle_ok, peak_ok]


def anchors_section(results: dict, arguments: argparse.Namespace) -> str:
    client_lines, client_checks = client_table(results, arguments)
    small_lines, small_checks = small_table(results)
    bulk_lines, bulk_checks = bulk_table(results)
    memory_lines, memory_checks = memory_table(results)
    summary = {
        "real-client phases <= 1.05 x nginx": all(client_checks),
        "small requests >= 50% of bare hypercorn at 32 connections": all(small_checks),
        f"{results['bulk']['size_mb']} MB transfers >= 70% of nginx": all(bulk_checks),
        "memory: idle <= 60 MB, peak within 20 MB of idle": all(memory_checks),
    }
    lines = [
        SECTION_TITLES["anchors"],
        "",
        "`python bench/anchors.py --write docs/benchmarks.md` runs everything below in one run on "
        "loopback. nginx runs one worker, terminates TLS with syncproxy's generated certificate "
        "and forwards over HTTP/1.1 with `proxy_request_buffering off`, `proxy_buffering off`, "
        "`client_max_body_size 0` and upstream keep-alive. Each real-client run starts a fresh "
        f"sync core and fresh syncproxy data directories, gives each path its own user, and "
        f"rotates the order of the paths. The collection has {results['clients_notes']:,} notes "
        f"and {results['clients_media']} media files of {arguments.media_size:,} bytes. Full "
        "upload and download include the media sync, and so does each incremental sync (an edit "
        f"of {results['edited_notes']} notes, then a sync, as the desktop app does). Login and "
        "sync times are taken inside the client process. Before the clients start, each path "
        "forwards one untimed GET /health, so that a freshly started server's first-request "
        "set-up is not counted as login time. syncproxy with its bundled core is "
        "shown for information: its login also checks a PBKDF2 password hash, and it is not the "
        "same sync core as the other paths.",
        "",
        *machine_lines(results),
        "",
        *client_lines,
        "",
        *small_lines,
        "",
        "nginx and syncproxy forward GET /health to the core (syncproxy responds itself only to "
        "`/_syncproxy/health`). POST /sync/meta carries a valid host key and a zstd body, and "
        "the core returns the collection's sync metadata for it. Bare hypercorn returns a "
        "constant for both, so it is the ceiling for a Python front end on the same event "
        f"loop: {results['machine']['event loop']}.",
        "",
        *bulk_lines,
        "",
        *memory_lines,
        "",
        "Targets: " + "; ".join(f"{name}: {verdict(met)}" for name, met in summary.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def cores_section(results: dict, arguments: argparse.Namespace) -> str:
    cores = results["cores"]
    lines = [SECTION_TITLES["cores"], ""]
    if "missing" in cores:
        lines += [f"`python bench/anchors.py --part cores`: {cores['missing']}", ""]
        return "\n".join(lines)
    medians = cores["medians"]
    one, two = CORE_COUNTS
    lines += [
        "`python bench/anchors.py --part cores` runs syncproxy with its bundled core and 8 "
        f"users, once with `--cores {one}` and once with `--cores {two}`, "
        f"in {cores['repeats']} rounds that alternate the order, with a fresh data directory "
        "each time. "
        "Eight real Anki clients, one process each, wait for one shared start time so that "
        "Python's start-up is not timed. A workload's time runs from that start to the last "
        "client's finish. The clients run on the same CPUs as the server, and each opens its "
        "own TLS connection. The slowest client process was ready "
        f"{cores['late_seconds']:.2f} s after the start time (0 means all were ready in time). "
        "The HTTP-request rows then send the same eight logins (`POST /sync/hostKey`) and "
        "eight full uploads (`POST /sync/upload`) from one Python process over eight "
        "connections opened beforehand, which leaves out the clients' work. The full uploads "
        f"send ready-made {cores['notes']:,}-note collections without media.",
        "",
        *machine_lines(results),
        "",
        f"| workload | --cores {one}, s | --cores {two}, s | speed-up | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        speedup = medians[one][workload] / medians[two][workload]
        minimum = MIN_SPEEDUP[workload]
        lines.append(f"| {workload} | {medians[one][workload]:.3f} | "
                     f"{medians[two][workload]:.3f} | {speedup:.2f} x | >= {minimum} x | "
                     f"{verdict(speedup >= minimum)} |")
    lines.append("")
    return "\n".join(lines)


def wrap_prose(text: str, width: int = 100) -> str:
    """Wrap every paragraph line at `width` columns, leaving headings and table rows alone."""
    lines = []
    for line in text.split("\n"):
        if line and not line.startswith(("|", "#")):
            lines.extend(textwrap.wrap(line, width, break_long_words=False,
                                       break_on_hyphens=False))
        else:
            lines.append(line)
    return "\n".join(lines)


def replace_section(document: str, name: str, text: str) -> str:
    """Put `text` in place of the section titled SECTION_TITLES[name] (or its old title).

    A section runs from its `## ` heading to the next `## ` heading. A missing section is
    inserted before the passthrough section, or appended when there is none.
    """
    body = wrap_prose(text).rstrip("\n") + "\n\n"
    for title in (SECTION_TITLES[name], OLD_TITLES.get(name)):
        if title and title in document:
            start = document.index(title)
            following = re.search(r"^## ", document[start + len(title):], re.MULTILINE)
            end = start + len(title) + following.start() if following else len(document)
            return document[:start] + body + document[end:]
    if INSERT_BEFORE in document:
        start = document.index(INSERT_BEFORE)
        return document[:start] + body + document[start:]
    return document.rstrip("\n") + "\n\n" + body
