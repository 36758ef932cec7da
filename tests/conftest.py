from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "runs_last: run after every other test of the session")


def pytest_collection_modifyitems(items) -> None:
    """Move tests marked runs_last to the end, so they see what the others left behind."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)
