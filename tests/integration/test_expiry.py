"""Holds lapse and their units come back: through the listener (fast path) and the sweeper (guarantee).

Real Redis throughout: the listener runs in a thread with its own container, as its process would,
and hears the server's `expired` events.
"""
from __future__ import annotations

import logging
import random
import threading

import pytest

import jobs.tasks
from app import clock, keys
from app.composition import Container
from app.embedded import EmbeddedRedis
from app.errors import InsufficientStock
from jobs.listener import ExpiryListener
from tests.conftest import wait_for
from tests.factories import make_variant, make_variants


@pytest.fixture
def start_listener(settings):
    """Starts an ExpiryListener thread on its own container; stops it after the test."""
    started: list[tuple[ExpiryListener, threading.Thread, Container]] = []

    def start() -> ExpiryListener:
        c = Container(settings)
        listener = ExpiryListener(c, max_backoff=0.2)
        thread = threading.Thread(target=listener.run, name="expiry-listener", daemon=True)
        thread.start()
        assert listener.connected.wait(5), "listener did not connect"
        started.append((listener, thread, c))
        return listener

    yield start
    for listener, thread, c in started:
        listener.stop.set()
        thread.join(5)
        assert not thread.is_alive()
        c.close()


@pytest.fixture
def sweeper(container):
    jobs.tasks.use_container(container)
    yield jobs.tasks.sweep_job
    jobs.tasks.use_container(None)


def available(engine, vid) -> int:
    return engine.counters([vid])[vid].available


def total_available(engine, vids) -> int:
    return sum(c.available for c in engine.counters(vids).values())


def released_by(listener: ExpiryListener, units: int) -> tuple[int, int]:
    """(holds, units) the listener released, once its thread has added up at least `units`: the script
    gives the units back in Redis a moment before the thread counts them."""
    wait_for(lambda: listener.released_units >= units, timeout=2, message="the listener's count")
    return listener.released_holds, listener.released_units


def subscriber_ids(redis_client) -> set[str]:
    return {c["id"] for c in redis_client.client_list(_type="pubsub")}


# --- the listener -----------------------------------------------------------------------------

def test_the_listener_releases_a_lapsed_hold_within_two_seconds_of_its_ttl(
        container, sessions, start_listener):
    engine = container.holds
    vid = make_variant(sessions, on_hand=5)
    listener = start_listener()
    t0 = clock.now_ms()
    engine.reserve(vid, "u1", 2, now=t0, ttl_ms=1_000)
    assert available(engine, vid) == 3
    wait_for(lambda: available(engine, vid) == 5, timeout=5, message="the hold's units to come back")
    late_ms = clock.now_ms() - (t0 + 1_000)
    assert late_ms < 2_000
    assert released_by(listener, 2) == (1, 2)
    c = engine.counters([vid])[vid]
    assert (c.reserved, c.active_holds) == (0, 0)


def test_a_thousand_holds_lapsing_at_once_all_come_back_through_the_listener(
        container, sessions, start_listener, redis_client):
    engine = container.holds
    vids = make_variants(sessions, 10, on_hand=100)
    listener = start_listener()
    t0 = clock.now_ms()
    # One `now` for every reserve: each hold lapses at t0 + ttl, and no later reserve reclaims an earlier one.
    for i in range(100):
        for vid in vids:
            # 5 s: 1,000 reserves on a loaded machine (a cluster in CI) took over 1 s, and the
            # listener rightly released the first ones before the last was made
            engine.reserve(vid, f"user-{i}", 1, now=t0, ttl_ms=5_000)
    assert total_available(engine, vids) == 0
    wait_for(lambda: total_available(engine, vids) == 1_000, timeout=15,
             message="all 1,000 holds to come back")
    assert released_by(listener, 1_000) == (1_000, 1_000)
    assert all((c.reserved, c.active_holds) == (0, 0) for c in engine.counters(vids).values())
    assert all(redis_client.zcard(keys.hold_expiry(v)) == 0 for v in vids)


def test_the_listener_retries_a_hold_whose_event_came_before_its_expiry_by_this_clock(
        container, sessions, start_listener):
    engine = container.holds
    vid = make_variant(sessions, on_hand=5)
    listener = start_listener()
    t0 = clock.now_ms()
    # The timer key lives 300 ms; the hold itself says it lapses 800 ms later (a clock ahead of Redis's).
    engine.reserve(vid, "u1", 2, now=t0 + 800, ttl_ms=300)
    wait_for(lambda: available(engine, vid) == 5, timeout=5, message="the early hold to be retried")
    assert clock.now_ms() >= t0 + 1_100
    assert released_by(listener, 2) == (1, 2)


def test_the_listener_sweeps_what_lapsed_before_it_started(container, sessions, start_listener, redis_client):
    engine = container.holds
    vid = make_variant(sessions, on_hand=5)
    past = clock.now_ms() - 60_000
    engine.reserve(vid, "u1", 2, now=past, ttl_ms=1_000)
    redis_client.delete(keys.variant_timer(vid))  # its event was sent while nobody listened
    assert available(engine, vid) == 3
    start_listener()  # connected is set only after its catch-up sweep
    assert available(engine, vid) == 5


def test_the_listener_survives_its_connection_being_killed_and_loses_no_hold(
        container, sessions, start_listener, redis_client, caplog):
    caplog.set_level(logging.WARNING, logger="jobs.listener")
    engine = container.holds
    quiet, live = make_variant(sessions, on_hand=10), make_variant(sessions, on_hand=10)
    others = subscriber_ids(redis_client)  # other clients of a shared server are left alone
    listener = start_listener()
    mine = subscriber_ids(redis_client) - others
    assert len(mine) == 1

    # Holds whose events are lost for good: lapsed, timers gone without a word.
    past = clock.now_ms() - 60_000
    for i in range(4):
        engine.reserve(quiet, f"lost-{i}", 1, now=past, ttl_ms=1_000)
    redis_client.delete(keys.variant_timer(quiet))
    assert available(engine, quiet) == 6

    assert redis_client.client_kill_filter(_type="pubsub", _id=next(iter(mine))) == 1
    # Holds that lapse while it reconnects or just after.
    t0 = clock.now_ms()
    for i in range(5):
        engine.reserve(live, f"live-{i}", 2, now=t0, ttl_ms=300)
    assert available(engine, live) == 0

    wait_for(lambda: subscriber_ids(redis_client) - others - mine, timeout=5, message="a new subscription")
    wait_for(lambda: available(engine, quiet) == 10, timeout=5, message="the lost holds (catch-up sweep)")
    wait_for(lambda: available(engine, live) == 10, timeout=5, message="the holds that lapsed meanwhile")
    assert any("listener lost Redis" in rec.getMessage() for rec in caplog.records)
    wait_for(listener.connected.is_set, timeout=5, message="the listener to report itself connected again")

    # and it still hears events after the reconnect
    engine.reserve(live, "after", 3, now=clock.now_ms(), ttl_ms=200)
    wait_for(lambda: available(engine, live) == 10, timeout=5, message="a hold after the reconnect")
    for vid in (quiet, live):
        c = engine.counters([vid])[vid]
        assert (c.available, c.reserved, c.active_holds) == (10, 0, 0)


@pytest.mark.single_node
def test_a_listener_on_a_server_with_notifications_off_turns_them_on_keeping_other_flags(
        settings, sessions, tmp_path):
    # A server of its own: CONFIG SET on a shared one would silence other listeners meanwhile.
    with EmbeddedRedis(tmp_path, extra_args=["--notify-keyspace-events", "Kg"]) as server:
        c = Container(settings.with_(redis_url=server.url))
        listener = ExpiryListener(c, max_backoff=0.2)
        thread = threading.Thread(target=listener.run, daemon=True)
        try:
            assert c.redis.config_get("notify-keyspace-events")["notify-keyspace-events"] == "gK"
            thread.start()
            assert listener.connected.wait(5)
            flags = c.redis.config_get("notify-keyspace-events")["notify-keyspace-events"]
            assert {"K", "g", "E", "x"} <= set(flags)
            vid = make_variant(sessions, on_hand=5)
            c.holds.reserve(vid, "u1", 2, ttl_ms=200)
            wait_for(lambda: c.holds.counters([vid])[vid].available == 5, timeout=5,
                     message="the hold's units")
            assert released_by(listener, 2) == (1, 2)
        finally:
            listener.stop.set()
            thread.join(5)
            c.close()


# --- the sweeper alone ----------------------------------------------------------------------------

def test_with_no_listener_running_the_sweeper_alone_releases_lapsed_holds(
        container, sessions, sweeper, redis_client):
    engine = container.holds
    vid = make_variant(sessions, on_hand=5)
    r = engine.reserve(vid, "u1", 2, ttl_ms=200)
    engine.reserve(vid, "u2", 1, ttl_ms=60_000)
    # Redis expires the timer and publishes to nobody: the hold stays until the sweeper comes.
    wait_for(lambda: redis_client.exists(keys.variant_timer(vid)) == 0, timeout=5,
             message="the timer key to expire")
    wait_for(lambda: clock.now_ms() >= r.expires_ms, timeout=5, message="the hold's expiry time")
    assert available(engine, vid) == 2
    report = sweeper()
    assert (report["holds"], report["units"]) == (1, 2)
    c = engine.counters([vid])[vid]
    assert (c.available, c.reserved, c.active_holds) == (4, 1, 1)
    assert sweeper()["holds"] == 0


def test_a_thousand_lapsed_holds_all_come_back_in_one_sweep(container, sessions):
    engine = container.holds
    big, *small = make_variants(sessions, 5, on_hand=1_000)
    t0 = clock.now_ms()
    for i in range(960):
        engine.reserve(big, f"user-{i}", 1, now=t0)
    for vid in small:
        for i in range(10):
            engine.reserve(vid, f"user-{i}", 1, now=t0)
    assert container.sweeper.sweep(now=t0 + engine.ttl_ms - 1).holds == 0
    report = container.sweeper.sweep(now=t0 + engine.ttl_ms)
    assert (report.holds, report.units) == (1_000, 1_000)
    assert all((c.available, c.reserved, c.active_holds) == (1_000, 0, 0)
               for c in engine.counters([big, *small]).values())


def test_a_sweep_comes_back_in_the_same_call_for_a_variant_with_more_due_than_one_script_releases(
         container, sessions, monkeypatch):
    monkeypatch.setattr("app.engine.expiry.SWEEP_SCRIPT_LIMIT", 3)
    engine = container.holds
    vid = make_variant(sessions, on_hand=20)
    t0 = clock.now_ms()
    for i in range(10):
        engine.reserve(vid, f"user-{i}", 1, now=t0, ttl_ms=1_000)
    report = container.sweeper.sweep(now=t0 + 1_000)
    assert (report.holds, report.units) == (10, 10)
    assert engine.counters([vid])[vid].available == 20


def test_holds_lapsing_during_a_storm_with_listener_and_sweeper_both_running_come_back_exactly_once(
         container, sessions, start_listener):
    engine = container.holds
    vid = make_variant(sessions, on_hand=30)
    listener = start_listener()
    stop = threading.Event()
    samples: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    reserved_units = []

    def shopper(n):
        rng = random.Random(n)
        try:
            while not stop.is_set():
                try:
                    r = engine.reserve(vid, f"t{n}-u{rng.randint(0, 4)}", rng.randint(1, 3),
                                       ttl_ms=rng.randint(50, 400))
                    reserved_units.append(r.quantity)
                except InsufficientStock:
                    pass
        except BaseException as exc:
            errors.append(exc)

    def sweeper():
        try:
            while not stop.is_set():
                container.sweeper.sweep()
        except BaseException as exc:
            errors.append(exc)

    def sampler():
        while not stop.is_set():
            c = engine.counters([vid])[vid]
            samples.append((c.available, c.reserved))

    threads = [threading.Thread(target=shopper, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=sweeper), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    stop.wait(2.0)  # the storm's length, not a wait for a condition
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(reserved_units) > 50
    assert samples and {a + r for a, r in samples} == {30}
    assert min(a for a, _ in samples) >= 0
    wait_for(lambda: engine.counters([vid])[vid].available == 30, timeout=5, message="every hold to lapse")
    c = engine.counters([vid])[vid]
    assert (c.available, c.reserved, c.active_holds) == (30, 0, 0)
    assert released_by(listener, 1)[0] > 0  # the fast path took part, not only sweeper and reserves


def test_holds_come_back_within_a_second_beside_thousands_of_live_holds(container, sessions, start_listener):
    """Redis expires timer keys by sampling: beside thousands of live ones it finds a lapsed one
    seconds late, so its event comes late. The listener's sweep of the due hints does not wait."""
    engine = container.holds
    crowd = make_variant(sessions, on_hand=5_000)
    quick = make_variant(sessions, on_hand=50)
    for i in range(3_000):
        engine.reserve(crowd, f"c{i}", 1)  # live for the default TTL
    listener = start_listener()
    lags = []
    for i in range(10):
        start = clock.now_ms()
        engine.reserve(quick, f"q{i}", 5, ttl_ms=200)
        wait_for(lambda: available(engine, quick) == 50, timeout=3, interval=0.01, message="the quick hold")
        lags.append(clock.now_ms() - (start + 200))
    assert max(lags) < 1_000, lags
    assert available(engine, crowd) == 2_000
    assert listener.released_holds >= 10
