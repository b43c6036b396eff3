"""The one clock of the service: every script and expiry decision takes its time from here."""
from __future__ import annotations

import time
from datetime import datetime, timezone


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def utcnow() -> datetime:
    """Timezone-aware current UTC time."""
    return datetime.now(timezone.utc)


def ms_to_iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO-8601 UTC with a Z, e.g. 2026-12-01T10:00:00.123Z."""
    if ms is None:
        return None
    global _last_second
    seconds, millis = divmod(int(ms), 1000)
    last = _last_second  # every line of a cart rendered now mostly shares one second: format it once
    if last[0] != seconds:
        last = _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return "%s.%03dZ" % (last[1], millis)


_last_second: tuple[int, str] = (-1, "")


def iso(dt: datetime | None) -> str | None:
    """A datetime (naive means UTC) as ISO-8601 UTC with a Z."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
