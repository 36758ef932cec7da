"""The data directory: created when missing, listed at start, and named when it cannot be used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import REPO, clean_environment


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned folder outside pytest's private tmp tree, so another user can reach it."""
    path = Path(tempfile.mkdtemp(prefix="syncproxy-datadir-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def serve_as_nobody(data_dir: Path) -> subprocess.CompletedProcess:
    """Start `syncproxy serve` as the unprivileged user nobody; it must stop at once."""
    environment = clean_environment({"HOME": "/nonexistent"})
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "syncproxy", "serve", "--port", "0", "--host", "127.0.0.1",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=environment, cwd=REPO, timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the user nobody")
def test_unwritable_dir_names_owner_and_user(shared_dir: Path) -> None:
    data_dir = shared_dir / "data"
    data_dir.mkdir(mode=0o755)
    result = serve_as_nobody(data_dir)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert f"data directory path {data_dir} is not writable" in message
    assert "owned by root (uid 0)" in message
    assert "syncproxy runs as nobody (uid 65534)" in message
    assert "--data-dir" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the user nobody")
def test_missing_dir_under_unwritable_parent(shared_dir: Path) -> None:
    data_dir = shared_dir / "not-yet" / "data"
    result = serve_as_nobody(data_dir)
    assert result.returncode == 2
    assert f"data directory path {data_dir} cannot be created: {shared_dir} is owned by root" in (
        result.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the user nobody")
def test_unwritable_subfolder_is_named(shared_dir: Path) -> None:
    data_dir = shared_dir / "data"
    data_dir.mkdir()
    os.chown(data_dir, 65534, 65534)
    (data_dir / "collections").mkdir(mode=0o755)  # left root-owned, as after a bad copy
    result = serve_as_nobody(data_dir)
    assert result.returncode == 2
    assert f"data directory path {data_dir / 'collections'} is not writable" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the user nobody")
def test_private_dir_of_other_user(shared_dir: Path) -> None:
    # A container volume left owned by another UID with mode 0700: not even readable.
    data_dir = shared_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, 12345, 12345)
    result = serve_as_nobody(data_dir)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert f"data directory path {data_dir} is not writable" in message
    assert "owned by 12345 (uid 12345)" in message
    assert "syncproxy runs as nobody (uid 65534)" in message
    assert "Traceback" not in result.stderr
