"""The expiry listener killed while holds lapse; the sweeper is the guarantee, the listener catches up.

Real processes against a private Redis and the test database: `inventory listen`, `inventory worker`
and `inventory scheduler`, with SWEEP_INTERVAL_SECONDS=2.
"""
from __future__ import annotations

import signal
import time

from app import clock
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, wait_for
from tests.factories import make_variants
from tests.faults.conftest import assert_stock_exact, raw_redis

SWEEP_INTERVAL = 2
TTL_MS = 1000
BURST = 200
# rq-scheduler wakes once a second to enqueue what is due and then schedules the next run one
# interval after that enqueue, so a sweep can come up to a second later than the interval alone;
# the worker picks the job up at once. This is that second's allowance, on top of TTL + interval + 1.
SCHEDULER_TICK_ALLOWANCE = 1.0
REDIS_PASSWORD = "faults-redis-password-0001"


def _reserved(c, variant_ids) -> int:
    return sum(x.reserved for x in c.stock.counters(variant_ids).values())


def _log(proc) -> str:
    return proc.log_path.read_text(errors="replace")


def test_the_sweeper_releases_a_burst_the_dead_listener_missed_and_the_listener_catches_up(
        base_env, build, own_redis, processes, capsys):
    server = own_redis()
    raw_redis(server.url).config_set("requirepass", REDIS_PASSWORD)
    url = server.url.replace("redis://", f"redis://:{REDIS_PASSWORD}@")
    env = {**base_env, "REDIS_URL": url, "SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL),
           "RECONCILE_INTERVAL_SECONDS": "3600", "LOG_LEVEL": "INFO",
           "API_KEYS": f"admin:{ADMIN_KEY},storefront:{STOREFRONT_KEY}"}
    _, c = build(env)
    variants = make_variants(c.sessions, 10, on_hand=40)
    c.stock.counters(variants)

    listener = processes.inventory("listener", "listen", env)
    worker = processes.inventory("worker", "worker", env)
    scheduler = processes.inventory("scheduler", "scheduler", env)
    wait_for(lambda: "listening for expired holds" in _log(listener), timeout=30, interval=0.1,
             message="the listener to subscribe")
    wait_for(lambda: "sweep every" in _log(scheduler), timeout=30, interval=0.1,
             message="the scheduler to install the schedule")
    # the worker has run the first sweep: the schedule is live end to end
    wait_for(lambda: "inventory-sweep" in _log(worker), timeout=30, interval=0.1, message="a first sweep")

    # 1. the listener dies; a burst of holds lapses; only the sweeper is left
    processes.kill(listener, signal.SIGKILL)
    started = time.monotonic()
    for i in range(BURST):
        c.stock.reserve(variants[i % len(variants)], f"burst{i}", 1, ttl_ms=TTL_MS)
    created_in = time.monotonic() - started
    assert _reserved(c, variants) == BURST
    wait_for(lambda: _reserved(c, variants) == 0, timeout=15, interval=0.05,
             message="the sweeper to release the burst")
    elapsed = time.monotonic() - started
    bound = TTL_MS / 1000 + SWEEP_INTERVAL + 1 + SCHEDULER_TICK_ALLOWANCE
    assert elapsed <= bound + created_in, f"released after {elapsed:.2f}s, bound {bound}s"
    assert_stock_exact(c, variants)

    # 2. nothing sweeps now (worker and scheduler stopped too); holds lapse with nobody listening
    processes.kill(worker, signal.SIGTERM)
    processes.kill(scheduler, signal.SIGTERM)
    for i in range(50):
        c.stock.reserve(variants[i % len(variants)], f"missed{i}", 1, ttl_ms=TTL_MS)
    lapse_at = clock.now_ms() + TTL_MS
    wait_for(lambda: clock.now_ms() > lapse_at + 300, timeout=5, message="the holds to lapse")
    assert _reserved(c, variants) == 50  # lapsed, events lost, still counted as reserved

    restarted = time.monotonic()
    listener = processes.inventory("listener-again", "listen", env)
    wait_for(lambda: _reserved(c, variants) == 0, timeout=30, interval=0.05,
             message="the restarted listener to sweep what it missed")
    caught_up = time.monotonic() - restarted
    wait_for(lambda: "catch-up sweep released 50 hold(s), 50 unit(s)" in _log(listener), timeout=10,
             message="the catch-up sweep in the listener's log")
    assert_stock_exact(c, variants)

    # the processes logged neither the Redis password nor an API key
    for proc in processes.children:
        text = _log(proc)
        for secret in (REDIS_PASSWORD, ADMIN_KEY, STOREFRONT_KEY):
            assert secret not in text, f"{proc.log_path.name} logs a secret"
    with capsys.disabled():
        print(f"\n[listener killed] {BURST} holds (ttl {TTL_MS} ms) created in {created_in:.2f}s, all released by "
              f"the sweeper {elapsed:.2f}s after the first (bound {bound:.1f}s); restarted listener caught up "
              f"on 50 missed holds {caught_up:.2f}s after start (process start included)")
