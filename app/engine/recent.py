"""The cart lines this process wrote lately: after a failover, the evidence of the holds it lost.

The reconciler reports a hold a failover lost through its cart line (app/engine/reconcile.py): a line
whose hold is gone before the line's expiry. On one primary (Sentinel) a hold and its line are lost
together, so nothing would be left to see. Each web process therefore remembers the lines it wrote in
the last `window_ms` (a deque append per add: nothing sent to Redis). When a call of this process met
a Redis outage, the next successful add or line write first looks up the lines written before the
outage: a line gone together with its hold (same generation) is written back as it was, so the
reconciler finds it, reports it as lost and marks it lapsed (410 at checkout).

A line written back this way is one a failover took; the one exception is a line its customer
removed within the window just before the outage, on the same primary: it comes back as lapsed and
is reported as lost once. Replication lags by milliseconds, so a window of seconds is ample.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Sequence

from app import clock, keys
from app.engine.holdrec import unpack_hold
from app.engine.holds import hold_reads

if TYPE_CHECKING:  # pragma: no cover
    from app.engine.carts import Line

log = logging.getLogger(__name__)

WINDOW_MS = 10_000
MAX_LINES = 200_000  # per process: at most a few MB, a window of 10 s at 20,000 adds/s
BATCH = 500


class RecentLines:
    """(written at, user, line) of the lines this process wrote in the last `window_ms`."""

    def __init__(self, window_ms: int = WINDOW_MS, max_lines: int = MAX_LINES):
        self.window_ms = window_ms
        self._lines: deque = deque(maxlen=max_lines)
        self.outage_since: int | None = None  # when a call of this process first met an outage

    def __len__(self) -> int:
        return len(self._lines)

    def wrote(self, user: str, line: "Line", now: int) -> None:
        """Remember a line written at `now` (the add's hot path: an append, and a trim now and then)."""
        lines = self._lines
        lines.append((now, user, line))
        if lines[0][0] < now - self.window_ms:
            edge = now - self.window_ms
            while lines and lines[0][0] < edge:
                lines.popleft()

    def outage(self, now: int | None = None) -> None:
        """A call of this process met a Redis outage (a 503): check the lines on the next write."""
        if self.outage_since is None:
            self.outage_since = clock.now_ms() if now is None else now

    def restore(self, runner, now: int | None = None) -> list[str]:
        """Write back the lines written before the outage that are gone together with their hold;
        returns their item ids. Raises what the runner raises (the outage is then kept, to try again)."""
        since = self.outage_since
        if since is None:
            return []
        now = clock.now_ms() if now is None else now
        candidates = [(user, line) for at, user, line in list(self._lines)
                      if at <= since and line.expires_ms > now]
        restored: list[str] = []
        for i in range(0, len(candidates), BATCH):
            restored += self._restore_batch(runner, candidates[i:i + BATCH])
        self.outage_since = None
        if restored:
            log.warning("%d cart line(s) written before a Redis outage were gone with their holds "
                        "(a failover?): written back for the reconciler to report", len(restored))
        return restored

    @staticmethod
    def _restore_batch(runner, batch: Sequence[tuple[str, "Line"]]) -> list[str]:
        reads = [("HEXISTS", keys.cart(user), line.item_id) for user, line in batch]
        replies = runner.run([*reads, *hold_reads([(line.variant_id, line.item_id) for _u, line in batch])])
        present, holds = replies[:len(batch)], replies[len(batch):]
        gone = []
        for (user, line), has_line, raw_hold in zip(batch, present, holds):
            hold = unpack_hold(raw_hold)
            if not int(has_line) and (hold is None or hold.gen != line.gen):
                gone.append((user, line))
        if not gone:
            return []
        written = runner.run([("HSETNX", keys.cart(user), line.item_id, line.dumps()) for user, line in gone])
        return [line.item_id for (_u, line), ok in zip(gone, written) if int(ok)]
