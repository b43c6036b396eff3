"""The Lua scripts of lua/ on a real Redis: every return code, through the engine (app/engine/) or the script
itself, run by the one runner.

Time is passed in (`now=`), never slept through: each test takes one `T0` and moves it by hand.
"""
from __future__ import annotations

import dataclasses
import threading

import pytest
import redis as redis_lib
from redis.crc import key_slot

from app import clock, keys
from app.errors import InsufficientStock, LimitExceeded, StockBelowReserved
from app.composition import Container
from app.engine.holdrec import hold_id_for
from app.engine.holds import Finalization, Holds, variant_keys
from app.errors import CheckoutInProgress
from tests.factories import make_variant

TTL = 60_000


@pytest.fixture
def engine(container) -> Holds:
    return container.holds


@pytest.fixture
def sweeper(container):
    return container.sweeper


@pytest.fixture
def reconciler(container):
    return container.reconciler


@pytest.fixture
def vid(sessions) -> int:
    return make_variant(sessions, on_hand=10)


@pytest.fixture
def t0() -> int:
    return clock.now_ms()


def counts(engine, vid) -> tuple[int, int]:
    c = engine.counters([vid])[vid]
    return c.available, c.reserved


def stock_hash(redis_client, vid) -> dict:
    return redis_client.hgetall(keys.stock(vid))


def hold(engine, vid, user):
    return engine.holds([(vid, hold_id_for(vid, user))])[0]


def lock(engine, vid, user, token="tok-1", now=None):
    return engine.lock_many([(vid, hold_id_for(vid, user))], token, now=now)[0]


INDEXED = {"reserveHold", "sweepHolds", "reconcileStock"}  # these also keep the slot's sweep index


def run(engine, name, vid, args, n_keys=None):
    if name in INDEXED:
        ks = engine.indexed_keys(vid)
    else:
        ks = variant_keys(vid)
        ks = ks[:n_keys] if n_keys else ks
    return engine.runner.call(name, ks, args)


# --- reserve ----------------------------------------------------------------------------------

def test_reserve_moves_units_from_available_into_one_hold(engine, vid, t0, redis_client):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    assert (r.quantity, r.available, r.expires_ms) == (3, 7, t0 + TTL)
    assert counts(engine, vid) == (7, 3)
    h = hold(engine, vid, "u1")
    assert (h.quantity, h.expires_ms, h.state, h.user, h.gen) == (3, t0 + TTL, "held", "u1", r.gen)
    assert redis_client.zscore(keys.hold_expiry(vid), r.hold_id) == t0 + TTL
    assert 0 < redis_client.pttl(keys.variant_timer(vid)) <= TTL  # armed at the earliest hold's expiry
    # customers are counted only while a per-customer limit is set
    assert redis_client.hget(keys.customer_units(vid), "u1") is None
    engine.reserve(vid, "u9", 2, now=t0, ttl_ms=TTL, limit=5)
    assert redis_client.hget(keys.customer_units(vid), "u9") == "2"


def test_reserve_script_answers_ok_with_available_hold_size_expiry_and_generation(engine, vid, t0):
    engine.counters([vid])
    hid = hold_id_for(vid, "u1")
    res = run(engine, "reserveHold", vid, [hid, 4, t0, TTL, "u1", "add", 0, "g1"])
    assert res == [1, 6, 4, t0 + TTL, "g1", 1]  # 1: the variant's earliest expiry now
    other = hold_id_for(vid, "u2")
    later = run(engine, "reserveHold", vid, [other, 1, t0 + 5, TTL, "u2", "add", 0, "g2"])
    assert later == [1, 5, 1, t0 + 5 + TTL, "g2", 0]  # expires after the first: no new earliest


def test_reserve_refuses_more_than_available_and_writes_nothing(engine, vid, t0, redis_client):
    engine.reserve(vid, "u1", 8, now=t0, ttl_ms=TTL)
    before = stock_hash(redis_client, vid)
    with pytest.raises(InsufficientStock) as info:
        engine.reserve(vid, "u2", 3, now=t0, ttl_ms=TTL)
    assert (info.value.available, info.value.requested) == (2, 3)
    assert stock_hash(redis_client, vid) == before
    assert hold(engine, vid, "u2") is None
    assert redis_client.hget(keys.customer_units(vid), "u2") is None


def test_reserve_refuses_past_the_per_customer_limit_counting_what_is_already_held(engine, vid, t0):
    engine.reserve(vid, "u1", 2, now=t0, ttl_ms=TTL, limit=3)
    with pytest.raises(LimitExceeded) as info:
        engine.reserve(vid, "u1", 2, now=t0, ttl_ms=TTL, limit=3)
    assert info.value.details == {"variant_id": vid, "limit": 3, "already": 2, "requested": 2}
    assert hold(engine, vid, "u1").quantity == 2
    assert engine.reserve(vid, "u2", 3, now=t0, ttl_ms=TTL, limit=3).quantity == 3
    assert counts(engine, vid) == (5, 5)


def test_reserve_refuses_a_hold_that_a_checkout_has_locked(engine, vid, t0):
    engine.reserve(vid, "u1", 2, now=t0, ttl_ms=TTL)
    assert lock(engine, vid, "u1", now=t0).ok
    with pytest.raises(CheckoutInProgress):
        engine.reserve(vid, "u1", 1, now=t0 + 1, ttl_ms=TTL)
    assert hold(engine, vid, "u1").quantity == 2
    assert counts(engine, vid) == (8, 2)


def test_reserve_script_answers_counters_missing_and_creates_no_hold(engine, vid, t0, redis_client):
    hid = hold_id_for(vid, "u1")
    res = run(engine, "reserveHold", vid, [hid, 1, t0, TTL, "u1", "add", 0, "g1"])
    assert res == [-1]
    assert redis_client.exists(keys.stock(vid), keys.holds(vid), keys.variant_timer(vid),
                               keys.customer_units(vid)) == 0


def test_reserve_through_the_engine_rebuilds_missing_counters_from_the_database(
        engine, vid, t0, redis_client):
    assert redis_client.exists(keys.stock(vid)) == 0
    assert engine.reserve(vid, "u1", 4, now=t0, ttl_ms=TTL).available == 6
    assert stock_hash(redis_client, vid)["version"] == "0"


def test_a_second_add_merges_into_the_same_hold_and_restarts_its_timer(engine, vid, t0):
    first = engine.reserve(vid, "u1", 2, now=t0, ttl_ms=TTL)
    second = engine.reserve(vid, "u1", 3, now=t0 + 1_000, ttl_ms=TTL)
    assert second.hold_id == first.hold_id and second.gen == first.gen
    assert (second.quantity, second.expires_ms, second.available) == (5, t0 + 1_000 + TTL, 5)
    assert engine.counters([vid])[vid].active_holds == 1
    assert counts(engine, vid) == (5, 5)


def test_set_makes_the_hold_exactly_the_given_size_both_ways(engine, vid, t0):
    engine.reserve(vid, "u1", 5, now=t0, ttl_ms=TTL)
    assert engine.reserve(vid, "u1", 2, mode="set", now=t0, ttl_ms=TTL).quantity == 2
    assert counts(engine, vid) == (8, 2)
    assert engine.reserve(vid, "u1", 9, mode="set", now=t0, ttl_ms=TTL).quantity == 9
    assert counts(engine, vid) == (1, 9)


def test_set_beyond_what_is_available_is_refused_and_keeps_the_hold(engine, vid, t0):
    engine.reserve(vid, "u1", 5, now=t0, ttl_ms=TTL)
    with pytest.raises(InsufficientStock):
        engine.reserve(vid, "u1", 11, mode="set", now=t0, ttl_ms=TTL)
    assert hold(engine, vid, "u1").quantity == 5
    assert counts(engine, vid) == (5, 5)


def test_set_zero_removes_the_hold_and_every_trace_of_it(engine, vid, t0, redis_client):
    r = engine.reserve(vid, "u1", 4, now=t0, ttl_ms=TTL)
    gone = engine.reserve(vid, "u1", 0, mode="set", now=t0, ttl_ms=TTL)
    assert (gone.quantity, gone.available) == (0, 10)
    assert counts(engine, vid) == (10, 0)
    assert hold(engine, vid, "u1") is None
    assert redis_client.zscore(keys.hold_expiry(vid), r.hold_id) is None
    assert redis_client.hget(keys.customer_units(vid), "u1") is None


def test_reserve_reclaims_lapsed_holds_of_the_variant_before_checking_stock(engine, vid, t0):
    engine.reserve(vid, "u1", 10, now=t0, ttl_ms=1_000)
    with pytest.raises(InsufficientStock):
        engine.reserve(vid, "u2", 1, now=t0 + 999, ttl_ms=TTL)
    assert engine.reserve(vid, "u2", 1, now=t0 + 1_000, ttl_ms=TTL).available == 9
    assert hold(engine, vid, "u1") is None
    assert counts(engine, vid) == (9, 1)


def test_a_lapsed_hold_is_replaced_by_a_fresh_one_with_a_new_generation(engine, vid, t0):
    old = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    new = engine.reserve(vid, "u1", 2, now=t0 + 5_000, ttl_ms=TTL)
    assert new.quantity == 2 and new.gen != old.gen
    assert counts(engine, vid) == (8, 2)


# --- release ----------------------------------------------------------------------------------

def test_release_gives_the_units_back_once_and_a_second_release_does_nothing(engine, vid, t0, redis_client):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    assert engine.release(vid, r.hold_id, now=t0) == 3
    assert engine.release(vid, r.hold_id, now=t0) == 0
    assert counts(engine, vid) == (10, 0)
    assert redis_client.zcard(keys.hold_expiry(vid)) == 0


def test_release_script_answers_released_then_nothing(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    assert run(engine, "releaseHold", vid, [r.hold_id, t0, "any", ""]) == [1, 3]
    assert run(engine, "releaseHold", vid, [r.hold_id, t0, "any", ""]) == [0, 0]


def test_release_in_expired_mode_leaves_a_hold_that_is_not_yet_due(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    not_due = run(engine, "releaseHold", vid, [r.hold_id, t0 + 999, "expired", ""])
    assert not_due == [-1, t0 + 1_000]
    assert engine.release_many([(vid, r.hold_id)], only_if_expired=True, now=t0 + 999) == [0]
    assert counts(engine, vid) == (7, 3)
    assert engine.release_many([(vid, r.hold_id)], only_if_expired=True, now=t0 + 1_000) == [3]
    assert counts(engine, vid) == (10, 0)


def test_release_leaves_a_locked_hold_alone(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    assert lock(engine, vid, "u1", now=t0).ok
    assert run(engine, "releaseHold", vid, [r.hold_id, t0 + 5_000, "expired", ""]) == [-2, 0]
    assert engine.release(vid, r.hold_id, now=t0 + 5_000) == 0
    assert hold(engine, vid, "u1").state == "locked"
    assert counts(engine, vid) == (7, 3)


def test_release_of_an_older_generation_leaves_the_new_hold_indexed_for_the_sweeper(
        engine, vid, t0, redis_client, sweeper):
    old = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    engine.release(vid, old.hold_id, now=t0)
    new = engine.reserve(vid, "u1", 2, now=t0, ttl_ms=1_000)
    assert engine.release(vid, old.hold_id, now=t0, gen=old.gen) == 0
    assert hold(engine, vid, "u1").gen == new.gen
    assert redis_client.zscore(keys.hold_expiry(vid), new.hold_id) == t0 + 1_000
    assert sweeper.sweep(now=t0 + 1_000).holds == 1
    assert counts(engine, vid) == (10, 0)


# --- lock / unlock ------------------------------------------------------------------------------

def test_lock_answers_the_hold_size_generation_and_owner(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    res = lock(engine, vid, "u1", token="tok-a", now=t0)
    assert (res.ok, res.quantity, res.gen, res.user) == (True, 3, r.gen, "u1")
    h = hold(engine, vid, "u1")
    assert (h.state, h.token, h.locked_ms) == ("locked", "tok-a", t0)


def test_lock_refuses_a_hold_past_its_expiry_though_no_release_ran_and_returns_its_units(
        engine, vid, t0, redis_client):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    assert hold(engine, vid, "u1") is not None  # nothing released it yet
    res = lock(engine, vid, "u1", now=t0 + 1_000)
    assert (res.ok, res.reason) == (False, "expired")
    assert hold(engine, vid, "u1") is None
    assert counts(engine, vid) == (10, 0)
    assert redis_client.hget(keys.customer_units(vid), "u1") is None


def test_lock_is_idempotent_for_the_same_token_and_refused_for_another(engine, vid, t0):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    first = lock(engine, vid, "u1", token="tok-a", now=t0)
    again = lock(engine, vid, "u1", token="tok-a", now=t0 + 10)
    other = lock(engine, vid, "u1", token="tok-b", now=t0 + 10)
    assert first == again and first.ok
    assert (other.ok, other.reason) == (False, "locked")
    assert hold(engine, vid, "u1").token == "tok-a"
    assert hold(engine, vid, "u1").locked_ms == t0


def test_lock_of_a_hold_that_does_not_exist_is_refused_as_missing(engine, vid, t0):
    engine.counters([vid])
    res = lock(engine, vid, "nobody", now=t0)
    assert (res.ok, res.reason) == (False, "missing")


def test_unlock_makes_a_locked_hold_held_again(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    lock(engine, vid, "u1", now=t0)
    assert engine.unlock_many([(vid, r.hold_id, r.gen)], now=t0 + 1) == [1]
    assert engine.unlock_many([(vid, r.hold_id, r.gen)], now=t0 + 1) == [0]
    h = hold(engine, vid, "u1")
    assert (h.state, h.token, h.locked_ms, h.quantity) == ("held", "", 0, 3)
    assert counts(engine, vid) == (7, 3)


def test_unlock_of_a_hold_that_lapsed_while_locked_releases_it(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    lock(engine, vid, "u1", now=t0)
    assert engine.unlock_many([(vid, r.hold_id, r.gen)], now=t0 + 1_000) == [2]
    assert hold(engine, vid, "u1") is None
    assert counts(engine, vid) == (10, 0)


def test_unlock_with_another_generation_does_nothing(engine, vid, t0):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    lock(engine, vid, "u1", now=t0)
    assert engine.unlock_many([(vid, r.hold_id, "not-" + r.gen)], now=t0) == [0]
    assert hold(engine, vid, "u1").state == "locked"


# --- finalize -----------------------------------------------------------------------------------

def test_finalize_takes_the_units_out_of_reserved_for_good_and_is_idempotent(engine, vid, t0, redis_client):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL, limit=10)
    lock(engine, vid, "u1", now=t0)
    item = Finalization(vid, r.hold_id, r.gen, 3, "u1", new_version=1)
    assert engine.finalize_many([item]) == [1]
    assert engine.finalize_many([item]) == [0]
    c = engine.counters([vid])[vid]
    assert (c.available, c.reserved, c.version, c.active_holds) == (7, 0, 1, 0)
    assert redis_client.zcard(keys.hold_expiry(vid)) == 0
    assert redis_client.hget(keys.customer_units(vid), "u1") == "3"  # ordered units still count


def test_finalize_of_a_gone_hold_takes_the_units_from_available_when_only_this_order_is_missing(
        engine, vid, t0, redis_client, monkeypatch):
    monkeypatch.setattr(engine, "settings", engine.settings.with_(max_units_per_customer=10))
    engine.counters([vid])
    hid = hold_id_for(vid, "u1")
    item = Finalization(vid, hid, "g-lost", 3, "u1", new_version=1)
    assert engine.finalize_many([item]) == [2]
    assert engine.finalize_many([item]) == [0]
    c = engine.counters([vid])[vid]
    assert (c.available, c.reserved, c.version) == (7, 0, 1)
    assert redis_client.hget(keys.customer_units(vid), "u1") == "3"


def test_finalize_of_a_gone_hold_leaves_it_to_the_reconciler_when_other_changes_are_missing_too(engine, vid):
    engine.counters([vid])
    item = Finalization(vid, hold_id_for(vid, "u1"), "g-lost", 3, "u1", new_version=3)
    assert engine.finalize_many([item]) == [0]
    c = engine.counters([vid])[vid]
    assert (c.available, c.reserved, c.version) == (10, 0, 0)


def test_finalize_with_no_counters_at_all_does_nothing(engine, vid, redis_client):
    item = Finalization(vid, hold_id_for(vid, "u1"), "g", 3, "u1", new_version=1)
    assert engine.finalize_many([item]) == [0]
    assert redis_client.exists(keys.stock(vid)) == 0


# --- adjust -------------------------------------------------------------------------------------

def test_adjust_adds_units_only_at_commit(engine, vid, t0, redis_client):
    engine.counters([vid])
    assert engine.adjust_phase(vid, "begin", 5, now=t0) == (10, 0, 0)
    h = stock_hash(redis_client, vid)
    assert (h["adj_pending"], h["adj_since"]) == ("1", str(t0))
    assert engine.adjust_phase(vid, "commit", 5, now=t0) == (15, 0, 1)
    assert stock_hash(redis_client, vid)["adj_pending"] == "0"


def test_adjust_removes_units_already_at_begin_and_abort_puts_them_back(engine, vid, t0, redis_client):
    engine.counters([vid])
    assert engine.adjust_phase(vid, "begin", -4, now=t0) == (6, 0, 0)
    assert engine.adjust_phase(vid, "abort", -4, now=t0) == (10, 0, 0)
    assert stock_hash(redis_client, vid)["adj_pending"] == "0"
    assert engine.adjust_phase(vid, "begin", -4, now=t0) == (6, 0, 0)
    assert engine.adjust_phase(vid, "commit", -4, now=t0) == (6, 0, 1)


def test_adjust_begin_refuses_to_remove_units_that_are_reserved_and_writes_nothing(
        engine, vid, t0, redis_client):
    engine.reserve(vid, "u1", 8, now=t0, ttl_ms=TTL)
    before = stock_hash(redis_client, vid)
    assert run(engine, "adjustStock", vid, ["begin", -3, t0], n_keys=1) == [-2, 2]
    with pytest.raises(StockBelowReserved) as info:
        engine.adjust_phase(vid, "begin", -3, now=t0)
    assert info.value.code == "stock_below_reserved"
    assert stock_hash(redis_client, vid) == before


def test_adjust_script_answers_counters_missing_and_rejects_an_unknown_phase(engine, vid, t0):
    assert run(engine, "adjustStock", vid, ["begin", 1, t0], n_keys=1) == [-1]
    engine.counters([vid])
    with pytest.raises(redis_lib.ResponseError, match="unknown phase"):
        run(engine, "adjustStock", vid, ["sideways", 1, t0], n_keys=1)


# --- initStock ----------------------------------------------------------------------------------

def test_init_stock_builds_missing_counters_from_on_hand_and_live_holds_then_never_touches_them(
        engine, vid, t0, redis_client):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    redis_client.delete(keys.stock(vid))
    assert run(engine, "initStock", vid, [10, 4, 0], n_keys=4) == [1, 7, 3]
    assert run(engine, "initStock", vid, [99, 9, 0], n_keys=4) == [0, 7, 3]
    h = stock_hash(redis_client, vid)
    assert (h["available"], h["reserved"], h["version"], h["adj_pending"]) == ("7", "3", "4", "0")


# --- sweep --------------------------------------------------------------------------------------

def test_sweep_script_releases_at_most_its_limit_and_says_what_is_left(engine, vid, t0):
    for i in range(5):
        engine.reserve(vid, f"u{i}", 1, now=t0 + i, ttl_ms=1_000)
    engine.reserve(vid, "late", 1, now=t0, ttl_ms=TTL)
    res = run(engine, "sweepHolds", vid, [t0 + 5_000, 2, vid, 1000], n_keys=4)
    assert res == [2, 2, t0 + 1_002, 4]
    assert counts(engine, vid) == (6, 4)
    assert run(engine, "sweepHolds", vid, [t0 + 5_000, 100, vid, 1000], n_keys=4) == [3, 3, t0 + TTL, 1]
    assert engine.runner.redis.zscore(keys.sweep_index(vid), str(vid)) == t0 + TTL  # next expiry indexed
    assert run(engine, "sweepHolds", vid, [t0 + 5_000, 100, vid, 1000], n_keys=4) == [0, 0, t0 + TTL, 1]
    assert counts(engine, vid) == (9, 1)


def test_a_variants_one_timer_lapses_at_its_earliest_hold_and_the_sweep_rearms_it(engine, vid, t0,
                                                                                  redis_client, sweeper):
    timer = keys.variant_timer(vid)
    engine.reserve(vid, "first", 1, now=t0, ttl_ms=2_000)
    assert 1_000 < redis_client.pttl(timer) <= 2_000
    engine.reserve(vid, "later", 1, now=t0, ttl_ms=TTL)
    assert redis_client.pttl(timer) <= 2_000  # a later hold does not move it
    engine.reserve(vid, "sooner", 1, now=t0, ttl_ms=1_500)
    assert redis_client.pttl(timer) <= 1_500  # an earlier one does
    assert sweeper.sweep_variants([vid], now=t0 + 2_000).holds == 2
    assert TTL - 2_500 < redis_client.pttl(timer) <= TTL - 2_000 + 100  # armed for "later" now
    engine.release(vid, hold_id_for(vid, "later"), now=t0 + 2_000)
    assert sweeper.sweep_variants([vid], now=t0 + 2_000).holds == 0
    assert redis_client.exists(timer) == 0  # nothing held: no timer


def test_sweep_releases_every_lapsed_hold_of_every_variant_and_nothing_that_is_not_due(engine, sessions, t0, sweeper):
    ids = [make_variant(sessions, on_hand=10) for _ in range(3)]
    for v in ids:
        engine.reserve(v, "a", 2, now=t0, ttl_ms=1_000)
        engine.reserve(v, "b", 3, now=t0, ttl_ms=TTL)
    report = sweeper.sweep(now=t0 + 1_000)
    assert (report.holds, report.units) == (3, 6)
    assert all(counts(engine, v) == (7, 3) for v in ids)
    assert sweeper.sweep(now=t0 + 1_000).holds == 0


def test_sweep_skips_a_locked_lapsed_hold_and_finishes_in_one_round(engine, vid, t0, sweeper):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=1_000)
    lock(engine, vid, "u1", now=t0)
    report = sweeper.sweep(now=t0 + 5_000)
    assert (report.holds, report.variants) == (0, 1)
    assert hold(engine, vid, "u1").state == "locked"
    assert counts(engine, vid) == (7, 3)


def test_sweep_on_the_live_clock_also_finishes_in_one_round_past_a_locked_lapsed_hold(engine, vid, t0, sweeper):
    engine.reserve(vid, "u1", 3, now=t0 - 10_000, ttl_ms=1_000)
    lock(engine, vid, "u1", now=t0 - 10_000)
    engine.reserve(vid, "u2", 2, now=t0 - 10_000, ttl_ms=1_000)
    report = sweeper.sweep()
    assert (report.holds, report.units, report.variants) == (1, 2, 1)
    assert counts(engine, vid) == (7, 3)


# --- reconcile ----------------------------------------------------------------------------------

def reconcile_script(engine, vid, on_hand, version, now, grace=60_000, dry_run=False):
    return run(engine, "reconcileStock", vid, [on_hand, version, now, grace, 1 if dry_run else 0], n_keys=4)


def test_reconcile_script_answers_clean_when_counters_match(engine, vid, t0):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    assert reconcile_script(engine, vid, 10, 0, t0) == [0, 7, 3, 7, 3, t0 + TTL, []]


def test_reconcile_script_repairs_drift_and_a_dry_run_only_reports_it(engine, vid, t0, redis_client):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    redis_client.hincrby(keys.stock(vid), "available", 2)
    redis_client.hincrby(keys.stock(vid), "reserved", -1)
    assert reconcile_script(engine, vid, 10, 0, t0, dry_run=True) == [1, 9, 2, 7, 3, t0 + TTL, []]
    assert counts(engine, vid) == (9, 2)
    assert reconcile_script(engine, vid, 10, 0, t0) == [1, 9, 2, 7, 3, t0 + TTL, []]
    assert counts(engine, vid) == (7, 3)


def test_reconcile_script_reports_missing_counters_and_leaves_building_them_to_init_stock(
        engine, vid, t0, redis_client, reconciler):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    redis_client.delete(keys.stock(vid))
    assert reconcile_script(engine, vid, 10, 2, t0, dry_run=True) == [2, -1, -1, 7, 3, t0 + TTL, []]
    assert reconcile_script(engine, vid, 10, 2, t0) == [2, -1, -1, 7, 3, t0 + TTL, []]
    assert redis_client.exists(keys.stock(vid)) == 0
    report = reconciler.reconcile([vid])  # the engine builds them, from the database, through initStock
    assert report.rebuilt == 1 and report.drifted == 1
    assert counts(engine, vid) == (7, 3)


def test_reconcile_script_skips_a_variant_whose_versions_differ_until_the_mismatch_outlives_grace(
         engine, vid, t0, redis_client):
    engine.counters([vid])
    redis_client.hincrby(keys.stock(vid), "available", 5)  # drift, hidden behind an in-flight change
    assert reconcile_script(engine, vid, 10, 1, t0, grace=1_000)[0] == -1
    assert reconcile_script(engine, vid, 10, 1, t0 + 999, grace=1_000)[0] == -1
    assert counts(engine, vid) == (15, 0)
    assert reconcile_script(engine, vid, 10, 1, t0 + 1_000, grace=1_000)[0] == 1
    assert counts(engine, vid) == (10, 0)
    assert engine.counters([vid])[vid].version == 1
    assert "mm_since" not in stock_hash(redis_client, vid)


def test_reconcile_script_skips_a_variant_with_an_adjustment_half_way_until_grace(engine, vid, t0):
    engine.counters([vid])
    engine.adjust_phase(vid, "begin", -2, now=t0)
    assert reconcile_script(engine, vid, 10, 0, t0 + 999, grace=1_000)[0] == -2
    assert counts(engine, vid) == (8, 0)
    # the adjustment's process died: its database half never happened
    assert reconcile_script(engine, vid, 10, 0, t0 + 1_000, grace=1_000)[0] == 1
    assert counts(engine, vid) == (10, 0)


def test_reconcile_script_reports_stale_locks_and_changes_nothing(engine, vid, t0, redis_client):
    r = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    lock(engine, vid, "u1", token="tok-x", now=t0)
    redis_client.hincrby(keys.stock(vid), "available", 4)
    # a young lock counts as a hold, and the drift beside it is repaired
    assert reconcile_script(engine, vid, 10, 0, t0 + 999, grace=1_000)[0] == 1
    redis_client.hincrby(keys.stock(vid), "available", 4)
    res = reconcile_script(engine, vid, 10, 0, t0 + 1_000, grace=1_000)
    assert res == [-3, 11, 3, 7, 3, t0 + TTL, [r.hold_id, r.gen, "tok-x", "3", "u1"]]
    assert counts(engine, vid) == (11, 3)


# --- one hash slot per script -------------------------------------------------------------------

def test_every_key_the_engine_builds_for_a_variant_carries_its_tag_and_one_slot():
    for vid in (1, 42, 2**31 - 1):
        ks = [*variant_keys(vid), keys.variant_timer(vid)]
        assert len(ks) == 5 and len(set(ks)) == 5
        assert all(f"{{v{vid}}}" in k and k.index("{") == k.index(f"{{v{vid}}}") for k in ks)
        assert {key_slot(k.encode()) for k in ks} == {key_slot(f"{{v{vid}}}".encode())}


MONITOR_DB = 9  # MONITOR sees every client of the server: commands are filtered to this test's own db


@pytest.fixture
def private_container(redis_url, settings):
    """The engine on a database number of its own, emptied before and after."""
    c = Container(dataclasses.replace(settings, redis_url=redis_url.rsplit("/", 1)[0] + f"/{MONITOR_DB}"))
    c.redis.flushdb()
    yield c
    c.redis.flushdb()
    c.close()


@pytest.mark.single_node
def test_every_command_run_inside_a_script_touches_only_the_variants_slot(private_container, vid, t0):
    """Runs every script under MONITOR and asks the server which keys each inner command touched."""
    engine, r = private_container.holds, private_container.redis
    marker = f"end-of-scripts-{t0}"
    seen: list[str] = []
    with redis_lib.Redis(connection_pool=r.connection_pool).monitor() as m:
        engine.reserve(vid, "u1", 2, now=t0, ttl_ms=1_000)
        engine.reserve(vid, "u2", 2, now=t0, ttl_ms=TTL)
        r3 = engine.reserve(vid, "u3", 1, now=t0, ttl_ms=TTL)
        engine.reserve(vid, "u2", 1, mode="set", now=t0, ttl_ms=TTL)
        engine.release(vid, r3.hold_id, now=t0)
        lk = lock(engine, vid, "u2", now=t0)
        engine.unlock_many([(vid, lk.hold_id, lk.gen)], now=t0)
        lk = lock(engine, vid, "u2", now=t0)
        engine.finalize_many([Finalization(vid, lk.hold_id, lk.gen, lk.quantity, "u2", 1)])
        engine.finalize_many([Finalization(vid, hold_id_for(vid, "gone"), "g", 1, "gone", 2)])
        engine.adjust_phase(vid, "begin", -1, now=t0)
        engine.adjust_phase(vid, "abort", -1, now=t0)
        private_container.sweeper.sweep(now=t0 + 2_000)
        private_container.reconciler.reconcile([vid], now=t0 + 2_000)
        run(engine, "initStock", vid, [10, 2, 0], n_keys=4)
        r.echo(marker)
        while True:
            cmd = m.next_command()
            if cmd["client_type"] == "lua" and cmd["db"] == MONITOR_DB:
                seen.append(cmd["command"])
            elif marker in cmd["command"]:
                break
    assert {c.split()[0].upper() for c in seen} >= {
        "HGET", "HSET", "HINCRBY", "HDEL", "ZADD", "ZREM", "ZRANGE", "SET", "DEL", "EXISTS", "HGETALL"}
    slot = key_slot(keys.stock(vid).encode())
    for command in seen:
        touched = r.command_getkeys(*command.split())
        assert touched, command
        assert {key_slot(k.encode()) for k in touched} == {slot}, command


def test_scripts_still_run_after_the_server_forgets_them(engine, vid, t0, redis_client):
    engine.reserve(vid, "u1", 1, now=t0, ttl_ms=TTL)
    redis_client.script_flush()
    assert engine.reserve(vid, "u2", 1, now=t0, ttl_ms=TTL).available == 8
    assert engine.lock_many([(vid, hold_id_for(vid, "u1"))], "t", now=t0)[0].ok
    assert all(redis_client.script_exists(engine.runner.sha[n])[0] for n in ("reserveHold", "lockHold"))


def test_concurrent_locks_of_one_hold_by_eight_checkouts_let_exactly_one_win(engine, vid, t0):
    engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    barrier = threading.Barrier(8)
    results = []

    def attempt(i):
        barrier.wait()
        results.append(lock(engine, vid, "u1", token=f"tok-{i}", now=t0))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.ok for r in results) == 1
    assert sorted(r.reason for r in results if not r.ok) == ["locked"] * 7
