"""Reconcile benchmark: Reconciler.reconcile over every variant, dry run and repair.

N variants (100,000; QUICK 10,000) are written to the database in bulk with on_hand 100; a first
reconcile builds their counters (timed too: it is what a Redis that came back empty costs); every
10th variant gets a live hold; 1% of the variants get their `available` pushed off by +3 behind the
engine's back (drift). Then, timed: a dry run (must find exactly that drift and change nothing), a
repair run (must repair exactly it), and a last dry run that must find nothing.
"""

from __future__ import annotations

import time

from app import keys
from bench.stores import Stores, seed_variants, sessions_for

ON_HAND = 100


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - t0, 3)


def run(stores: Stores, *, variants: int, log=print) -> dict:
    engine_db, sessions = sessions_for(stores.database_url)
    t0 = time.perf_counter()
    _, vids = seed_variants(sessions, variants, on_hand=ON_HAND)
    engine_db.dispose()
    seed_s = round(time.perf_counter() - t0, 1)
    stores.flush_redis()
    container = stores.container()
    engine, reconciler, redis = container.holds, container.reconciler, container.redis
    try:
        build, build_s = _timed(lambda: reconciler.reconcile())
        held = vids[::10]
        for vid in held:
            engine.reserve(vid, "r1", 2)
        drifted = vids[5::100]
        pipe = redis.pipeline(transaction=False)
        for vid in drifted:
            pipe.hincrby(keys.stock(vid), "available", 3)
        pipe.execute()
        dry, dry_s = _timed(lambda: reconciler.reconcile(dry_run=True))
        repair, repair_s = _timed(lambda: reconciler.reconcile())
        after, after_s = _timed(lambda: reconciler.reconcile(dry_run=True))
        counters = engine.counters(vids)
        broken = [v for v in vids if counters[v].available + counters[v].reserved != ON_HAND]
        # the run covers every variant in the database; the ones of other benchmarks are clean too
        ok = (
            dry.drifted == len(drifted)
            and repair.repaired == len(drifted)
            and after.drifted == 0
            and not broken
            and build.checked >= variants
        )
        out = {
            "variants": variants,
            "seed_s": seed_s,
            "build_counters_s": build_s,
            "held_variants": len(held),
            "drifted_variants": len(drifted),
            "dry_run": {
                "seconds": dry_s,
                "checked": dry.checked,
                "drifted": dry.drifted,
                "repaired": dry.repaired,
            },
            "repair": {
                "seconds": repair_s,
                "checked": repair.checked,
                "drifted": repair.drifted,
                "repaired": repair.repaired,
            },
            "after": {"seconds": after_s, "checked": after.checked, "drifted": after.drifted},
            "invariant": {"ok": ok, "broken_variants": len(broken)},
        }
        log(
            f"  reconcile {variants:,} variants: build {build_s} s, dry run {dry_s} s "
            f"(found {dry.drifted}), repair {repair_s} s (repaired {repair.repaired}), "
            f"check {after_s} s (found {after.drifted})"
        )
        return out
    finally:
        stores.flush_redis()
        container.close()
