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
    """Milliseconds since the epoch as ISO-8601 UTC with a Z."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(dt: datetime | None) -> str | None:
    """A datetime (naive means UTC) as ISO-8601 UTC with a Z."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
