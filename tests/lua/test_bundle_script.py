"""lua/reserveBundle-0.lua on a real Redis, and the engine around it (app/engine/bundles.py).

The script's own calls put lines of one hash slot together, as the engine does on a cluster: the
variant ids of SAME_SLOT hash to one slot, so these run unchanged on --redis-cluster. Their counters
are written here directly (the script needs no database); the engine's tests use variants of the
database. Time is passed in, never slept through.
"""
from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from app import clock, keys
from app.engine.bundles import Bundles
from app.engine.holdrec import hold_id_for, unpack_hold
from app.errors import InsufficientStock
from tests.factories import make_variant

TTL = 60_000
SAME_SLOT = (116, 1672, 4100)  # three variant ids whose keys share one hash slot
REFERENCE = (9001, 9002, 9003)  # variants that reserveHold serves the same stories on


@pytest.fixture
def t0() -> int:
    return clock.now_ms()


@pytest.fixture
def holds(container):
    return container.holds


@pytest.fixture
def runner(container):
    return container.runner


def test_the_same_slot_ids_do_share_a_slot():
    assert len({keys.variant_slot(v) for v in SAME_SLOT}) == 1


def seed(redis_client, vid, available=10):
    redis_client.hset(keys.stock(vid), mapping={"available": available, "reserved": 0, "version": 0})


def call(holds, op, bid, user, lines, now, *, ttl=TTL, limit=0, gens=None):
    """One reserveBundle call: lines are (variant_id, quantity), all of one slot."""
    slot = keys.variant_slot(lines[0][0])
    ks, args = [keys.bundle_journal(slot, bid)], [op, now, ttl, user, limit]
    for i, (vid, qty) in enumerate(lines):
        ks += holds.indexed_keys(vid)
        args += [hold_id_for(vid, user), qty, (gens or {}).get(vid, f"g{i}")]
    return holds.runner.call("reserveBundle", ks, args)


def reserve_hold(holds, vid, user, qty, now, *, ttl=TTL, limit=0, gen="g"):
    return holds.runner.call("reserveHold", holds.indexed_keys(vid),
                             [hold_id_for(vid, user), qty, now, ttl, user, "add", limit, gen])


def state(redis_client, vid) -> dict:
    """Everything a reserve writes for a variant, with the variant's id taken out of the hold ids."""
    def strip(hid):
        return hid.split("~", 1)[1]

    records = {strip(k): unpack_hold(v) for k, v in redis_client.hgetall(keys.holds(vid)).items()}
    return {
        "stock": redis_client.hgetall(keys.stock(vid)),
        "holds": {u: (h.quantity, h.expires_ms, h.state, h.user, h.token, h.locked_ms) for u, h in records.items()},
        "gens": {u: h.gen for u, h in records.items()},
        "hexp": {strip(m): s for m, s in redis_client.zrange(keys.hold_expiry(vid), 0, -1, withscores=True)},
        "cust": redis_client.hgetall(keys.customer_units(vid)),
        "indexed": redis_client.zscore(keys.sweep_index(vid), str(vid)),
        "timer": redis_client.exists(keys.variant_timer(vid)),
    }


def test_each_line_is_reserved_exactly_as_reserve_hold_adds_it(holds, redis_client, t0):
    fresh, merged, short = SAME_SLOT
    ref_fresh, ref_merged, ref_short = REFERENCE
    for vid in SAME_SLOT + REFERENCE:
        seed(redis_client, vid)
    # the same three stories on both sides: a fresh hold; a live hold of the customer's own to
    # merge into; stock short until another customer's lapsed hold is reclaimed
    for vid in (merged, ref_merged):
        reserve_hold(holds, vid, "ann", 2, t0, limit=5, gen="old")
    for vid in (short, ref_short):
        reserve_hold(holds, vid, "zed", 8, t0 - 2 * TTL, gen="zz")
    now = t0 + 1_000
    res = call(holds, "reserve", "b1", "ann", [(fresh, 3), (merged, 3), (short, 4)], now, limit=5,
               gens={fresh: "n1", merged: "n2", short: "n3"})
    refs = [reserve_hold(holds, ref_fresh, "ann", 3, now, limit=5, gen="n1"),
            reserve_hold(holds, ref_merged, "ann", 3, now, limit=5, gen="n2"),
            reserve_hold(holds, ref_short, "ann", 4, now, limit=5, gen="n3")]
    assert res[0] == 1
    assert [res[1 + 5 * i: 6 + 5 * i] for i in range(3)] == [r[1:] for r in refs]
    assert refs[1][1:5] == [5, 5, now + TTL, "old"]  # merged: 2 + 3, renewed, the hold's own gen
    for vid, ref in zip(SAME_SLOT, REFERENCE):
        assert state(redis_client, vid) == state(redis_client, ref), vid


def test_a_refused_line_leaves_every_line_of_its_call_as_it_was(holds, redis_client, t0):
    a, b, c = SAME_SLOT
    for vid in SAME_SLOT:
        seed(redis_client, vid, available=3)
    reserve_hold(holds, a, "bob", 1, t0)
    before = {vid: state(redis_client, vid) for vid in SAME_SLOT}
    res = call(holds, "reserve", "b2", "bob", [(a, 2), (b, 3), (c, 4)], t0 + 1)
    assert res == [-2, 3, 3]
    assert {vid: state(redis_client, vid) for vid in SAME_SLOT} == before
    assert redis_client.exists(keys.bundle_journal(keys.variant_slot(a), "b2")) == 0


def test_the_limit_a_locked_hold_and_missing_counters_refuse_the_call_naming_the_line(holds, redis_client, t0):
    a, b, c = SAME_SLOT
    seed(redis_client, a)
    seed(redis_client, b)
    before = {vid: state(redis_client, vid) for vid in SAME_SLOT}
    assert call(holds, "reserve", "b3", "cy", [(a, 1), (b, 1), (c, 1)], t0) == [-1, 3]
    assert {vid: state(redis_client, vid) for vid in SAME_SLOT} == before
    seed(redis_client, c)
    reserve_hold(holds, b, "cy", 2, t0, limit=3)
    assert call(holds, "reserve", "b3", "cy", [(a, 1), (b, 2)], t0, limit=3) == [-3, 2, 2]
    assert holds.lock_many([(c, hold_id_for(c, "cy"))], "tok", now=t0)[0].ok is False  # no hold yet
    reserve_hold(holds, c, "cy", 1, t0)
    assert holds.lock_many([(c, hold_id_for(c, "cy"))], "tok", now=t0)[0].ok
    assert call(holds, "reserve", "b3", "cy", [(a, 1), (c, 1)], t0) == [-4, 2]
    assert state(redis_client, a)["holds"] == {}
    assert redis_client.hget(keys.stock(a), "available") == "10"


@pytest.mark.parametrize("lines, message", [
    ([(116, 1), (116, 2)], "twice"),
    ([(116, 0)], "whole number"),
    ([(116, "1.5")], "whole number"),
])
def test_a_variant_twice_or_a_quantity_below_one_is_an_error_reply(holds, redis_client, t0, lines, message):
    seed(redis_client, 116)
    with pytest.raises(ResponseError, match=message):
        call(holds, "reserve", "b4", "di", lines, t0)
    assert state(redis_client, 116)["holds"] == {}


def test_undo_restores_a_merged_hold_as_it_was_and_removes_a_fresh_one(holds, redis_client, t0):
    merged, fresh, _ = SAME_SLOT
    seed(redis_client, merged)
    seed(redis_client, fresh)
    reserve_hold(holds, merged, "eve", 2, t0, limit=9, gen="mine")
    before = {vid: state(redis_client, vid) for vid in (merged, fresh)}
    lines = [(merged, 3), (fresh, 4)]
    assert call(holds, "reserve", "b5", "eve", lines, t0 + 1_000, limit=9)[0] == 1
    assert redis_client.hget(keys.stock(merged), "reserved") == "5"
    assert call(holds, "undo", "b5", "eve", lines, t0 + 2_000) == [7, 2, 0]
    assert {vid: state(redis_client, vid) for vid in (merged, fresh)} == {
        merged: before[merged], fresh: {**before[fresh], "stock": {**before[fresh]["stock"], "idx_exp": str(
            t0 + 1_000 + TTL)}, "indexed": t0 + 1_000 + TTL, "timer": 1}}
    assert redis_client.exists(keys.bundle_journal(keys.variant_slot(merged), "b5")) == 0
    assert call(holds, "undo", "b5", "eve", lines, t0 + 3_000) == [0, 0, 0]  # idempotent


def test_undo_after_the_customer_changed_the_hold_gives_back_only_the_bundles_units(holds, redis_client, t0):
    vid = SAME_SLOT[0]
    seed(redis_client, vid)
    call(holds, "reserve", "b6", "fay", [(vid, 3)], t0)
    reserve_hold(holds, vid, "fay", 2, t0 + 500)  # the customer's own add merges in: 5, renewed
    assert call(holds, "undo", "b6", "fay", [(vid, 3)], t0 + 1_000) == [3, 1, 0]
    after = state(redis_client, vid)
    assert after["holds"]["fay"][:2] == (2, t0 + 500 + TTL)
    assert after["stock"]["available"] == "8" and after["stock"]["reserved"] == "2"


def test_undo_leaves_a_hold_a_checkout_has_locked_and_drops_one_whose_old_time_has_passed(holds, redis_client,
                                                                                         t0):
    locked, lapsed, _ = SAME_SLOT
    seed(redis_client, locked)
    seed(redis_client, lapsed)
    reserve_hold(holds, lapsed, "gus", 2, t0, ttl=1_000)
    call(holds, "reserve", "b7", "gus", [(locked, 3), (lapsed, 3)], t0 + 500)
    assert holds.lock_many([(locked, hold_id_for(locked, "gus"))], "tok", now=t0 + 600)[0].ok
    # at t0 + 2000 the lapsed line's hold, put back as it was, would have lapsed: it is dropped whole
    assert call(holds, "undo", "b7", "gus", [(locked, 3), (lapsed, 3)], t0 + 2_000) == [5, 1, 1]
    assert state(redis_client, locked)["holds"]["gus"][:3] == (3, t0 + 500 + TTL, "locked")
    assert state(redis_client, lapsed)["holds"] == {}
    assert redis_client.hmget(keys.stock(lapsed), "available", "reserved") == ["10", "0"]
    journal = keys.bundle_journal(keys.variant_slot(locked), "b7")
    assert list(redis_client.hgetall(journal)) == [hold_id_for(locked, "gus")]  # kept for the locked line


def test_the_journal_lapses_with_the_holds(holds, redis_client, t0):
    vid = SAME_SLOT[0]
    seed(redis_client, vid)
    call(holds, "reserve", "b8", "hal", [(vid, 1)], t0, ttl=5_000)
    assert 0 < redis_client.pttl(keys.bundle_journal(keys.variant_slot(vid), "b8")) <= 5_000


# --- the engine ------------------------------------------------------------------------------------

@pytest.fixture
def three(container):
    """Three variants of the database on distinct slots, sorted by slot."""
    vids = [make_variant(container.sessions, on_hand=10) for _ in range(3)]
    assert len({keys.variant_slot(v) for v in vids}) == 3
    return sorted(vids, key=keys.variant_slot)


def test_on_one_redis_a_bundle_is_one_call_and_on_a_cluster_one_call_per_slot_in_slot_order(container, three,
                                                                                             cluster_mode):
    bundles = Bundles(container.runner, container.holds, container.settings)
    sent = [three[2], three[0], three[1]]
    groups = bundles.groups(sent)
    if cluster_mode:
        assert groups == [(keys.variant_slot(three[0]), [1]), (keys.variant_slot(three[1]), [2]),
                          (keys.variant_slot(three[2]), [0])]
    else:
        assert groups == [(keys.variant_slot(three[0]), [0, 1, 2])]


def test_a_slot_refused_after_others_were_taken_gives_those_back_at_once(container, three, redis_client):
    bundles = Bundles(container.runner, container.holds, container.settings)
    bundles.cluster = True  # one call per slot, as on a cluster (a single Redis runs them alike)
    a, b, c = three
    container.holds.reserve(c, "rival", 9)
    with pytest.raises(InsufficientStock) as info:
        bundles.reserve("b9", "ida", [(a, 2), (b, 2), (c, 2)])
    assert info.value.details == {"variant_id": c, "available": 1, "requested": 2}
    counters = container.holds.counters(three)
    assert [(counters[v].available, counters[v].reserved) for v in three] == [(10, 0), (10, 0), (1, 9)]
    assert all(redis_client.exists(keys.bundle_journal(keys.variant_slot(v), "b9")) == 0 for v in three)
    assert all(container.holds.holds([(v, hold_id_for(v, "ida"))])[0] is None for v in three)


def test_missing_counters_are_built_from_the_database_before_the_bundle_is_reserved(container, three, redis_client):
    bundles = Bundles(container.runner, container.holds, container.settings)
    assert not any(redis_client.exists(keys.stock(v)) for v in three)
    out = bundles.reserve("b10", "jo", [(v, 4) for v in three])
    assert [(r.variant_id, r.quantity, r.available) for r in out] == [(v, 4, 6) for v in three]
    assert all(redis_client.hget(keys.stock(v), "reserved") == "4" for v in three)
