"""Build and run syncproxy's image with rootful podman on a machine that cannot pull images.

No registry for container images is reachable, so a Debian bookworm root made with
`debootstrap --variant=minbase`, with Debian's python3, replaces the Dockerfile's
`python:*-slim-bookworm` base and is imported under that exact name. The Dockerfile calls
`python3` (never `python`) so that it runs unchanged on the official image and on this stand-in.

Podman's own choices that would fail here are overridden on every call: storage paths come from
the command line (a storage config file stalls podman for about 20 s), builds use chroot
isolation, containers use runc (crun rejects the machine's mixed cgroup layout) with host
networking (the default bridge rewrites the host firewall) and raised ulimits.

Registries may be reached through a TLS-intercepting proxy that the host trusts (pip here is
pointed at the host's CA bundle with PIP_CERT). The stand-in gets the host's bundle and PIP_CERT,
as a base image built for such a network would, so the Dockerfile itself stays untouched.

The debootstrap root is the slow part (about 75 s here), so its tarball is kept in the directory
named by the TEST_CONTAINER_CACHE environment variable when that is set.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

CACHE_ENV = "TEST_CONTAINER_CACHE"
MIRROR_ENV = "TEST_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
STAND_IN_SUITE = "bookworm"
# What the official python image provides and the Dockerfile relies on: python3 with venv and
# pip, and the CA bundle pip needs to reach the package index.
STAND_IN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
# Removed from the stand-in to keep the import small. The official slim images lack them too.
STAND_IN_PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man")

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

DEBOOTSTRAP_TIMEOUT = 900
BUILD_TIMEOUT = 1200
COMMAND_TIMEOUT = 120

RUN_OPTIONS = (
    "--network=host",
    "--ulimit", "nofile=20000:20000",
    "--ulimit", "nproc=32768:32768",
)
BUILD_OPTIONS = ("--pull=never", "--network=host", "--isolation=chroot", "--format", "docker")


class PodmanError(RuntimeError):
    """A podman or debootstrap command that failed, with its output."""


def run_command(
    argv: list[str], *, input: str | None = None, timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `argv`, capturing text output; raise PodmanError with the output if it fails."""
    completed = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, check=False,
    )
    if check and completed.returncode != 0:
        raise PodmanError(
            f"command failed with exit code {completed.returncode}: {' '.join(argv)}\n"
            f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
        )
    return completed


class Podman:
    """podman whose storage and state all live below `base`, given on every command line."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def argv(self, *args: str) -> list[str]:
        return [
            "podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "runroot"),
            "--tmpdir", str(self.base / "tmp"), "--events-backend", "file",
            "--runtime", "runc", *args,
        ]

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return run_command(self.argv(*args), input=input, timeout=timeout, check=check)

    def reset(self) -> None:
        """Remove every container, image and volume in this storage, then the storage itself."""
        self("system", "reset", "--force", timeout=300, check=False)


def base_images(dockerfile: Path) -> list[str]:
    """Return the external images the Dockerfile's FROM lines name, skipping earlier stages."""
    stages: set[str] = set()
    images: list[str] = []
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if not match:
            continue
        image, stage = match.group(1), match.group(2)
        if image.lower() not in stages and image not in images:
            images.append(image)
        if stage:
            stages.add(stage.lower())
    return images


def qualified_name(image: str) -> str:
    """Return the name podman resolves a Docker Hub short name to, e.g. docker.io/library/x:t."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    if "/" not in image:
        return f"docker.io/library/{image}"
    return f"docker.io/{image}"


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return [point for point in points if point.startswith(prefix)]


def _remove_root(root: Path) -> None:
    # debootstrap may bind-mount host devices into the target. Removing the tree while one is
    # still mounted would delete the host's device nodes, so unmount first or stop.
    for point in sorted(_mounts_below(root), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)
    left = _mounts_below(root)
    if left:
        raise PodmanError(f"not removing {root}: still mounted below it: {', '.join(left)}")
    shutil.rmtree(root, ignore_errors=True)


def host_ca_bundle() -> Path:
    """Return the CA bundle the host's pip verifies the package index with."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      ssl.get_default_verify_paths().cafile, HOST_CA_BUNDLE):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise PodmanError(f"no CA bundle found for pip: set PIP_CERT or install {HOST_CA_BUNDLE}")


def stand_in_tarball(cache_dir: Path) -> Path:
    """Return a tarball of a Debian root with python3, making it with debootstrap if needed."""
    mirror = os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)
    ca_bundle = host_ca_bundle().read_bytes()
    recipe = " ".join((STAND_IN_SUITE, *STAND_IN_PACKAGES, *STAND_IN_PRUNE, mirror))
    recipe += hashlib.sha256(ca_bundle).hexdigest()
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    tarball = cache_dir / f"debootstrap-{STAND_IN_SUITE}-python3-{key}.tar"
    if tarball.is_file():
        return tarball

    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
    try:
        root = work / "root"
        run_command(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(STAND_IN_PACKAGES),
             STAND_IN_SUITE, str(root), mirror],
            timeout=DEBOOTSTRAP_TIMEOUT,
        )
        for relative in STAND_IN_PRUNE:
            target = root / relative
            for child in target.iterdir() if target.is_dir() else ():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        (root / HOST_CA_BUNDLE.relative_to("/")).write_bytes(ca_bundle)
        partial = work / "root.tar"
        run_command(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."],
                    timeout=300)
        os.replace(partial, tarball)
    finally:
        _remove_root(work)
    return tarball


def import_base(podman: Podman, tarball: Path, image: str) -> None:
    """Import the stand-in root under `image`, with the environment the official image sets."""
    podman("import", "--change", "ENV LANG=C.UTF-8",
           "--change", f"ENV PIP_CERT={HOST_CA_BUNDLE}", "--change", 'CMD ["python3"]',
           str(tarball), qualified_name(image), timeout=300)


def build_image(podman: Podman, context: Path, tag: str,
                build_args: dict[str, str] | None = None,
                timeout: float = BUILD_TIMEOUT, check: bool = True,
                ) -> subprocess.CompletedProcess[str]:
    """Build the Dockerfile in `context` as `tag` without pulling anything."""
    args = [*BUILD_OPTIONS, "-t", tag, "-f", str(context / "Dockerfile")]
    for name, value in (build_args or {}).items():
        args += ["--build-arg", f"{name}={value}"]
    return podman("build", *args, str(context), timeout=timeout, check=check)
