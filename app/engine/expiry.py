"""Lapsed holds back to stock: the sweeps, and the keyspace events that trigger the fast one.

Two paths release a lapsed hold, through the same idempotent `sweepHolds` script (DESIGN.md):
- the listener (jobs/listener.py) sweeps a variant when its timer key's `expired` event arrives,
  and sweeps the variants the due hints name every quarter second (`sweep_variants`, `sweep_due`);
- the periodic sweeper job releases every lapsed hold, found through the sweep index of each hash
  slot (`sweep`): the guarantee, since pub/sub drops events while nobody listens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import redis as redis_lib

from app import clock, keys
from app.engine.runner import Script, ScriptRunner
from app.metrics import HOLDS, expiry_scores, observe_release_lags

log = logging.getLogger(__name__)

SWEEP_SCRIPT_LIMIT = 1000  # holds one sweepHolds call releases at most (it says when there are more)


@dataclass
class SweepReport:
    variants: int = 0
    holds: int = 0
    units: int = 0


class Sweeper:
    """Releases lapsed holds and re-arms the variants' timers."""

    def __init__(self, runner: ScriptRunner, holds):
        self.runner = runner
        self.holds = holds  # app.engine.holds.Holds: the variants' keys

    def sweep(self, now: int | None = None, batch: int = 500, max_rounds: int = 1000,
              revisit_ms: int = 1000) -> SweepReport:
        """Release every lapsed hold. Variants with holds are found through the sweep index of each
        hash slot (kept exact by the reserve, sweep and reconcile scripts), so this works the same on
        one Redis and on every node of a cluster: no KEYS, no SCAN."""
        report = SweepReport()
        indexes = keys.sweep_indexes()
        # One time for the whole sweep: what a script re-indexes for later is not due again in it.
        now_ = clock.now_ms() if now is None else now
        slots = list(range(len(indexes)))
        for _ in range(max_rounds):
            reads = self.runner.run([("ZRANGEBYSCORE", indexes[slot], "-inf", now_, "LIMIT", 0, batch)
                                     for slot in slots])
            due = [(slot, int(v)) for slot, members in zip(slots, reads) for v in members]
            if not due:
                break
            again = {slot for slot, members in zip(slots, reads) if len(members) >= batch}
            for i in range(0, len(due), 1000):
                chunk = due[i:i + 1000]
                results = self._sweep([v for _, v in chunk], now_, revisit_ms, report)
                again.update(slot for (slot, _v), res in zip(chunk, results) if int(res[0]) >= SWEEP_SCRIPT_LIMIT)
            if not again:
                break
            slots = sorted(again)
        return report

    def sweep_variants(self, variant_ids: Iterable[int], now: int | None = None,
                       revisit_ms: int = 1000) -> SweepReport:
        """Release the lapsed holds of these variants and re-arm their timers (the listener's path,
        on the timers' expired events); idempotent."""
        report = SweepReport()
        ids = list(dict.fromkeys(int(v) for v in variant_ids))
        if ids:
            self._sweep(ids, clock.now_ms() if now is None else now, revisit_ms, report)
        return report

    def sweep_due(self, now: int | None = None, batch: int = 500, revisit_ms: int = 1000) -> SweepReport:
        """The listener's fast path: sweep the variants the due hints name (a few reads, not the
        16,384 slot indexes), so holds come back within about a second even when Redis's own
        expiry of timer keys lags (it does with many live keys: its expiry cycle only samples)."""
        report = SweepReport()
        now_ = clock.now_ms() if now is None else now
        hints = keys.due_hints()
        reads = self.runner.run([("ZRANGEBYSCORE", h, "-inf", now_, "LIMIT", 0, batch) for h in hints])
        due = [(h, int(v)) for h, members in zip(hints, reads) for v in members]
        if not due:
            return report
        # remove first: a reserve landing meanwhile adds its hint again after its own script ran
        self.runner.run([("ZREM", h, *members) for h, members in zip(hints, reads) if members])
        results = self._sweep([v for _, v in due], now_, revisit_ms, report)
        again = []
        for (h, v), (count, _units, earliest, _left) in zip(due, results):
            if int(count) >= SWEEP_SCRIPT_LIMIT:
                again.append(("ZADD", h, "LT", now_, str(v)))
            elif int(earliest) >= 0:
                again.append(("ZADD", h, "LT", max(int(earliest), now_ + revisit_ms), str(v)))
        if again:
            self.runner.run(again)
        return report

    def _sweep(self, variant_ids: list[int], now: int, revisit_ms: int, report: SweepReport) -> list:
        """Run the sweep script on each variant (one round trip), add up the report; returns the
        scripts' replies {released holds, released units, earliest expiry left, holds left}."""
        calls: list = []
        for v in variant_ids:
            # the lapsed holds' expiry times, read just before the script releases them (same round
            # trip): inventory_release_lag_seconds. Nothing of this touches the reserve.
            calls.append(("ZRANGE", keys.hold_expiry(v), "-inf", now, "BYSCORE", "WITHSCORES",
                          "LIMIT", 0, SWEEP_SCRIPT_LIMIT))
            calls.append(Script("sweepHolds", self.holds.indexed_keys(v), [now, SWEEP_SCRIPT_LIMIT, v, revisit_ms]))
        replies = self.runner.run(calls)
        released_ms = clock.now_ms()
        lapsed, results = replies[0::2], replies[1::2]
        released = 0
        for (count, units, _earliest, _left), due in zip(results, lapsed):
            report.variants += 1
            report.holds += int(count)
            report.units += int(units)
            released += int(count)
            if int(count):
                # the script released the earliest lapsed holds that were not locked for checkout;
                # a locked one among them is rare, and would lend its (earlier) time to one released
                observe_release_lags(released_ms, expiry_scores(due)[:int(count)])
        if released:
            HOLDS.labels("expired").inc(released)
        return results

    def variants_with_holds(self) -> int:
        """How many variants have at least one hold (from the sweep indexes of every slot)."""
        return sum(int(n) for n in self.runner.run([("ZCARD", k) for k in keys.sweep_indexes()]))


# -- keyspace events ------------------------------------------------------------------------------

def is_cluster(redis) -> bool:
    return hasattr(redis, "get_primaries")


def node_clients(redis) -> list:
    """One plain client per server: the client itself on a single Redis, each primary's on a cluster."""
    if is_cluster(redis):
        return [node.redis_connection for node in redis.get_primaries()]
    return [redis]


def enable_expired_events(client) -> bool:
    """Turn on `notify-keyspace-events Ex` on one server, keeping its other flags; False where
    CONFIG is not allowed (managed Redis)."""
    try:
        flags = client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
        if "E" in flags and ("x" in flags or "A" in flags):
            return True
        client.config_set("notify-keyspace-events", "".join(sorted(set(flags + "Ex"))))
        return True
    except redis_lib.exceptions.ResponseError as exc:
        log.warning("cannot enable keyspace expiry events (%s): the sweeper releases lapsed holds alone", exc)
        return False


def ensure_expired_events(redis) -> bool:
    """Expired events on every primary; False where any refused CONFIG."""
    return all([enable_expired_events(client) for client in node_clients(redis)])


def expired_channel(redis) -> str:
    """The channel a server publishes its expired events on."""
    db = 0
    if not is_cluster(redis):
        db = redis.connection_pool.connection_kwargs.get("db", 0)
    return f"__keyevent@{db}__:expired"
