"""Engine benchmark: reservations per second and p50/p99 latency, three ways, side by side.

- engine:  the project's own API, `Holds.reserve` (lua/reserveHold-6.lua, one EVALSHA through
           the engine's lane, app/engine/lane.py), each client process with its own Container.
- replicated: the same with HOLD_DURABILITY=replicated: `WAIT 1 <ms>` after each reserve, in its
           round trip, with a replica (a second redis-server, `replicaof` the bench's) attached for
           these rounds only (detached with `REPLICAOF NO ONE` for the others, so they are measured
           as before). What an acknowledged hold that survives one node's loss costs.
- lua:     a minimal one-script reserve on the same Redis (check available, decrement), through the
           same redis-py client settings (app.redis_client.make_redis).
- rowlock: the classic approach on the same Postgres: BEGIN; SELECT ... FOR UPDATE; check; UPDATE;
           INSERT the hold; COMMIT, with raw psycopg2 (no ORM), one connection per process: the
           best case of that design.

Workloads: one hot variant, and 1,000 variants picked at random per reservation. Every reservation
is 1 unit for a new customer (a distinct user id per call, so every call creates a hold), and stock
is large (10**9 units on the hot variant, 10**6 on each of the 1,000) so no run sells out: each op
is one reserve, never a reserve plus a release. Redis is flushed and the counters rebuilt from the
database between cases; the row-lock tables are reset. Within a case the three approaches take turns
(`rounds` times in the full run), so a change in the machine's load falls on all three, and the round
with the median throughput is the one reported (all rounds are in the JSON, with the CPU that other
processes used meanwhile). After every case the invariant is checked over all its rounds: every
acknowledged reservation is held exactly once, and available + reserved == on_hand.
"""

from __future__ import annotations

import itertools
import os
import random

from app.composition import Container
from app.errors import InsufficientStock
from app.redis_client import make_redis
from app.settings import load_settings
from app.engine.holdrec import unpack_hold
from app import keys
from bench.clients import RunResult, run_clients
from bench.stores import Replica, Stores, lua_stock_key, seed_variants, sessions_for

APPROACHES = ("engine", "replicated", "lua", "rowlock")
REPLICA_TIMEOUT_MS = 1000  # generous: a refused reserve would count as an error, not hide in the rate
PROCESSES = (8, 32, 64)
HOT_STOCK = 10**9
SPREAD_VARIANTS = 1000
SPREAD_STOCK = 10**6
WARMUP_OPS = 10  # per client process, before the barrier: connection, script cache

MINIMAL_LUA = """
local available = tonumber(redis.call('GET', KEYS[1]) or '0')
local qty = tonumber(ARGV[1])
if available < qty then return -1 end
return redis.call('DECRBY', KEYS[1], qty)
"""

ROWLOCK_DDL = """
CREATE TABLE IF NOT EXISTS bench_rowlock_stock (
    variant_id integer PRIMARY KEY,
    on_hand bigint NOT NULL,
    available bigint NOT NULL,
    reserved bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS bench_rowlock_holds (
    id bigserial PRIMARY KEY,
    variant_id integer NOT NULL,
    user_id text NOT NULL,
    quantity integer NOT NULL,
    expires_at timestamptz NOT NULL
);
"""


# --- the three reserves, each built inside its client process -------------------------------------



def log_case(log, section: str, workload: str, n: int, name: str, summary: dict, merged, check: dict) -> None:
    """One case's line (and its first error, if any) in the progress log."""
    log(
        f"  {section} {workload:>4} x{n:<3} {name:<8} {summary['per_second']:>10,.0f}/s "
        f"p50 {summary['p50_ms']:.2f} ms  p99 {summary['p99_ms']:.2f} ms  "
        f"(other load {summary['other_cores']:.2f} cores, steal {summary['steal_cores']:.2f})"
        f"{'  errors ' + str(merged.errors) if merged.errors else ''}"
        f"{'' if check['ok'] else '  INVARIANT BROKEN: ' + '; '.join(check['problems'])}"
    )
    if merged.first_error:
        log("    first error: " + merged.first_error.strip().splitlines()[-1])


def summarize_rounds(rounds: list, merged, check: dict) -> dict:
    """One case's summary. The round with the median throughput stands for the case: a burst of load
    from elsewhere on a shared machine spoils one round, not the figure. Every round is kept, with the
    cores used while measuring: ours (clients + redis-server), the kernel's threads, everything else
    on the machine (for the row lock that includes Postgres), steal."""
    ordered = sorted(rounds, key=lambda r: r.rate)
    result = ordered[len(ordered) // 2]
    summary = result.summary()
    summary["mean_per_second"] = round(merged.rate, 1)
    summary["per_second_by_round"] = [round(r.rate) for r in rounds]
    summary["cpu_by_round"] = [r.cpu for r in rounds]
    summary["other_cores"] = result.cpu.get("other_cores")
    summary["steal_cores"] = result.cpu.get("steal_cores")
    summary["errors"] = merged.errors
    summary["first_error"] = merged.first_error
    summary["invariant"] = check
    return summary

def engine_setup(env: dict, variant_ids: list[int]):
    def setup(index: int):
        container = Container(load_settings(env))
        engine = container.holds
        rng = random.Random(index)
        seq = itertools.count()
        pid = os.getpid()  # user ids stay distinct across the rounds of a case
        hot = len(variant_ids) == 1

        def op() -> bool:
            vid = variant_ids[0] if hot else rng.choice(variant_ids)
            try:
                engine.reserve(vid, f"b{pid}-{next(seq)}", 1)
                return True
            except InsufficientStock:
                return False

        return op, container.close

    return setup


def lua_setup(env: dict, variant_ids: list[int]):
    def setup(index: int):
        client = make_redis(load_settings(env))
        script = client.register_script(MINIMAL_LUA)
        rng = random.Random(index)
        ks = [lua_stock_key(v) for v in variant_ids]
        hot = len(ks) == 1

        def op() -> bool:
            key = ks[0] if hot else rng.choice(ks)
            return int(script(keys=[key], args=[1])) >= 0

        return op, client.close

    return setup


def rowlock_reserve(cur, conn, variant_id: int, user_id: str, qty: int) -> bool:
    """The classic reservation: lock the stock row, check, update, insert the hold, commit."""
    cur.execute("SELECT available FROM bench_rowlock_stock WHERE variant_id = %s FOR UPDATE", (variant_id,))
    (available,) = cur.fetchone()
    if available < qty:
        conn.rollback()
        return False
    cur.execute(
        "UPDATE bench_rowlock_stock SET available = available - %s, reserved = reserved + %s "
        "WHERE variant_id = %s",
        (qty, qty, variant_id),
    )
    cur.execute(
        "INSERT INTO bench_rowlock_holds (variant_id, user_id, quantity, expires_at) "
        "VALUES (%s, %s, %s, now() + interval '900 seconds')",
        (variant_id, user_id, qty),
    )
    conn.commit()
    return True


def rowlock_setup(dsn: str, variant_ids: list[int]):
    def setup(index: int):
        import psycopg2

        conn = psycopg2.connect(dsn)
        cur = conn.cursor()
        rng = random.Random(index)
        seq = itertools.count()
        pid = os.getpid()
        hot = len(variant_ids) == 1

        def op() -> bool:
            vid = variant_ids[0] if hot else rng.choice(variant_ids)
            try:
                return rowlock_reserve(cur, conn, vid, f"b{pid}-{next(seq)}", 1)
            except Exception:
                conn.rollback()
                raise

        return op, conn.close

    return setup


# --- resets and invariant checks ------------------------------------------------------------------


def reset_redis(stores: Stores, container: Container, variant_ids: list[int], stock: int) -> int:
    """Empty Redis, rebuild the counters, set the Lua counters; returns the units reserved here (1).

    One reservation from this process before the fork loads the scripts into the server and warms
    every per-process cache of the engine, which the forked clients then share instead of each
    building its own.
    """
    stores.flush_redis()
    container.holds.counters(variant_ids)  # rebuilt from the database's on_hand
    container.holds.reserve(variant_ids[0], "parent-warmup", 1)
    pipe = container.redis.pipeline(transaction=False)
    for vid in variant_ids:
        pipe.set(lua_stock_key(vid), stock)
    pipe.execute()
    return 1


def reset_rowlock(dsn: str, variant_ids: list[int], stock: int) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(ROWLOCK_DDL)
            cur.execute("TRUNCATE bench_rowlock_holds")
            cur.execute("DELETE FROM bench_rowlock_stock")
            cur.execute(
                "INSERT INTO bench_rowlock_stock (variant_id, on_hand, available, reserved) "
                "SELECT unnest(%s::int[]), %s, %s, 0",
                (variant_ids, stock, stock),
            )
        # vacuum so every case starts from the same table state (autocommit: VACUUM is no transaction)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE bench_rowlock_stock")
            cur.execute("VACUUM ANALYZE bench_rowlock_holds")
    finally:
        conn.close()


def check_engine(
    container: Container, variant_ids: list[int], on_hand: dict[int, int], acknowledged: int
) -> dict:
    """available + reserved == on_hand, reserved == sum of live holds, and every acknowledged reserve held."""
    engine = container.holds
    counters = engine.counters(variant_ids)
    pipe = container.redis.pipeline(transaction=False)
    for vid in variant_ids:
        pipe.hgetall(keys.holds(vid))
    problems = []
    total_reserved = total_held = 0
    for vid, raw in zip(variant_ids, pipe.execute()):
        c = counters[vid]
        held = sum(h.quantity for h in map(unpack_hold, raw.values()) if h is not None)
        total_reserved += c.reserved
        total_held += held
        if c.available < 0:
            problems.append(f"variant {vid}: available {c.available} < 0")
        if c.available + c.reserved != on_hand[vid]:
            problems.append(
                f"variant {vid}: available {c.available} + reserved {c.reserved} != on_hand {on_hand[vid]}"
            )
        if c.reserved != held:
            problems.append(f"variant {vid}: reserved {c.reserved} != held {held}")
    if total_reserved != acknowledged:
        problems.append(f"reserved {total_reserved} != acknowledged reservations {acknowledged}")
    oversold = sum(max(0, counters[v].reserved - on_hand[v]) for v in variant_ids)
    return {
        "ok": not problems,
        "problems": problems[:5],
        "reserved": total_reserved,
        "held": total_held,
        "acknowledged": acknowledged,
        "oversold": oversold,
    }


def check_lua(container: Container, variant_ids: list[int], stock: int, acknowledged: int) -> dict:
    values = [int(v) for v in container.redis.mget([lua_stock_key(v) for v in variant_ids])]
    sold = sum(stock - v for v in values)
    problems = []
    if min(values) < 0:
        problems.append(f"a counter went below zero: {min(values)}")
    if sold != acknowledged:
        problems.append(f"sold {sold} != acknowledged reservations {acknowledged}")
    return {
        "ok": not problems,
        "problems": problems,
        "reserved": sold,
        "acknowledged": acknowledged,
        "oversold": sum(max(0, -v) for v in values),
    }


def check_rowlock(dsn: str, acknowledged: int) -> dict:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT coalesce(sum(reserved), 0), coalesce(min(available), 0), "
                "coalesce(sum(CASE WHEN available + reserved <> on_hand THEN 1 ELSE 0 END), 0) "
                "FROM bench_rowlock_stock"
            )
            reserved, min_available, broken = cur.fetchone()
            cur.execute("SELECT count(*), coalesce(sum(quantity), 0) FROM bench_rowlock_holds")
            holds, held = cur.fetchone()
    finally:
        conn.close()
    problems = []
    if min_available < 0:
        problems.append(f"available went below zero: {min_available}")
    if broken:
        problems.append(f"{broken} row(s) with available + reserved != on_hand")
    if reserved != held or reserved != acknowledged:
        problems.append(f"reserved {reserved}, held {held}, acknowledged {acknowledged}")
    return {
        "ok": not problems,
        "problems": problems,
        "reserved": int(reserved),
        "held": int(held),
        "acknowledged": acknowledged,
        "oversold": 0 if min_available >= 0 else int(-min_available),
    }


# --- the benchmark --------------------------------------------------------------------------------


def run(stores: Stores, *, seconds: float, rounds: int = 1, processes=PROCESSES, log=print) -> dict:
    """Every (workload, processes) row runs the three approaches in turn, `rounds` times interleaved
    (seconds / rounds each time), so a change in the machine's load hits all three alike."""
    engine_db, sessions = sessions_for(stores.database_url)
    container = stores.container()
    replica = None
    try:
        _, hot = seed_variants(sessions, 1, on_hand=HOT_STOCK)
        _, spread = seed_variants(sessions, SPREAD_VARIANTS, on_hand=SPREAD_STOCK)
        workloads = {"hot": (hot, HOT_STOCK), "1000": (spread, SPREAD_STOCK)}
        env = stores.env()
        dsn = stores.pg_dsn() if stores.postgres else None
        approaches = [a for a in APPROACHES if a != "rowlock" or dsn]
        redis_pid = stores.redis_server.process.pid
        replica = Replica(stores)
        replicated_env = {**env, "HOLD_DURABILITY": "replicated", "HOLD_REPLICA_TIMEOUT_MS": str(REPLICA_TIMEOUT_MS)}
        rows = []
        for n in processes:
            for workload, (vids, stock) in workloads.items():
                row = {"workload": workload, "processes": n, "rounds": rounds, "rowlock": None}
                parent_reserved = reset_redis(stores, container, vids, stock)
                if dsn:
                    reset_rowlock(dsn, vids, stock)
                setups = {
                    "engine": engine_setup(env, vids),
                    "replicated": engine_setup(replicated_env, vids),
                    "lua": lua_setup(env, vids),
                    "rowlock": rowlock_setup(dsn, vids) if dsn else None,
                }
                runs: dict[str, list[RunResult]] = {a: [] for a in approaches}
                for _ in range(rounds):
                    for approach in approaches:
                        if approach == "replicated":
                            replica.attach()
                        try:
                            runs[approach].append(
                                run_clients(
                                    setups[approach],
                                    n,
                                    seconds / rounds,
                                    warmup=WARMUP_OPS,
                                    watch_pids=(redis_pid, replica.pid),
                                )
                            )
                        finally:
                            if approach == "replicated":
                                replica.detach()
                # the engine and the replicated engine reserve on the same counters: checked together
                both = sum(r.ok + r.warmup_ok for a in ("engine", "replicated") for r in runs[a])
                for approach in approaches:
                    merged = runs[approach][0]
                    for more in runs[approach][1:]:
                        merged = merged.merge(more)
                    acknowledged = merged.ok + merged.warmup_ok
                    if approach in ("engine", "replicated"):
                        check = check_engine(container, vids, {v: stock for v in vids}, both + parent_reserved)
                    elif approach == "lua":
                        check = check_lua(container, vids, stock, acknowledged)
                    else:
                        check = check_rowlock(dsn, acknowledged)
                    summary = summarize_rounds(runs[approach], merged, check)
                    row[approach] = summary
                    log_case(log, "engine", workload, n, approach, summary, merged, check)
                e, lua, rl = row["engine"], row["lua"], row["rowlock"]
                row["replicated_vs_engine"] = (
                    round(row["replicated"]["per_second"] / e["per_second"], 3) if e["per_second"] else None
                )
                row["engine_vs_lua"] = (
                    round(e["per_second"] / lua["per_second"], 3) if lua["per_second"] else None
                )
                row["engine_vs_rowlock"] = (
                    round(e["per_second"] / rl["per_second"], 1) if rl and rl["per_second"] else None
                )
                rows.append(row)
        return {
            "seconds": seconds,
            "rounds": rounds,
            "rows": rows,
            "hot_stock": HOT_STOCK,
            "spread_variants": SPREAD_VARIANTS,
            "spread_stock": SPREAD_STOCK,
            "rowlock": dsn is not None,
            "note": "" if dsn else stores.pg_note,
        }
    finally:
        if replica is not None:
            replica.stop()
        stores.flush_redis()
        container.close()
        engine_db.dispose()
