"""No password, password hash or host key that the tests used appears in any syncproxy log."""

from __future__ import annotations

import pytest

from support import LOG_FILES, SECRETS

MIN_SEARCHABLE = 8


@pytest.mark.runs_last
def test_no_secrets_in_logs() -> None:
    logs = [path for path in LOG_FILES if path.exists()]
    if not logs or not SECRETS:
        pytest.skip("no syncproxy logs or secrets from earlier tests in this run")

    leaks = []
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in SECRETS:
            # A secret this short turns up in random text (the core's session ids), so finding
            # it proves nothing; the tests use longer passwords for that reason.
            if len(secret) >= MIN_SEARCHABLE and secret in text:
                leaks.append(f"{path}: a secret of {len(secret)} characters, "
                             f"starting {secret[:3]!r}")
    assert leaks == []
    assert sum(path.stat().st_size for path in logs) > 0
