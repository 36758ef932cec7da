"""Login throttling: failed logins slow down, then refuse, further logins for a while.

A login is `POST /sync/hostKey`; the sync core returns 403 for a wrong user name or password.
Failures are counted per client address and per user name over the last `block_seconds`:
- from the DELAY_AFTER-th failure on, each further 403 is held back before it is sent, for
  DELAY_FIRST seconds, doubling up to DELAY_MAX, so guessing in sequence gets slow;
- at `max_failures`, logins from that address, or for that name, are refused for
  `block_seconds` without reaching the core.

A refusal is 503 with Retry-After. Anki clients show 403 as "wrong user name or password" and
429 as a generic network error, but 502/503/504 as a server problem to retry later, which is what
a refusal is; a 403 would also make a user who then types the right password believe it is wrong.
Each refusal is one WARNING line that fail2ban can match (config/fail2ban/filter.d/syncproxy.conf):

    login refused client=ADDRESS user="NAME" scope=client retry_after=SECONDS

Users who log in successfully are not slowed: the delay applies to failed logins only, and a
client address that logged in as a user keeps logging in as that user while someone else is
locked out for guessing that user's password. Synced clients never log in again (they keep
their host key), so a refusal never interrupts their syncs.

The tables are in memory, bounded by MAX_TRACKED entries each (oldest dropped first), and start
empty when syncproxy restarts.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

log = logging.getLogger("syncproxy.login")

DELAY_AFTER = 3
DELAY_FIRST = 0.5
DELAY_MAX = 8.0
MAX_TRACKED = 10_000
# How long a successful login exempts its (address, user) pair from a block on the user name.
KNOWN_PAIR_SECONDS = 30 * 86400
MAX_LOGGED_NAME_CHARS = 64


def normalize_address(address: str) -> str:
    """Return the address as fail2ban and people read it: IPv4-mapped IPv6 as plain IPv4."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def quote_name(name: str | None) -> str:
    """Return a user name safe for a one-line log: JSON-quoted, control characters escaped."""
    if name is None:
        return "-"
    if len(name) > MAX_LOGGED_NAME_CHARS:
        name = name[:MAX_LOGGED_NAME_CHARS] + "..."
    return json.dumps(name)


@dataclass
class Record:
    """The recent failures of one address or user name, and the end of its block."""

    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class BoundedTable:
    """Records by key, dropping the least recently used beyond `limit` entries."""

    def __init__(self, limit: int = MAX_TRACKED) -> None:
        self.limit = limit
        self._records: OrderedDict[str, Record] = OrderedDict()

    def get(self, key: str) -> Record | None:
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        return record

    def setdefault(self, key: str) -> Record:
        record = self.get(key)
        if record is None:
            record = self._records[key] = Record()
            while len(self._records) > self.limit:
                self._records.popitem(last=False)
        return record

    def __len__(self) -> int:
        return len(self._records)


@dataclass(frozen=True)
class Refusal:
    """The reason a login is refused and the seconds left until it is allowed again."""

    scope: str  # "client" or "user"
    retry_after: int


class LoginThrottle:
    """Counts failed logins and decides whether a login may reach the sync core."""

    def __init__(self, max_failures: int, block_seconds: float) -> None:
        self.max_failures = max_failures
        self.block_seconds = block_seconds
        self.by_address = BoundedTable()
        self.by_name = BoundedTable()
        self.known_pairs: OrderedDict[tuple[str, str], float] = OrderedDict()
        # NOTE: a counter for a metrics exporter; nothing reads it inside syncproxy.
        self.refused_total = 0

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    def check(self, address: str, name: str | None) -> Refusal | None:
        """Return a Refusal if this login must not reach the core, and log it."""
        now = time.monotonic()
        address = normalize_address(address)
        refusal = self._blocked(self.by_address.get(address), "client", now)
        if refusal is None and name is not None and not self._is_known(address, name, now):
            refusal = self._blocked(self.by_name.get(name), "user", now)
        if refusal is not None:
            self.refused_total += 1
            log.warning("login refused client=%s user=%s scope=%s retry_after=%d", address,
                        quote_name(name), refusal.scope, refusal.retry_after)
        return refusal

    def _blocked(self, record: Record | None, scope: str, now: float) -> Refusal | None:
        if record is None or record.blocked_until <= now:
            return None
        return Refusal(scope=scope, retry_after=max(1, round(record.blocked_until - now)))

    def _is_known(self, address: str, name: str, now: float) -> bool:
        seen = self.known_pairs.get((address, name))
        return seen is not None and now - seen < KNOWN_PAIR_SECONDS

    def record_success(self, address: str, name: str | None) -> None:
        if name is None:
            return
        key = (normalize_address(address), name)
        self.known_pairs[key] = time.monotonic()
        self.known_pairs.move_to_end(key)
        while len(self.known_pairs) > MAX_TRACKED:
            self.known_pairs.popitem(last=False)

    def record_failure(self, address: str, name: str | None) -> float:
        """Count a failed login; return how long to hold back its 403, in seconds."""
        now = time.monotonic()
        address = normalize_address(address)
        counts = {"client": self._count(self.by_address.setdefault(address), now)}
        if name is not None:
            counts["user"] = self._count(self.by_name.setdefault(name), now)
        worst = max(counts.values())
        log.info("login failed client=%s user=%s failures_client=%d failures_user=%s", address,
                 quote_name(name), counts["client"], counts.get("user", "-"))
        for scope, count in counts.items():
            if count >= self.max_failures:
                log.warning("login blocked client=%s user=%s scope=%s failures=%d seconds=%d",
                            address, quote_name(name), scope, count, self.block_seconds)
        if worst < DELAY_AFTER:
            return 0.0
        return min(DELAY_FIRST * 2 ** (worst - DELAY_AFTER), DELAY_MAX)

    def _count(self, record: Record, now: float) -> int:
        while record.failures and record.failures[0] <= now - self.block_seconds:
            record.failures.popleft()
        record.failures.append(now)
        count = len(record.failures)
        if count >= self.max_failures:
            record.blocked_until = now + self.block_seconds
            record.failures.clear()
        return count
