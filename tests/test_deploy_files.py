"""The deployment files are valid for the tools that read them: Dockerfile, compose, systemd.

Also checks that PyPI has `anki` wheels for both image architectures, so an anki upgrade that
drops one fails here rather than in a user's `docker buildx build --platform linux/arm64`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import REPO

DOCKERFILE = REPO / "Dockerfile"
CONFIG = REPO / "config"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.sidecar.yml")
UNIT = CONFIG / "syncproxy.service"
IMAGE_ARCHITECTURES = ("x86_64", "aarch64")
# The anki wheels are tagged manylinux_2_35: they need glibc 2.35 (Debian bookworm has 2.36).
ANKI_PLATFORM_TAG = "manylinux_2_35"
MAX_UNIT_EXPOSURE = 3.0


def venv_tool(name: str) -> str:
    """Return the path of a console script installed beside this Python, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return found


def image_python_version() -> str:
    match = re.search(r"^FROM\s+python:(\d+\.\d+)-", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "the Dockerfile's FROM lines name no python:X.Y-... base image"
    return match.group(1)


def test_hadolint_clean() -> None:
    result = subprocess.run([venv_tool("hadolint"), str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_names_no_index() -> None:
    # Index URLs come only from build arguments; a URL in an instruction would override them.
    instructions = [line for line in DOCKERFILE.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    for line in instructions:
        assert "://" not in line, line
        assert "--index-url" not in line, line
        assert "--trusted-host" not in line, line


@pytest.mark.parametrize("architecture", IMAGE_ARCHITECTURES)
def test_anki_wheel_exists(architecture: str, tmp_path: Path) -> None:
    version = importlib.metadata.version("anki")
    platform = f"{ANKI_PLATFORM_TAG}_{architecture}"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--platform", platform, "--python-version", image_python_version(),
         "--implementation", "cp", "--dest", str(tmp_path), f"anki=={version}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"no anki {version} wheel for {platform}: the image cannot be built for "
        f"{architecture}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
    wheels = [path.name for path in tmp_path.glob("anki-*.whl")]
    assert len(wheels) == 1, wheels
    assert wheels[0].startswith(f"anki-{version}-")
    assert wheels[0].endswith(f"_{architecture}.whl")


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """Validate a compose file against the Compose Specification schema that
    check-jsonschema ships (no network access needed)."""
    return subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_valid(name: str) -> None:
    result = check_compose(CONFIG / name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_rejects_unknown_key(tmp_path: Path) -> None:
    document = yaml.safe_load((CONFIG / "docker-compose.yml").read_text())
    document["services"]["syncproxy"]["restart_policy"] = "always"
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump(document))
    result = check_compose(broken)
    assert result.returncode != 0
    assert "restart_policy" in result.stdout + result.stderr


def test_compose_bundled_core() -> None:
    service = yaml.safe_load((CONFIG / "docker-compose.yml").read_text())["services"]["syncproxy"]
    assert service["build"]["context"] == ".."
    assert (CONFIG / service["build"]["context"] / "Dockerfile").is_file()
    assert service["pull_policy"] == "build"
    assert "443:8443" in service["ports"]
    assert any(volume.endswith(":/data") for volume in service["volumes"])
    assert "upstream" not in " ".join(service.get("command", []))


def test_compose_sidecar() -> None:
    services = yaml.safe_load((CONFIG / "docker-compose.sidecar.yml").read_text())["services"]
    assert set(services) == {"syncserver", "syncproxy", "nginx"}

    proxy = services["syncproxy"]
    command = proxy["command"]
    assert command[command.index("--upstream") + 1] == "http://syncserver:8080"
    assert "444:8443" in proxy["ports"]
    assert any(volume.endswith(":/data") for volume in proxy["volumes"])

    server = services["syncserver"]
    assert server["environment"]["SYNC_PORT"] == "8080"
    assert "ports" not in server, "the sync server must be reachable only through syncproxy"

    assert "443:443" in services["nginx"]["ports"]


def installed_unit(tmp_path: Path) -> Path:
    """Return a copy of the unit whose ExecStart names this environment's syncproxy, because
    `systemd-analyze verify` rejects a command that does not exist on this machine."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/syncproxy/bin/syncproxy " in text
    text = text.replace("/opt/syncproxy/bin/syncproxy", venv_tool("syncproxy"))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return tool


def test_unit_verifies(tmp_path: Path) -> None:
    result = subprocess.run([systemd_analyze(), "verify", str(installed_unit(tmp_path))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_hardening(tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager",
         str(installed_unit(tmp_path))],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_UNIT_EXPOSURE, result.stdout


def test_unit_settings() -> None:
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for expected in (
        "StateDirectory=syncproxy",
        "Environment=SYNCPROXY_DATA_DIR=/var/lib/syncproxy",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "User=syncproxy",
    ):
        assert expected in lines, expected
