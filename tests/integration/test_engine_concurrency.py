"""Many shoppers at once on real Redis: threads and processes racing for the same units.

Every test ends on the invariant of DESIGN.md: available + reserved == on_hand, reserved equals the
sum of the live holds, and available never went below zero.
"""
from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter

from app import keys
from app.errors import InsufficientStock
from app.engine.holdrec import hold_id_for
from tests.conftest import wait_for
from tests.factories import make_variant, on_hand

STORM_PROCESSES = 16
STORM_SECONDS = 3.0
STORM_MAX_SECONDS = 30.0


def live_holds(engine, redis_client, vid) -> dict[str, int]:
    """Every hold of the variant, read through the engine: hold id -> quantity."""
    ids = redis_client.hkeys(keys.holds(vid))
    views = engine.holds([(vid, hid) for hid in ids])
    return {hid: h.quantity for hid, h in zip(ids, views) if h is not None}


def assert_invariant(engine, sessions, redis_client, vid) -> dict[str, int]:
    c = engine.counters([vid])[vid]
    holds = live_holds(engine, redis_client, vid)
    assert c.available >= 0
    assert c.available + c.reserved == on_hand(sessions, vid)
    assert c.reserved == sum(holds.values())
    assert c.active_holds == len(holds)
    return holds


class Sampler(threading.Thread):
    """Reads the counters (one HMGET: an atomic snapshot) as fast as it can until stopped."""

    def __init__(self, engine, vid):
        super().__init__(daemon=True)
        self.engine, self.vid = engine, vid
        self.stop = threading.Event()
        self.samples: list[tuple[int, int]] = []

    def run(self):
        while not self.stop.is_set():
            c = self.engine.counters([self.vid])[self.vid]
            self.samples.append((c.available, c.reserved))


# --- threads ------------------------------------------------------------------------------------

def test_ten_shoppers_racing_for_five_units_leave_exactly_five_sold(container, sessions, redis_client):
    engine = container.holds
    vid = make_variant(sessions, on_hand=5)
    engine.counters([vid])
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def shop(i):
        barrier.wait()
        try:
            engine.reserve(vid, f"user-{i}", 1)
            outcomes.append("ok")
        except InsufficientStock:
            outcomes.append("insufficient")

    threads = [threading.Thread(target=shop, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert Counter(outcomes) == {"ok": 5, "insufficient": 5}
    c = engine.counters([vid])[vid]
    assert (c.reserved, c.available, c.active_holds) == (5, 0, 5)
    assert_invariant(engine, sessions, redis_client, vid)


def test_adds_from_many_threads_into_one_hold_count_every_unit_once(container, sessions, redis_client):
    engine = container.holds
    vid = make_variant(sessions, on_hand=30)
    engine.counters([vid])
    barrier = threading.Barrier(8)
    ok = Counter()

    def add(i):
        barrier.wait()
        for _ in range(5):
            try:
                engine.reserve(vid, "same-user", 1)
                ok[i] += 1
            except InsufficientStock:
                pass

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(ok.values()) == 30
    holds = assert_invariant(engine, sessions, redis_client, vid)
    assert holds == {hold_id_for(vid, "same-user"): 30}


# --- processes ----------------------------------------------------------------------------------

def _storm_worker(env: dict, vid: int, index: int, seconds: float, ready, results, stop) -> None:
    """One shopper process: its own container, reserving and releasing at random until `stop` is set
    (at most `seconds`)."""
    from app.composition import Container
    from app.settings import load_settings

    container = Container(load_settings(env))
    engine = container.holds
    rng = random.Random(index)
    users = [f"p{index}-u{k}" for k in range(3)]
    held: dict[str, int] = {}
    stats = Counter()
    wrong: list[str] = []
    try:
        engine.counters([vid])
        ready.wait(30)
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            user = rng.choice(users)
            hold_id = hold_id_for(vid, user)
            if rng.random() < 0.6:
                qty = rng.randint(1, 4)
                mode = "add" if rng.random() < 0.7 else "set"
                try:
                    r = engine.reserve(vid, user, qty, mode=mode)
                except InsufficientStock:
                    stats["refused"] += 1
                    continue
                expected = held.get(user, 0) + qty if mode == "add" else qty
                if r.quantity != expected:
                    wrong.append(f"{hold_id}: reserve answered {r.quantity}, expected {expected}")
                held[user] = r.quantity
                stats["reserved"] += 1
            else:
                released = engine.release(vid, hold_id)
                if released != held.pop(user, 0):
                    wrong.append(f"{hold_id}: release gave back {released}")
                stats["released"] += 1
        results.put((index, {hold_id_for(vid, u): q for u, q in held.items()}, dict(stats), wrong, None))
    except Exception as exc:  # reported to the test, which fails with it
        results.put((index, {}, dict(stats), wrong, repr(exc)))
    finally:
        container.close()


def test_a_storm_of_sixteen_processes_never_oversells_and_keeps_every_hold(
        container, sessions, redis_client, env):
    engine = container.holds
    vid = make_variant(sessions, on_hand=40)
    engine.counters([vid])
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(STORM_PROCESSES + 1)
    results = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=_storm_worker, args=(dict(env), vid, i, STORM_MAX_SECONDS, ready, results, stop))
             for i in range(STORM_PROCESSES)]
    for p in procs:
        p.start()
    sampler = Sampler(engine, vid)
    try:
        ready.wait(30)
        sampler.start()
        # The storm lasts STORM_SECONDS and until the sampler has read the counters often enough,
        # however the machine schedules it beside 16 busy processes (at most STORM_MAX_SECONDS).
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started >= STORM_SECONDS and len(sampler.samples) > 50,
                 timeout=STORM_MAX_SECONDS, message="the storm's time and enough counter samples")
        stop.set()
        reports = [results.get(timeout=30) for _ in procs]
    finally:
        stop.set()
        sampler.stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    sampler.join(5)

    assert [r[4] for r in reports] == [None] * STORM_PROCESSES
    assert [w for r in reports for w in r[3]] == []
    assert all(p.exitcode == 0 for p in procs)
    stats = sum((Counter(r[2]) for r in reports), Counter())
    assert stats["reserved"] > 100 and stats["released"] > 100 and stats["refused"] > 0, stats

    expected_holds = {hid: qty for r in reports for hid, qty in r[1].items()}
    holds = assert_invariant(engine, sessions, redis_client, vid)
    assert holds == expected_holds

    assert len(sampler.samples) > 50
    assert min(a for a, _ in sampler.samples) >= 0
    assert {a + r for a, r in sampler.samples} == {40}
    assert container.reconciler.reconcile([vid]).drifted == 0


def test_lapsed_holds_released_by_several_paths_at_once_come_back_exactly_once(
        container, sessions, redis_client):
    engine = container.holds
    vids = [make_variant(sessions, on_hand=100) for _ in range(2)]
    t0 = 1_000_000  # a fixed clock: every hold lapses at t0 + 1000
    pairs = []
    for vid in vids:
        for i in range(100):
            pairs.append((vid, engine.reserve(vid, f"u{i}", 1, now=t0, ttl_ms=1_000).hold_id))
    later = t0 + 5_000
    barrier = threading.Barrier(6)
    released: list[int] = []

    def sweeper():
        barrier.wait()
        released.append(container.sweeper.sweep(now=later).units)

    def listener_path(order):
        barrier.wait()
        released.append(container.sweeper.sweep_variants([vid for vid, _ in order], now=later).units)

    def expiry_only_release(order):
        barrier.wait()
        released.append(sum(engine.release_many(order, only_if_expired=True, now=later)))

    threads = [threading.Thread(target=sweeper), threading.Thread(target=sweeper),
               threading.Thread(target=listener_path, args=(pairs,)),
               threading.Thread(target=listener_path, args=(pairs[::-1],)),
               threading.Thread(target=expiry_only_release, args=(pairs[50:] + pairs[:50],)),
               threading.Thread(target=expiry_only_release, args=(pairs[::2] + pairs[1::2],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(released) == 200
    for vid in vids:
        c = engine.counters([vid])[vid]
        assert (c.available, c.reserved, c.active_holds) == (100, 0, 0)
        assert redis_client.hlen(keys.customer_units(vid)) == 0
