"""The image built from the real Dockerfile serves a real Anki client and keeps its data.

Builds with rootful podman and a debootstrap stand-in for the base image (see podman_image.py),
runs the container with host networking on a free 127.0.0.1 port, and drives it the way a user
would: `syncproxy user add` and `syncproxy cert pem` through `podman exec`, the anki client
trusting only that PEM, then `podman rm -f` and a new container on the same volume.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from podman_image import (
    CACHE_ENV,
    RUN_OPTIONS,
    Podman,
    base_images,
    build_image,
    import_base,
    stand_in_tarball,
)
from support import REPO, AnkiClient, ClientError, free_port

IMAGE = "localhost/syncproxy-test:latest"
IMAGE_UID = "10001"
USER = "alice"
PASSWORD = "correct horse battery"
NOTES = 200
MEDIA = 3
HEALTHY_TIMEOUT = 120.0
STOP_TIMEOUT = 30


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed "
                    "(apt-get install podman runc debootstrap uidmap)")
    if os.geteuid() != 0:
        pytest.skip("debootstrap and rootful podman need root")
    engine = Podman(tmp_path_factory.mktemp("podman"))
    yield engine
    engine.reset()


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = os.environ.get(CACHE_ENV)
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("container-cache")
    tarball = stand_in_tarball(cache_dir)
    for base in base_images(REPO / "Dockerfile"):
        import_base(podman, tarball, base)
    build_image(podman, REPO, IMAGE)
    return IMAGE


class Container:
    """One `podman run` of the image, serving on 127.0.0.1:port with /data on `volume`."""

    def __init__(self, podman: Podman, image: str, volume: str, port: int) -> None:
        self.podman = podman
        self.image = image
        self.volume = volume
        self.port = port
        self.name = f"syncproxy-test-{uuid.uuid4().hex[:12]}"

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def start(self) -> Container:
        # Settings go after the image name, as `docker run IMAGE --port 444` passes them.
        self.podman("run", "--detach", "--name", self.name, *RUN_OPTIONS,
                    "--volume", f"{self.volume}:/data", self.image,
                    "--host", "127.0.0.1", "--port", str(self.port))
        return self

    def exec(self, *args: str, input: str | None = None) -> str:
        return self.podman("exec", "--interactive", self.name, *args, input=input).stdout

    def state(self, field: str) -> str:
        return self.podman("inspect", "--format", "{{" + field + "}}", self.name).stdout.strip()

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT) -> float:
        """Run the image's HEALTHCHECK until it passes; return the seconds that took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.state(".State.Running") != "true":
                raise AssertionError(f"container {self.name} exited:\n{self.logs()}")
            if self.podman("healthcheck", "run", self.name, check=False).returncode == 0:
                return time.monotonic() - started
            time.sleep(1)
        raise AssertionError(f"container {self.name} not healthy within {timeout} s:\n"
                             + self.logs())

    def remove(self) -> None:
        self.podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
def volume(podman: Podman) -> Iterator[str]:
    name = f"syncproxy-test-data-{uuid.uuid4().hex[:12]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


def test_image_metadata(podman: Podman, image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["Entrypoint"] == ["syncproxy"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert "/data" in config["Volumes"]
    assert "8443/tcp" in config["ExposedPorts"]
    assert "SYNCPROXY_DATA_DIR=/data" in config["Env"]
    # Only the Docker image format keeps HEALTHCHECK; podman keeps it outside Config.
    assert inspected["Healthcheck"]["Test"] == ["CMD", "syncproxy", "health"]


def test_container_syncs_and_keeps_data(
    podman: Podman, image: str, volume: str, tmp_path: Path,
) -> None:
    port = free_port()
    first = Container(podman, image, volume, port)
    try:
        first.start()
        first.wait_healthy()
        assert first.state(".State.Health.Status") == "healthy"
        assert first.exec("id", "-u").strip() == IMAGE_UID

        added = first.exec("syncproxy", "user", "add", USER, "--password-stdin",
                           input=PASSWORD + "\n")
        assert USER in added
        users_file = first.exec("stat", "--format", "%u %a", "/data/users.json").split()
        assert users_file == [IMAGE_UID, "600"]
        pem_before = first.exec("syncproxy", "cert", "pem")
        assert "BEGIN CERTIFICATE" in pem_before
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text(pem_before)

        uploader = AnkiClient(tmp_path / "uploader", first.endpoint, ca_file)
        assert uploader.build(NOTES, MEDIA, label="container")["notes"] == NOTES
        # The running server picks up the new user by watching users.json: allow it a moment.
        deadline = time.monotonic() + 30
        while True:
            try:
                hkey = uploader.login(USER, PASSWORD)
                break
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert uploader.sync("--upload")["required"] == "FULL_UPLOAD"

        stop_started = time.monotonic()
        podman("stop", "--time", str(STOP_TIMEOUT), first.name, timeout=STOP_TIMEOUT + 30)
        stop_seconds = time.monotonic() - stop_started
        # Within the grace period means syncproxy, as PID 1, acted on SIGTERM itself.
        assert stop_seconds < STOP_TIMEOUT - 5, f"podman stop took {stop_seconds:.1f} s"
    finally:
        first.remove()

    second = Container(podman, image, volume, port)
    try:
        second.start()
        second.wait_healthy()
        listed = second.exec("syncproxy", "user", "list").splitlines()
        assert [line.split()[0] for line in listed[1:]] == [USER]
        assert second.exec("syncproxy", "cert", "pem") == pem_before

        # The first device's host key still works: nothing to sync.
        uploader.hkey = hkey
        assert uploader.sync()["required"] == "NO_CHANGES"

        downloader = AnkiClient(tmp_path / "downloader", second.endpoint, ca_file)
        downloader.login(USER, PASSWORD)
        assert downloader.sync("--download")["required"] == "FULL_DOWNLOAD"
        expected = uploader.dump()
        received = downloader.dump()
        assert len(received["notes"]) == NOTES
        assert received["notes"] == expected["notes"]
        assert len(received["media"]) == MEDIA
        assert received["media"] == expected["media"]

        podman("healthcheck", "run", second.name)
        assert second.state(".State.Health.Status") == "healthy"
    finally:
        second.remove()


class _RecordingIndex(http.server.BaseHTTPRequestHandler):
    """A package index that has nothing: records each requested path and returns 404."""

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve_index(context: ssl.SSLContext | None = None) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingIndex)
    server.paths = []
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_build_uses_index_arguments(podman: Podman, image: str) -> None:
    # The main index is plain HTTP (pip accepts that on loopback). The extra index uses a
    # certificate from an untrusted CA, so pip gets a request through only if it honours
    # PIP_TRUSTED_HOST.
    main_index = _serve_index()
    untrusted = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    untrusted.configure_cert(context)
    extra_index = _serve_index(context)
    extra_port = extra_index.server_address[1]
    try:
        result = build_image(podman, REPO, "localhost/syncproxy-index-test:latest", build_args={
            "PIP_INDEX_URL": f"http://127.0.0.1:{main_index.server_address[1]}/simple/",
            "PIP_EXTRA_INDEX_URL": f"https://127.0.0.1:{extra_port}/simple/",
            "PIP_TRUSTED_HOST": f"127.0.0.1:{extra_port}",
        }, timeout=600, check=False)
    finally:
        main_index.shutdown()
        extra_index.shutdown()

    # Neither index has any package, so the build must fail after asking both.
    assert result.returncode != 0, result.stdout[-2000:]
    assert "/simple/setuptools/" in main_index.paths
    assert "/simple/setuptools/" in extra_index.paths
