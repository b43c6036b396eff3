"""Memory benchmark: Redis bytes per live hold, its cart line included.

N holds (100,000; QUICK 10,000) are made through the cart service (CartService.add: the hold, its
variant's one timer key, the expiry index entry, the per-customer count and the cart line), one single-unit line
for each of N customers, 1,000 per variant (100 variants; QUICK 10), from 4 processes. The number
per variant matters: past 128 entries Redis keeps a variant's holds hash, expiry zset and customer
hash as hash tables and skiplists instead of compact listpacks, about twice the bytes per entry.
Before: INFO used_memory after the counters and one warm-up line per variant exist; after: once the
writers have disconnected.
Bytes per hold = (after - before) / N. MEMORY USAGE of each structure gives the breakdown.
"""

from __future__ import annotations

from app import keys
from app.composition import Container
from app.settings import load_settings
from bench.clients import fork_all
from bench.stores import Stores, seed_variants, sessions_for

HOLDS_PER_VARIANT = 1000
PROCESSES = 4


def run(stores: Stores, *, holds: int, log=print) -> dict:
    variants = max(1, holds // HOLDS_PER_VARIANT)
    engine_db, sessions = sessions_for(stores.database_url)
    _, vids = seed_variants(sessions, variants, on_hand=10**6)
    engine_db.dispose()
    stores.flush_redis()
    container = stores.container()
    redis = container.redis
    env = stores.env()
    try:
        cart = container.cart
        for vid in vids:
            cart.add(f"warm{vid}", vid, 1)
        before = stores.used_memory()
        per_process = holds // PROCESSES

        def writer(index: int) -> int:
            c = Container(load_settings(env))
            service = c.cart
            for k in range(per_process):
                service.add(f"m{index}-{k}", vids[k % variants], 1)
            c.close()
            return per_process

        made = sum(fork_all(writer, PROCESSES))
        after = stores.used_memory()
        counters = container.holds.counters(vids)
        reserved = sum(c.reserved for c in counters.values())
        live = sum(c.active_holds for c in counters.values())
        carts = sum(1 for _ in redis.scan_iter(match=keys.cart("*"), count=10000))
        vid = vids[0]
        per_variant = counters[vid].active_holds

        def usage(key: str, per: int = 1) -> float:
            return (redis.memory_usage(key, samples=0) or 0) / per  # None: the key is not there

        breakdown = {
            "timer key (one per variant)": usage(keys.variant_timer(vid), per_variant),
            "cart (one line)": usage(keys.cart("m0-0")),
            "holds hash entry": usage(keys.holds(vid), per_variant),
            "expiry zset entry": usage(keys.hold_expiry(vid), per_variant),
            "per-customer entry": usage(keys.customer_units(vid), per_variant),
        }
        breakdown["rest (keyspace and expiry tables, allocator)"] = (after - before) / made - sum(
            breakdown.values()
        )
        expected = made + variants
        ok = reserved == live == expected and carts == expected
        out = {
            "holds": made,
            "variants": variants,
            "used_memory_before": before,
            "used_memory_after": after,
            "bytes_per_hold": round((after - before) / made, 1),
            "memory_usage_breakdown": {k: round(v, 1) for k, v in breakdown.items()},
            "invariant": {
                "ok": ok,
                "reserved": reserved,
                "live_holds": live,
                "carts": carts,
                "expected": expected,
            },
        }
        log(
            f"  memory {made:,} holds: {out['bytes_per_hold']:.0f} bytes per hold with its cart line "
            f"(used_memory {before:,} -> {after:,})"
        )
        return out
    finally:
        stores.flush_redis()
        container.close()
