"""Correctness: many processes racing for a small stock, and the invariant afterwards.

Every seller starts with `stock` units (100) and `processes` processes released together at a
barrier, each trying up to `attempts` single-unit sales and stopping at its first refusal. A correct
seller sells exactly `stock`; the naive read-then-write (GET, then DECRBY, in Redis; SELECT, then
UPDATE, in Postgres) can sell more, since two processes can both read the last unit. Whether it does
on a given run depends on the scheduler, so it is reported, never asserted.

`run_races` is what the harness and tests/integration/test_bench_correctness.py both call.
"""

from __future__ import annotations

import itertools

import redis as redis_lib

from app import keys
from app.composition import Container
from app.errors import InsufficientStock
from app.settings import load_settings
from app.engine.holdrec import unpack_hold
from bench.clients import CTX, fork_all
from bench.engine import MINIMAL_LUA, reset_rowlock, rowlock_reserve
from bench.stores import lua_stock_key, naive_stock_key

_run = itertools.count(1)


def _race(sell_factory, processes: int, attempts: int) -> list[int]:
    """Fork `processes` sellers, release them together; units each one sold."""
    barrier = CTX.Barrier(processes)

    def seller(index: int) -> int:
        sell, close = sell_factory(index)
        barrier.wait(60)
        sold = 0
        try:
            for _ in range(attempts):
                if not sell():
                    break
                sold += 1
        finally:
            close()
        return sold

    return fork_all(seller, processes)


def _result(name: str, sold_each: list[int], stock: int, processes: int, attempts: int) -> dict:
    sold = sum(sold_each)
    return {
        "seller": name,
        "processes": processes,
        "attempts_per_process": attempts,
        "stock": stock,
        "sold": sold,
        "oversold": max(0, sold - stock),
    }


# --- the sellers ----------------------------------------------------------------------------------


def race_naive_redis(redis_url: str, *, processes: int, attempts: int, stock: int) -> dict:
    """GET the count, and if a unit is left, DECRBY it: two round trips, nothing atomic."""
    key = naive_stock_key(f"redis-{next(_run)}")
    r = redis_lib.Redis.from_url(redis_url)
    r.set(key, stock)

    def factory(index: int):
        client = redis_lib.Redis.from_url(redis_url)

        def sell() -> bool:
            if int(client.get(key)) < 1:
                return False
            client.decrby(key, 1)
            return True

        return sell, client.close

    out = _result("naive GET+DECRBY (Redis)", _race(factory, processes, attempts), stock, processes, attempts)
    out["counter_after"] = int(r.get(key))
    r.delete(key)
    r.close()
    return out


def race_lua(redis_url: str, *, processes: int, attempts: int, stock: int) -> dict:
    key = lua_stock_key(10**9 + next(_run))
    r = redis_lib.Redis.from_url(redis_url)
    r.set(key, stock)

    def factory(index: int):
        client = redis_lib.Redis.from_url(redis_url)
        script = client.register_script(MINIMAL_LUA)
        return (lambda: int(script(keys=[key], args=[1])) >= 0), client.close

    out = _result("minimal Lua reserve", _race(factory, processes, attempts), stock, processes, attempts)
    out["counter_after"] = int(r.get(key))
    r.delete(key)
    r.close()
    return out


def race_engine(env: dict, variant_id: int, *, processes: int, attempts: int, stock: int) -> dict:
    """Holds.reserve, a new customer per attempt; the invariant checked afterwards."""
    run = next(_run)

    def factory(index: int):
        container = Container(load_settings(env))
        engine = container.holds
        seq = itertools.count()

        def sell() -> bool:
            try:
                engine.reserve(variant_id, f"c{run}-{index}-{next(seq)}", 1)
                return True
            except InsufficientStock:
                return False

        return sell, container.close

    out = _result(
        "engine (Holds.reserve)", _race(factory, processes, attempts), stock, processes, attempts
    )
    container = Container(load_settings(env))
    try:
        out["invariant"] = check_invariant(container, variant_id, expected_reserved=out["sold"])
    finally:
        container.close()
    return out


def race_rowlock(dsn: str, variant_id: int, *, processes: int, attempts: int, stock: int) -> dict:
    reset_rowlock(dsn, [variant_id], stock)

    def factory(index: int):
        import psycopg2

        conn = psycopg2.connect(dsn)
        cur = conn.cursor()
        seq = itertools.count()
        return (lambda: rowlock_reserve(cur, conn, variant_id, f"c{index}-{next(seq)}", 1)), conn.close

    return _result(
        "row lock (SELECT FOR UPDATE)", _race(factory, processes, attempts), stock, processes, attempts
    )


def race_naive_sql(dsn: str, variant_id: int, *, processes: int, attempts: int, stock: int) -> dict:
    """SELECT available, and if a unit is left, UPDATE available - 1: no lock between the two."""
    reset_rowlock(dsn, [variant_id], stock)

    def factory(index: int):
        import psycopg2

        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        cur = conn.cursor()

        def sell() -> bool:
            cur.execute("SELECT available FROM bench_rowlock_stock WHERE variant_id = %s", (variant_id,))
            if cur.fetchone()[0] < 1:
                return False
            cur.execute(
                "UPDATE bench_rowlock_stock SET available = available - 1, reserved = reserved + 1 "
                "WHERE variant_id = %s",
                (variant_id,),
            )
            return True

        return sell, conn.close

    return _result(
        "naive SELECT+UPDATE (Postgres)", _race(factory, processes, attempts), stock, processes, attempts
    )


# --- the invariant ---------------------------------------------------------------------------------


def check_invariant(container: Container, variant_id: int, expected_reserved: int | None = None) -> dict:
    """DESIGN.md's invariant for one variant: available >= 0, available + reserved == on_hand (database),
    reserved == sum of live holds; and, when given, reserved == the units the sellers were told they got."""
    from persistence.models import Stock

    c = container.holds.counters([variant_id])[variant_id]
    with container.sessions() as s:
        on_hand = s.get(Stock, variant_id).on_hand
    held = [h for h in map(unpack_hold, container.redis.hvals(keys.holds(variant_id))) if h is not None]
    held_units = sum(h.quantity for h in held)
    problems = []
    if c.available < 0:
        problems.append(f"available {c.available} < 0")
    if c.available + c.reserved != on_hand:
        problems.append(f"available {c.available} + reserved {c.reserved} != on_hand {on_hand}")
    if c.reserved != held_units:
        problems.append(f"reserved {c.reserved} != sum of live holds {held_units}")
    if expected_reserved is not None and c.reserved != expected_reserved:
        problems.append(f"reserved {c.reserved} != units sold {expected_reserved}")
    return {
        "ok": not problems,
        "problems": problems,
        "on_hand": on_hand,
        "available": c.available,
        "reserved": c.reserved,
        "live_holds": len(held),
        "oversold": max(0, c.reserved - on_hand),
    }


def run_races(
    env: dict,
    variant_id: int,
    *,
    processes: int,
    attempts: int,
    stock: int,
    pg_dsn: str | None = None,
    rowlock_variant: int | None = None,
) -> dict:
    """Every seller on the same stock: the naive ones, the minimal Lua, the engine (variant_id must have
    on_hand == stock in the database), and with Postgres the row lock and the naive SELECT+UPDATE."""
    container = Container(load_settings(env))
    try:
        container.holds.counters([variant_id])
    finally:
        container.close()
    redis_url = env["REDIS_URL"]
    kw = dict(processes=processes, attempts=attempts, stock=stock)
    races = [race_naive_redis(redis_url, **kw), race_lua(redis_url, **kw), race_engine(env, variant_id, **kw)]
    if pg_dsn:
        rv = rowlock_variant if rowlock_variant is not None else variant_id
        races.append(race_naive_sql(pg_dsn, rv, **kw))
        races.append(race_rowlock(pg_dsn, rv, **kw))
    return {"processes": processes, "attempts_per_process": attempts, "stock": stock, "races": races}
