"""Ops summary benchmark: what `GET /api/ops/summary/` (and a /metrics scrape) costs on a big store.

N variants (10,000; QUICK 2,000) with on_hand 100 are written to the database in bulk and H live
holds (100,000; QUICK 20,000) are reserved across them, one unit each, a tenth of the variants
taking half of the holds (so there is a "busiest"). Then, timed:

- a full scan: OpsService.summary() with the shared scan dropped before each call, so every call
  reads every variant (what the first caller after the scan ages pays), also with limit 500 and
  ten pinned variants, and gauges() (a /metrics scrape) the same way;
- the shared path: summary() and GET /api/ops/summary/ (its JSON included) while the last scan is
  fresh, which is what every other caller of every process pays meanwhile.

Each path's Redis round trips and commands are counted. The figures must match what was reserved,
or the section fails.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from app import keys
from bench.stores import Stores, seed_variants, sessions_for

ON_HAND = 100
THREADS = 8


class _Counting:
    """Wraps the runner's `run` to count round trips and the commands in them."""

    def __init__(self, runner):
        self.runner, self.run_ = runner, runner.run
        self.round_trips = self.commands = 0

    def __enter__(self):
        def run(calls):
            self.round_trips += 1
            self.commands += len(calls)
            return self.run_(calls)

        self.runner.run = run
        return self

    def __exit__(self, *exc):
        self.runner.run = self.run_


def _timed(fn, calls: int) -> dict:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"calls": calls, "median_ms": round(statistics.median(times), 1),
            "p95_ms": round(times[min(len(times) - 1, int(len(times) * 0.95))], 1),
            "max_ms": round(times[-1], 1)}


def _reserve_all(container, vids: list[int], holds: int) -> dict[int, int]:
    """Half the holds on the first tenth of the variants, half over the rest; {variant: holds}."""
    hot, rest = vids[: max(1, len(vids) // 10)], vids[max(1, len(vids) // 10):] or vids
    plan = [hot[i % len(hot)] for i in range(holds // 2)] + [rest[i % len(rest)] for i in range(holds - holds // 2)]
    per: dict[int, int] = {}
    for vid in plan:
        per[vid] = per.get(vid, 0) + 1
    chunks = [plan[i::THREADS] for i in range(THREADS)]

    def reserve(n: int) -> None:
        for j, vid in enumerate(chunks[n]):
            container.holds.reserve(vid, f"ops{n}-{j}", 1)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(reserve, range(THREADS)))
    return per


def run(stores: Stores, *, variants: int, holds: int, calls: int = 20, log=print) -> dict:
    from sqlalchemy import func, select

    from persistence.models import Stock

    engine_db, sessions = sessions_for(stores.database_url)
    _, vids = seed_variants(sessions, variants, on_hand=ON_HAND)
    with sessions() as s:  # in a full run, other sections' variants are in the database too
        scanned = s.scalar(select(func.count()).select_from(Stock))
    engine_db.dispose()
    stores.flush_redis()
    container = stores.container()
    try:
        t0 = time.perf_counter()
        per_variant = _reserve_all(container, vids, holds)
        reserve_s = round(time.perf_counter() - t0, 1)
        ops = container.ops
        pinned = vids[-10:]
        redis = stores.redis()

        def cold(fn):
            def call():
                redis.delete(keys.ops_scan())  # the shared scan aged: this call reads every variant
                return fn()
            return call

        ops.summary()  # warm: the connection, the SQL compiled once
        redis.delete(keys.ops_scan())
        with _Counting(container.runner) as scan_count:
            first = ops.summary()
        reuse_ms = json.loads(redis.get(keys.ops_scan()) or "{}").get("reuse_ms")
        with _Counting(container.runner) as shared_count:
            ops.summary()
        scan = _timed(cold(ops.summary), calls)
        wide = _timed(cold(lambda: ops.summary(limit=500, variant_ids=pinned)), calls)
        gauges = _timed(cold(ops.gauges), calls)
        shared = _timed(ops.summary, calls)

        from app import create_app

        client = create_app(container=container).test_client()

        def http() -> None:
            response = client.get("/api/ops/summary/")
            assert response.status_code == 200, response.get_data(as_text=True)

        http_cold = _timed(cold(http), calls)
        http_shared = _timed(http, calls)
        body_bytes = len(client.get("/api/ops/summary/").get_data())
        redis.close()

        busiest = max(per_variant.values())
        wide_body = ops.summary(limit=500, variant_ids=pinned)
        checks = {
            "holds_live": first["totals"]["holds_live"] == holds,
            "reserved": first["totals"]["reserved"] == holds,
            "on_hand": first["totals"]["on_hand"] >= variants * ON_HAND,  # other sections' variants too
            "available": first["totals"]["available"] == first["totals"]["on_hand"] - holds,
            "invariant": first["invariant"]["ok"],
            "busiest_first": first["variants"][0]["active_holds"] == busiest,
            "limit": len(first["variants"]) == 50,
            "pinned": {r["variant_id"] for r in wide_body["variants"]} >= set(pinned),
        }
        out = {
            "variants": variants,
            "variants_scanned": scanned,
            "live_holds": holds,
            "reserve_s": reserve_s,
            "full_scan": {"round_trips": scan_count.round_trips, "redis_commands": scan_count.commands,
                          "database_queries": -(-scanned // 500), **scan},
            "full_scan_limit_500_pinned_10": wide,
            "full_scan_gauges": gauges,
            "shared_scan_reused_for_ms": reuse_ms,
            "shared": {"round_trips": shared_count.round_trips, "redis_commands": shared_count.commands, **shared},
            "http_full_scan": http_cold,
            "http_shared": http_shared,
            "http_body_bytes": body_bytes,
            "checks": checks,
            "invariant": {"ok": all(checks.values())},
        }
        log(
            f"  ops summary over {scanned:,} variants, {holds:,} live holds: full scan {scan['median_ms']} ms "
            f"median (p95 {scan['p95_ms']}), {scan_count.round_trips} Redis round trips "
            f"({scan_count.commands:,} commands), {-(-scanned // 500)} database queries; limit 500 + 10 pinned "
            f"{wide['median_ms']} ms; scrape {gauges['median_ms']} ms; HTTP {http_cold['median_ms']} ms "
            f"({body_bytes:,} bytes)"
        )
        log(
            f"  while that scan is shared ({reuse_ms} ms): summary {shared['median_ms']} ms, "
            f"{shared_count.round_trips} round trip(s); HTTP {http_shared['median_ms']} ms"
        )
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise AssertionError(f"ops summary figures wrong: {failed}: {first['totals']}")
        return out
    finally:
        stores.flush_redis()
        container.close()
