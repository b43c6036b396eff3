"""Expiry benchmark: how fast lapsed holds give their units back, with the production processes.

- lag:      holds lapsing one by one (one every 25 ms) with `inventory listen` running: for each hold,
            the time from its expiry to the moment it is gone (its units back, same script), polled
            every 2 ms. Includes Redis's own active-expiry delay before the `expired` event is sent.
- lag_loaded: the same beside N other live holds (2,000; QUICK 500). Redis sends `expired` only when
            it deletes the timer key, and its active expiry scans the keys that have a TTL at about
            20 keys per cycle (hz 10: 10 cycles a second) while few of them have lapsed, so the lag
            grows with the number of live holds: about N / 200 seconds for a full scan.
- listener: 10,000 holds (10 variants x 1,000) lapsing at the same millisecond, `inventory listen`
            running: time from that millisecond until every unit is back.
- sweeper:  the same with no listener, only `inventory scheduler` + `inventory worker` (rq) running
            the sweeper every SWEEP_INTERVAL_SECONDS: time until every unit is back. The holds lapse at
            an arbitrary point of the sweep cycle, so one run lands anywhere in [0, interval] + the sweep.
Holds are made through StockEngine.reserve with `now`/`ttl_ms` chosen so they all lapse at one time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from app import clock, keys
from app.engine.holdrec import hold_id_for
from app.settings import ROOT
from bench.clients import percentile
from bench.stores import Stores, seed_variants, sessions_for

TOGETHER_VARIANTS = 10
TOGETHER_PER_VARIANT = 1000
LAG_GAP_MS = 25


class Proc:
    """`python -m app.cli <command>` with the bench environment; stopped by pid."""

    def __init__(self, command: str, env: dict, log: Path):
        self.log = open(log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", command],
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _wait(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _listener_subscribed(redis) -> bool:
    return any(n >= 1 for _, n in redis.pubsub_numsub("__keyevent@0__:expired"))


def _reserve_rate(engine, vid: int, n: int = 300) -> float:
    """Reserves per second from this process (to time the batches that must lapse together)."""
    t0 = time.perf_counter()
    for i in range(n):
        engine.reserve(vid, f"rate-{i}", 1)
    rate = n / (time.perf_counter() - t0)
    engine.release_many([(vid, hold_id_for(vid, f"rate-{i}")) for i in range(n)])
    return rate


def _make_lapsing_together(engine, vids: list[int], per_variant: int, rate: float) -> int:
    """Reserve per_variant single-unit holds on each variant, all lapsing at one time; that time (ms)."""
    total = len(vids) * per_variant
    lapse_at = clock.now_ms() + int(1500 * total / rate) + 1000
    for i in range(per_variant):
        for vid in vids:
            now = clock.now_ms()
            if now >= lapse_at - 50:
                raise RuntimeError("holds were made too slowly to lapse together")
            engine.reserve(vid, f"t{i}", 1, now=now, ttl_ms=lapse_at - now)
    return lapse_at


def _time_until_back(engine, vids: list[int], on_hand: int, lapse_at: int, timeout: float) -> dict:
    """Poll the counters every 10 ms from the lapse time until every unit is back."""
    total = on_hand * len(vids)
    first = None
    deadline = time.monotonic() + timeout + max(0, lapse_at - clock.now_ms()) / 1000
    while time.monotonic() < deadline:
        counters = engine.counters(vids)
        available = sum(c.available for c in counters.values())
        now = clock.now_ms()
        if first is None and available > total - len(vids) * TOGETHER_PER_VARIANT and now >= lapse_at:
            first = now
        if available == total:
            reserved = sum(c.reserved for c in counters.values())
            return {
                "all_back_s": round((now - lapse_at) / 1000, 3),
                "first_back_s": round(((first or now) - lapse_at) / 1000, 3),
                "reserved_left": reserved,
                "ok": reserved == 0,
            }
        time.sleep(0.01)
    counters = engine.counters(vids)
    return {
        "all_back_s": None,
        "first_back_s": None if first is None else round((first - lapse_at) / 1000, 3),
        "units_missing": total - sum(c.available for c in counters.values()),
        "ok": False,
    }


def _release_lag(engine, redis, vid: int, count: int) -> dict:
    """Holds lapsing one every LAG_GAP_MS: time from each one's expiry until it is released."""
    start = clock.now_ms() + 1000
    expiry = {}
    for i in range(count):
        now = clock.now_ms()
        r = engine.reserve(vid, f"lag{i}", 1, now=now, ttl_ms=start + i * LAG_GAP_MS - now)
        expiry[r.hold_id] = r.expires_ms
    gone: dict[str, int] = {}
    deadline = time.monotonic() + (start - clock.now_ms()) / 1000 + count * LAG_GAP_MS / 1000 + 30
    while len(gone) < count and time.monotonic() < deadline:
        live = set(redis.hkeys(keys.holds(vid)))
        now = clock.now_ms()
        for hid in expiry:
            if hid not in live and hid not in gone:
                gone[hid] = now
        time.sleep(0.002)
    lags = sorted(gone[h] - expiry[h] for h in gone)
    return {
        "holds": count,
        "released": len(gone),
        "gap_ms": LAG_GAP_MS,
        "p50_ms": percentile(lags, 50),
        "p99_ms": percentile(lags, 99),
        "max_ms": lags[-1] if lags else None,
        "min_ms": lags[0] if lags else None,
        "ok": len(gone) == count,
    }


def run(stores: Stores, *, lag_holds: int, other_live: int, sweep_interval: int, log=print) -> dict:
    engine_db, sessions = sessions_for(stores.database_url)
    on_hand = TOGETHER_PER_VARIANT
    _, vids = seed_variants(sessions, TOGETHER_VARIANTS, on_hand=on_hand)
    _, (lag_vid, scratch, canary, other) = seed_variants(sessions, 4, on_hand=10**6)
    engine_db.dispose()
    env = stores.env(
        LOG_LEVEL="INFO",
        SWEEP_INTERVAL_SECONDS=str(sweep_interval),
        RECONCILE_INTERVAL_SECONDS=str(7 * 24 * 3600),
    )
    logs = stores.workdir
    out: dict = {
        "sweep_interval_s": sweep_interval,
        "holds_together": TOGETHER_VARIANTS * TOGETHER_PER_VARIANT,
    }
    container = stores.container()
    engine, redis = container.holds, container.redis
    try:
        # -- with the listener ------------------------------------------------------------------
        stores.flush_redis()
        engine.counters(vids + [lag_vid, scratch, canary, other])
        rate = _reserve_rate(engine, scratch)
        listener = Proc("listen", env, logs / "listener.log")
        try:
            _wait(lambda: _listener_subscribed(redis), 30, "the listener to subscribe")
            out["lag"] = _release_lag(engine, redis, lag_vid, lag_holds)
            log(
                f"  expiry lag one by one ({lag_holds} holds): p50 {out['lag']['p50_ms']} ms, "
                f"p99 {out['lag']['p99_ms']} ms, max {out['lag']['max_ms']} ms"
            )
            # The same with other live holds (their timers) beside them: Redis finds a lapsed key by
            # scanning the keys that have a TTL, about 20 per 100 ms when few have lapsed, and only
            # then sends the `expired` event, so the lag grows with the number of live holds.
            for i in range(other_live):
                engine.reserve(other, f"live{i}", 1)
            out["lag_loaded"] = _release_lag(engine, redis, lag_vid, lag_holds)
            out["lag_loaded"]["other_live_holds"] = other_live
            log(
                f"  expiry lag one by one beside {other_live:,} live holds: "
                f"p50 {out['lag_loaded']['p50_ms']} ms, p99 {out['lag_loaded']['p99_ms']} ms, "
                f"max {out['lag_loaded']['max_ms']} ms"
            )
            engine.release_many([(other, hold_id_for(other, f"live{i}")) for i in range(other_live)])
            lapse_at = _make_lapsing_together(engine, vids, TOGETHER_PER_VARIANT, rate)
            out["listener"] = _time_until_back(engine, vids, on_hand, lapse_at, timeout=60)
            log(
                f"  expiry 10,000 together, listener: all back in {out['listener']['all_back_s']} s "
                f"(first after {out['listener']['first_back_s']} s)"
            )
        finally:
            listener.stop()

        # -- the sweeper alone ------------------------------------------------------------------
        stores.flush_redis()
        engine.counters(vids + [canary])
        engine.reserve(canary, "canary", 1, ttl_ms=50)
        scheduler = Proc("scheduler", env, logs / "scheduler.log")
        worker = Proc("worker", env, logs / "worker.log")
        try:
            # the scheduler enqueues a sweep at once: the canary coming back shows the pipeline works
            _wait(lambda: engine.counters([canary])[canary].reserved == 0, 60, "the first sweep")
            lapse_at = _make_lapsing_together(engine, vids, TOGETHER_PER_VARIANT, rate)
            out["sweeper"] = _time_until_back(engine, vids, on_hand, lapse_at, timeout=sweep_interval + 60)
            log(
                f"  expiry 10,000 together, sweeper alone (every {sweep_interval}s): all back in "
                f"{out['sweeper']['all_back_s']} s"
            )
        finally:
            worker.stop()
            scheduler.stop()
        return out
    finally:
        stores.flush_redis()
        container.close()
