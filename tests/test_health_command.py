"""`syncproxy health` finds the running server even when it was started with other flags."""

from __future__ import annotations

from pathlib import Path

from support import SyncProxy, free_port, syncproxy


def test_health_follows_running_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with SyncProxy(data_dir):
        # As in a container: the server got --port, the health check only the data directory.
        found = syncproxy("health", "--data-dir", str(data_dir), check=False)
        assert found.returncode == 0, found.stdout + found.stderr

        elsewhere = syncproxy("health", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                              "--port", str(free_port()), check=False)
        assert elsewhere.returncode == 1
        assert "cannot reach" in elsewhere.stdout


def test_health_without_server(tmp_path: Path) -> None:
    result = syncproxy("health", "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
                       "--port", str(free_port()), check=False)
    assert result.returncode == 1
    assert "unhealthy" in result.stdout
