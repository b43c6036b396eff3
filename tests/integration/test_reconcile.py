"""The reconciler against a real Redis and database: drift found and repaired, the windows of
DESIGN.md opened on purpose, Redis coming back empty, and reconciling while shoppers keep going.
"""
from __future__ import annotations

import random
import threading
import time
from decimal import Decimal

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from app import clock, keys
from app.cli import main as cli
from app.errors import InsufficientStock, NotFound, StockBelowReserved
from app.engine.holdrec import hold_id_for
from app.engine.holds import Finalization
from persistence.models import Order, Stock
from tests.factories import make_variant, on_hand

TTL = 600_000


def counts(engine, vid) -> tuple[int, int]:
    c = engine.counters([vid])[vid]
    return c.available, c.reserved


def db_version(sessions, vid) -> int:
    with sessions() as s:
        return s.get(Stock, vid).version


def assert_invariant(engine, sessions, redis_client, vid) -> dict[str, int]:
    c = engine.counters([vid])[vid]
    ids = redis_client.hkeys(keys.holds(vid))
    holds = {hid: h.quantity for hid, h in zip(ids, engine.holds([(vid, hid) for hid in ids])) if h}
    assert c.available >= 0
    assert c.available + c.reserved == on_hand(sessions, vid)
    assert c.reserved == sum(holds.values())
    assert c.version == db_version(sessions, vid)
    return holds


def order_commits(sessions, vid, qty, token, user="u1", with_order=True) -> int:
    """Checkout step 2 alone: the order and on_hand -= qty, version += 1; returns the new version."""
    with sessions.begin() as s:
        s.execute(update(Stock).where(Stock.variant_id == vid)
                  .values(on_hand=Stock.on_hand - qty, version=Stock.version + 1))
        if with_order:
            s.add(Order(user_id=user, total=Decimal("10.00"), currency="USD", checkout_token=token))
        return s.scalar(select(Stock.version).where(Stock.variant_id == vid))


@pytest.fixture
def engine(container):
    return container.holds


@pytest.fixture
def reconciler(container):
    return container.reconciler


@pytest.fixture
def two_drifted(engine, sessions, redis_client):
    """Two variants with holds; `available` of each pushed 3 too high behind the engine's back."""
    a, b = make_variant(sessions, on_hand=10), make_variant(sessions, on_hand=10)
    for vid in (a, b):
        engine.reserve(vid, "u1", 2, ttl_ms=TTL)
        redis_client.hincrby(keys.stock(vid), "available", 3)
    return a, b


# --- drift --------------------------------------------------------------------------------------

def test_drift_injected_into_the_counters_is_found_and_repaired(engine, sessions, redis_client, reconciler):
    clean, drifted = make_variant(sessions, on_hand=10), make_variant(sessions, on_hand=10)
    for vid in (clean, drifted):
        engine.reserve(vid, "u1", 2, ttl_ms=TTL)
    redis_client.hincrby(keys.stock(drifted), "available", 3)
    redis_client.hincrby(keys.stock(drifted), "reserved", 1)
    report = reconciler.reconcile()
    assert (report.checked, report.drifted, report.repaired, report.skipped) == (2, 1, 1, 0)
    assert sorted(report.rows, key=lambda r: r["field"]) == [
        {"variant_id": drifted, "field": "available", "expected": 8, "actual": 11},
        {"variant_id": drifted, "field": "reserved", "expected": 2, "actual": 3},
    ]
    assert counts(engine, drifted) == (8, 2)
    assert_invariant(engine, sessions, redis_client, drifted)
    assert reconciler.reconcile().drifted == 0


def test_a_dry_run_reports_the_drift_and_repairs_nothing(engine, two_drifted, reconciler):
    a, b = two_drifted
    report = reconciler.reconcile(dry_run=True)
    assert (report.checked, report.drifted, report.repaired) == (2, 2, 0)
    assert {(r["variant_id"], r["field"], r["expected"], r["actual"]) for r in report.rows} == {
        (a, "available", 8, 11), (b, "available", 8, 11)}
    assert counts(engine, a) == counts(engine, b) == (11, 2)
    assert reconciler.reconcile(dry_run=True).drifted == 2


def test_reconciling_given_variants_leaves_the_others_alone(engine, two_drifted, reconciler):
    a, b = two_drifted
    report = reconciler.reconcile([a])
    assert (report.checked, report.repaired) == (1, 1)
    assert counts(engine, a) == (8, 2)
    assert counts(engine, b) == (11, 2)


def test_reconciling_an_unknown_variant_is_refused(engine, two_drifted, reconciler):
    with pytest.raises(NotFound):
        reconciler.reconcile([two_drifted[0], 999_999])


def test_counters_missing_from_redis_are_rebuilt_by_the_reconciler_and_a_dry_run_only_reports(
         engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    engine.reserve(vid, "u1", 4, ttl_ms=TTL)
    redis_client.delete(keys.stock(vid))
    dry = reconciler.reconcile([vid], dry_run=True)
    assert (dry.drifted, dry.repaired) == (1, 0)
    assert {r["field"]: (r["expected"], r["actual"]) for r in dry.rows} == {"available": (6, None),
                                                                           "reserved": (4, None)}
    assert redis_client.exists(keys.stock(vid)) == 0
    assert reconciler.reconcile([vid]).repaired == 1
    assert counts(engine, vid) == (6, 4)


# --- command line and HTTP ------------------------------------------------------------------------

@pytest.fixture
def cli_env(env, settings, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_the_reconcile_command_repairs_drift_and_prints_a_table(engine, two_drifted, cli_env):
    a, b = two_drifted
    result = CliRunner().invoke(cli, ["reconcile"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["variant", "field", "expected", "actual"]
    assert {tuple(line.split()) for line in lines[1:3]} == {(str(a), "available", "8", "11"),
                                                          (str(b), "available", "8", "11")}
    assert "checked 2, drifted 2, repaired 2" in lines[-1]
    assert counts(engine, a) == counts(engine, b) == (8, 2)


def test_the_reconcile_command_in_a_dry_run_for_one_variant_changes_nothing(engine, two_drifted, cli_env):
    a, b = two_drifted
    result = CliRunner().invoke(cli, ["reconcile", "--dry-run", "--variant", str(a)])
    assert result.exit_code == 0, result.output
    assert f"{a}" in result.stdout and f"{b}  " not in result.stdout
    assert "checked 1, drifted 1, would repair 1" in result.stdout
    assert counts(engine, a) == counts(engine, b) == (11, 2)


def test_the_reconcile_command_on_clean_counters_prints_no_table(engine, sessions, cli_env):
    engine.counters([make_variant(sessions, on_hand=3)])
    result = CliRunner().invoke(cli, ["reconcile"])
    assert result.exit_code == 0, result.output
    assert "variant" not in result.stdout
    assert "checked 1, drifted 0, repaired 0" in result.stdout


def test_post_reconcile_in_a_dry_run_reports_and_without_it_repairs(client, engine, two_drifted):
    a, b = two_drifted
    dry = client.post("/api/ops/reconcile/", json={"dry_run": True})
    assert dry.status_code == 200, dry.get_json()
    body = dry.get_json()
    assert (body["checked"], body["drifted"], body["repaired"]) == (2, 2, 0)
    assert {"variant_id": a, "field": "available", "expected": 8, "actual": 11} in body["rows"]
    assert counts(engine, a) == (11, 2)

    one = client.post("/api/ops/reconcile/", json={"variant_ids": [a]}).get_json()
    assert (one["checked"], one["repaired"]) == (1, 1)
    assert counts(engine, a) == (8, 2) and counts(engine, b) == (11, 2)

    everything = client.post("/api/ops/reconcile/")
    assert everything.status_code == 200, everything.get_json()
    assert (everything.get_json()["drifted"], everything.get_json()["repaired"]) == (1, 1)
    assert counts(engine, b) == (8, 2)


def test_post_reconcile_refuses_a_dry_run_that_is_not_a_boolean(client, two_drifted, engine):
    response = client.post("/api/ops/reconcile/", json={"dry_run": "yes"})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "validation_error"
    assert counts(engine, two_drifted[0]) == (11, 2)


# --- the windows of DESIGN.md ---------------------------------------------------------------------

def test_between_the_order_commit_and_finalize_the_reconciler_does_not_count_the_units_twice(
         engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    r = engine.reserve(vid, "u1", 3, ttl_ms=TTL)
    locked = engine.lock_many([(vid, r.hold_id)], "tok-a")[0]
    new_version = order_commits(sessions, vid, 3, "tok-a")
    assert on_hand(sessions, vid) == 7

    report = reconciler.reconcile()
    assert (report.skipped, report.drifted, report.locks_finalized) == (1, 0, 0)
    assert counts(engine, vid) == (7, 3)  # untouched: not repaired to 7 - 3 = 4

    assert engine.finalize_many([Finalization(vid, r.hold_id, locked.gen, 3, "u1", new_version)]) == [1]
    report = reconciler.reconcile()
    assert (report.skipped, report.drifted) == (0, 0)
    assert counts(engine, vid) == (7, 0)
    assert_invariant(engine, sessions, redis_client, vid)


def test_while_an_adjustment_is_half_way_the_reconciler_skips_the_variant(engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    engine.reserve(vid, "u1", 2, ttl_ms=TTL)
    engine.adjust_phase(vid, "begin", -3)  # Redis half done, database not yet
    report = reconciler.reconcile()
    assert (report.skipped, report.drifted, report.skipped_ids) == (1, 0, [vid])
    assert counts(engine, vid) == (5, 2)  # not "repaired" back to 8 from the old on_hand

    with sessions.begin() as s:
        s.execute(update(Stock).where(Stock.variant_id == vid)
                  .values(on_hand=Stock.on_hand - 3, version=Stock.version + 1))
    assert reconciler.reconcile().skipped == 1  # database done, Redis commit not yet
    engine.adjust_phase(vid, "commit", -3)
    report = reconciler.reconcile()
    assert (report.skipped, report.drifted) == (0, 0)
    assert_invariant(engine, sessions, redis_client, vid)


def test_an_adjustment_that_died_half_way_is_repaired_once_it_is_older_than_grace(
        engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    t0 = clock.now_ms()
    engine.adjust_phase(vid, "begin", 5, now=t0)
    with sessions.begin() as s:  # the database half committed, then the process died
        s.execute(update(Stock).where(Stock.variant_id == vid).values(on_hand=15, version=1))
    assert reconciler.reconcile(now=t0 + 1_000, grace_ms=5_000).skipped == 1
    report = reconciler.reconcile(now=t0 + 5_000, grace_ms=5_000)
    assert (report.skipped, report.repaired) == (0, 1)
    assert redis_client.hget(keys.stock(vid), "adj_pending") == "0"
    assert_invariant(engine, sessions, redis_client, vid)
    assert counts(engine, vid) == (15, 0)


def test_a_stale_lock_whose_order_exists_is_finalized_by_the_reconciler(engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    r = engine.reserve(vid, "u1", 3, ttl_ms=TTL)
    engine.reserve(vid, "u2", 1, ttl_ms=TTL)
    assert engine.lock_many([(vid, r.hold_id)], "tok-crashed")[0].ok
    order_commits(sessions, vid, 3, "tok-crashed")  # ... and the checkout died before finalizing

    report = reconciler.reconcile(grace_ms=0)
    assert (report.locks_finalized, report.locks_released, report.drifted, report.skipped) == (1, 0, 0, 0)
    assert engine.holds([(vid, r.hold_id)]) == [None]
    assert counts(engine, vid) == (6, 1)
    assert_invariant(engine, sessions, redis_client, vid)


def test_a_stale_lock_with_no_order_is_unlocked_and_one_that_lapsed_meanwhile_released(
        engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    t0 = clock.now_ms()
    kept = engine.reserve(vid, "u1", 3, now=t0, ttl_ms=TTL)
    lapsing = engine.reserve(vid, "u2", 2, now=t0, ttl_ms=1_000)
    engine.lock_many([(vid, kept.hold_id), (vid, lapsing.hold_id)], "tok-never-committed", now=t0)

    assert reconciler.reconcile(now=t0 + 999, grace_ms=1_000).locks_released == 0  # not stale yet
    report = reconciler.reconcile(now=t0 + 1_000, grace_ms=1_000)
    assert (report.locks_finalized, report.locks_released, report.drifted) == (0, 2, 0)
    h = engine.holds([(vid, kept.hold_id)])[0]
    assert (h.state, h.quantity) == ("held", 3)
    assert engine.holds([(vid, lapsing.hold_id)]) == [None]
    assert counts(engine, vid) == (7, 3)
    assert_invariant(engine, sessions, redis_client, vid)


def test_a_dry_run_resolves_no_stale_lock(engine, sessions, reconciler):
    vid = make_variant(sessions, on_hand=10)
    r = engine.reserve(vid, "u1", 3, ttl_ms=TTL)
    engine.lock_many([(vid, r.hold_id)], "tok-x")
    order_commits(sessions, vid, 3, "tok-x")
    report = reconciler.reconcile(dry_run=True, grace_ms=0)
    assert (report.locks_finalized, report.skipped) == (0, 1)
    assert engine.holds([(vid, r.hold_id)])[0].state == "locked"


def test_an_order_whose_hold_vanished_is_taken_from_available_and_reconciles_clean(
        engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    r = engine.reserve(vid, "u1", 3, ttl_ms=TTL)
    locked = engine.lock_many([(vid, r.hold_id)], "tok-a")[0]
    new_version = order_commits(sessions, vid, 3, "tok-a")
    redis_client.hdel(keys.holds(vid), r.hold_id)  # lost between lock and finalize
    redis_client.hincrby(keys.stock(vid), "reserved", -3)
    redis_client.hincrby(keys.stock(vid), "available", 3)
    assert engine.finalize_many([Finalization(vid, r.hold_id, locked.gen, 3, "u1", new_version)]) == [2]
    assert reconciler.reconcile().drifted == 0
    assert counts(engine, vid) == (7, 0)
    assert_invariant(engine, sessions, redis_client, vid)


# --- Redis comes back empty -------------------------------------------------------------------------

def test_after_redis_is_flushed_counters_rebuild_from_the_database_and_no_unit_sells_twice(
         engine, sessions, redis_client, reconciler):
    vid, other = make_variant(sessions, on_hand=6), make_variant(sessions, on_hand=4)
    for i in range(3):
        engine.reserve(vid, f"u{i}", 2, ttl_ms=TTL)
    engine.reserve(other, "u1", 4, ttl_ms=TTL)
    assert counts(engine, vid) == (0, 6)

    redis_client.flushdb()
    c = engine.counters([vid])[vid]
    assert (c.available, c.reserved, c.active_holds) == (6, 0, 0)  # the holds went with the data
    for i in range(6):
        engine.reserve(vid, f"buyer-{i}", 1, ttl_ms=TTL)
    with pytest.raises(InsufficientStock):
        engine.reserve(vid, "one-too-many", 1, ttl_ms=TTL)
    assert counts(engine, vid) == (0, 6)

    # the first use of the other variant after the flush is a reserve, not a read
    assert engine.reserve(other, "u9", 4, ttl_ms=TTL).available == 0
    with pytest.raises(InsufficientStock):
        engine.reserve(other, "u10", 1, ttl_ms=TTL)
    for v in (vid, other):
        assert_invariant(engine, sessions, redis_client, v)
    assert reconciler.reconcile().drifted == 0


def test_a_hold_from_before_the_flush_cannot_be_checked_out(engine, sessions):
    vid = make_variant(sessions, on_hand=5)
    r = engine.reserve(vid, "u1", 2, ttl_ms=TTL)
    engine.runner.redis.flushdb()
    res = engine.lock_many([(vid, r.hold_id)], "tok")[0]
    assert (res.ok, res.reason) == (False, "missing")
    assert counts(engine, vid) == (5, 0)


# --- reconciling while shoppers keep going -----------------------------------------------------------

def test_reconciling_in_a_loop_during_a_storm_of_reserves_checkouts_and_adjustments_changes_nothing(
        container, engine, sessions, redis_client, reconciler):
    vids = [make_variant(sessions, on_hand=30), make_variant(sessions, on_hand=30)]
    engine.counters(vids)
    stop = threading.Event()
    expected: dict[int, dict[str, dict[str, int]]] = {}
    reports = []
    errors: list[BaseException] = []

    def shopper(n):
        rng = random.Random(n)
        held = expected.setdefault(n, {})
        users = [f"t{n}-u{k}" for k in range(3)]
        try:
            while not stop.is_set():
                vid, user = rng.choice(vids), rng.choice(users)
                hid = hold_id_for(vid, user)
                if rng.random() < 0.6:
                    try:
                        held[hid] = engine.reserve(vid, user, rng.randint(1, 3), ttl_ms=TTL).quantity
                    except InsufficientStock:
                        pass
                else:
                    assert engine.release(vid, hid) == held.pop(hid, 0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def adjuster():
        rng = random.Random(99)
        try:
            while not stop.is_set():
                try:
                    container.inventory.adjust(rng.choice(vids), rng.choice((1, -1)), "count", "test")
                except StockBelowReserved:
                    pass
        except BaseException as exc:
            errors.append(exc)

    def checkout():
        """Reserve, lock, commit the order in the database, finalize: a checkout with nothing in between."""
        rng = random.Random(7)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                vid, qty, token = rng.choice(vids), rng.randint(1, 2), f"tok-{n}"
                try:
                    r = engine.reserve(vid, f"buyer-{n}", qty, ttl_ms=TTL)
                except InsufficientStock:
                    continue
                locked = engine.lock_many([(vid, r.hold_id)], token)[0]
                assert locked.ok, locked
                new_version = order_commits(sessions, vid, qty, token, user=f"buyer-{n}")
                assert engine.finalize_many([Finalization(vid, r.hold_id, locked.gen, qty, locked.user,
                                                          new_version)]) == [1]
                orders.append(qty)
        except BaseException as exc:
            errors.append(exc)

    def reconcile_loop():
        try:
            while not stop.is_set():
                reports.append(reconciler.reconcile())
        except BaseException as exc:
            errors.append(exc)

    orders: list[int] = []
    threads = [threading.Thread(target=shopper, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=adjuster), threading.Thread(target=checkout),
                threading.Thread(target=reconcile_loop)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the storm's length, not a wait for a condition
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(reports) > 5 and len(orders) > 5
    with sessions() as s:
        assert len(s.scalars(select(Order)).all()) == len(orders)
    assert sum(r.drifted for r in reports) == 0, [r.rows for r in reports if r.drifted]  # rows, to tell the race
    assert sum(r.checked for r in reports) > sum(r.skipped for r in reports)

    for vid in vids:
        holds = assert_invariant(engine, sessions, redis_client, vid)
        assert holds == {hid: q for per in expected.values() for hid, q in per.items()
                         if hid.startswith(f"{vid}~")}
    final = reconciler.reconcile()
    assert (final.drifted, final.skipped) == (0, 0)


# --- holds a failover lost: reported through the cart lines they leave ----------------------------

def lost_metric() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("inventory_holds_lost_total") or 0.0


def cart_add(client, user, vid, qty) -> dict:
    response = client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid, "quantity": qty})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["item"]


def lose_hold(redis_client, vid, item_id, qty, *, with_counters: bool = True) -> None:
    """What a promoted replica that never got the reserve looks like: no hold, and (with_counters)
    counters as before it; without them, the counters still count the hold (drift to repair)."""
    assert redis_client.hdel(keys.holds(vid), item_id) == 1
    redis_client.zrem(keys.hold_expiry(vid), item_id)
    if with_counters:
        redis_client.hincrby(keys.stock(vid), "reserved", -qty)
        redis_client.hincrby(keys.stock(vid), "available", qty)
        redis_client.hincrby(keys.customer_units(vid), item_id.split("~", 1)[1], -qty)


def test_a_hold_lost_behind_its_cart_line_is_reported_once_and_its_checkout_is_410(
        client, engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    lost = cart_add(client, "u1", vid, 3)
    kept = cart_add(client, "u2", vid, 2)
    lose_hold(redis_client, vid, lost["id"], 3, with_counters=False)  # counters still count it: drift too
    before = lost_metric()

    report = reconciler.reconcile()
    assert (report.lost_holds, report.lost_hold_ids) == (1, [lost["id"]])
    assert report.as_dict()["lost_holds"] == 1
    assert lost_metric() - before == 1
    assert (report.drifted, report.repaired) == (1, 1)
    assert counts(engine, vid) == (8, 2)
    assert_invariant(engine, sessions, redis_client, vid)

    item = client.get("/api/cart/u1/").get_json()["items"][0]
    assert (item["id"], item["status"]) == (lost["id"], "expired")
    response = client.post("/api/cart/u1/checkout/")
    assert response.status_code == 410
    body = response.get_json()
    assert body["error"]["code"] == "reservation_expired"
    assert lost["id"] in str(body)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Order)) == 0

    again = reconciler.reconcile()
    assert (again.lost_holds, again.drifted) == (0, 0)
    assert lost_metric() - before == 1
    assert client.post("/api/cart/u2/checkout/").status_code == 201  # the surviving hold sells
    assert counts(engine, vid) == (8, 0)
    assert on_hand(sessions, vid) == 8
    assert reconciler.reconcile().lost_holds == 0
    assert kept["status"] == "held"


def test_a_dry_run_reports_lost_holds_without_marking_them(client, engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    items = [cart_add(client, f"u{i}", vid, 1)["id"] for i in range(3)]
    for item_id in items[:2]:
        lose_hold(redis_client, vid, item_id, 1)
    before = lost_metric()
    for _ in range(2):
        dry = reconciler.reconcile(dry_run=True)
        assert (dry.lost_holds, dry.lost_hold_ids, dry.drifted) == (2, sorted(items[:2]), 0)
    assert lost_metric() == before
    assert reconciler.reconcile(variant_ids=[make_variant(sessions)]).lost_holds == 0  # another variant's only
    assert reconciler.reconcile().lost_holds == 2
    assert reconciler.reconcile().lost_holds == 0
    assert lost_metric() - before == 2
    assert counts(engine, vid) == (9, 1)
    assert_invariant(engine, sessions, redis_client, vid)


def test_lapsed_removed_and_checked_out_lines_are_not_reported_lost(
        client, engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    lapsing = cart_add(client, "u1", vid, 1)
    cart_add(client, "u2", vid, 1)
    removed = cart_add(client, "u3", vid, 1)
    assert client.delete(f"/api/cart/{removed['id']}/").status_code in (200, 204)
    assert client.post("/api/cart/u2/checkout/").status_code == 201
    before = lost_metric()

    (line,) = reconciler.carts.lines("u1")
    assert line.item_id == lapsing["id"]
    report = reconciler.reconcile(now=line.expires_ms + 1)  # u1's hold lapsed (and is released by this pass)
    assert report.lost_holds == 0
    assert reconciler.reconcile().lost_holds == 0
    assert lost_metric() == before
    assert_invariant(engine, sessions, redis_client, vid)


def test_a_checkout_that_stopped_after_finalizing_leaves_a_line_that_is_cleared_not_reported(
        client, engine, sessions, redis_client, reconciler):
    from app import faults

    vid = make_variant(sessions, on_hand=10)
    item = cart_add(client, "u1", vid, 2)

    def die():
        raise faults.SimulatedCrash("after finalize")

    faults.inject("checkout.after_finalize", die)
    try:
        with pytest.raises(faults.SimulatedCrash):
            client.post("/api/cart/u1/checkout/")
    finally:
        faults.clear()
    assert redis_client.hexists(keys.cart("u1"), item["id"])  # the line outlived its sold hold
    report = reconciler.reconcile()
    assert (report.lost_holds, report.drifted) == (0, 0)
    assert not redis_client.hexists(keys.cart("u1"), item["id"])
    assert counts(engine, vid) == (8, 0)
    assert_invariant(engine, sessions, redis_client, vid)


def test_post_reconcile_carries_the_lost_holds(client, engine, sessions, redis_client):
    vid = make_variant(sessions, on_hand=4)
    item = cart_add(client, "u1", vid, 1)
    lose_hold(redis_client, vid, item["id"], 1)
    body = client.post("/api/ops/reconcile/", json={"dry_run": True}).get_json()
    assert (body["lost_holds"], body["lost_hold_ids"]) == (1, [item["id"]])
    body = client.post("/api/ops/reconcile/", json={}).get_json()
    assert (body["lost_holds"], body["lost_hold_ids"], body["drifted"]) == (1, [item["id"]], 0)
    assert client.post("/api/ops/reconcile/", json={}).get_json()["lost_holds"] == 0


def test_a_hold_of_a_committed_order_that_a_failover_brought_back_is_finalized_again(
        client, engine, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=3)
    item = cart_add(client, "u1", vid, 2)
    cart_add(client, "u2", vid, 1)
    saved = {k: redis_client.hgetall(k) for k in (keys.holds(vid), keys.stock(vid))}
    assert client.post("/api/cart/u1/checkout/").status_code == 201
    for key, value in saved.items():  # the promoted replica never got the lock nor the finalize
        redis_client.delete(key)
        redis_client.hset(key, mapping=value)
    assert engine.holds([(vid, item["id"])])[0].state == "held"

    dry = reconciler.reconcile(dry_run=True)
    assert dry.orders_finalized == 1
    assert engine.holds([(vid, item["id"])])[0] is not None
    report = reconciler.reconcile(grace_ms=0)
    assert (report.orders_finalized, report.lost_holds) == (1, 0)
    assert engine.holds([(vid, item["id"])]) == [None]
    assert counts(engine, vid) == (0, 1)  # on_hand 1: the other customer's hold; nothing held twice
    assert_invariant(engine, sessions, redis_client, vid)
    assert reconciler.reconcile().orders_finalized == 0
    again = client.post("/api/cart/u1/checkout/")  # its line went with the checkout: nothing to buy twice
    assert again.status_code == 400 and again.get_json()["error"]["code"] == "empty_cart"


def test_a_hold_lost_together_with_its_cart_line_is_written_back_after_the_outage_and_reported(
        client, container, engine, sessions, redis_client, reconciler):
    """On one primary a failover loses a hold and its line together: the web process that wrote the
    line writes it back on its first write after the outage, and the reconciler reports it once."""
    vid = make_variant(sessions, on_hand=10)
    lost = cart_add(client, "u1", vid, 3)
    lose_hold(redis_client, vid, lost["id"], 3)
    assert redis_client.hdel(keys.cart("u1"), lost["id"]) == 1  # the line went with it
    assert reconciler.reconcile().lost_holds == 0  # nothing left to see yet

    container.cart_store.recent.outage()  # what a 503 for Redis does (see the next test)
    cart_add(client, "u2", vid, 1)  # the next write of this process checks the lines of before
    assert container.cart_store.recent.outage_since is None
    before = lost_metric()
    report = reconciler.reconcile()
    assert (report.lost_holds, report.lost_hold_ids) == (1, [lost["id"]])
    assert lost_metric() - before == 1
    response = client.post("/api/cart/u1/checkout/")
    assert (response.status_code, response.get_json()["error"]["code"]) == (410, "reservation_expired")
    assert counts(engine, vid) == (9, 1)
    assert_invariant(engine, sessions, redis_client, vid)
    assert reconciler.reconcile().lost_holds == 0


def test_lines_that_survived_or_were_written_after_the_outage_are_not_written_back(
        client, container, sessions, redis_client, reconciler):
    vid = make_variant(sessions, on_hand=10)
    kept = cart_add(client, "u1", vid, 1)
    container.cart_store.recent.outage()
    after = cart_add(client, "u2", vid, 1)  # restores nothing: u1's line and hold are both there
    removed = client.delete(f"/api/cart/{after['id']}/")
    assert removed.status_code == 204
    cart_add(client, "u3", vid, 1)
    assert redis_client.hget(keys.cart("u2"), after["id"]) is None  # written after the outage: not restored
    assert reconciler.reconcile().lost_holds == 0
    assert kept["status"] == "held"


@pytest.mark.single_node  # a cluster client cannot even be built on a dead node
def test_a_503_for_redis_makes_the_process_check_its_recent_lines(build_app, env):
    from app.embedded import free_port

    dead_client, dead = build_app({**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    response = dead_client.post("/api/cart/add/", json={"user_id": "u1", "variant_id": 1, "quantity": 1})
    assert response.status_code == 503
    assert dead.cart_store.recent.outage_since is not None


def test_the_reconcile_command_prints_the_holds_a_failover_lost(client, engine, sessions, redis_client, cli_env):
    vid = make_variant(sessions, on_hand=10)
    lost = cart_add(client, "u1", vid, 3)
    lose_hold(redis_client, vid, lost["id"], 3)
    result = CliRunner().invoke(cli, ["reconcile"])
    assert result.exit_code == 0, result.output
    assert f"holds lost in a Redis failover 1 ({lost['id']})" in result.stdout
    assert "holds lost" not in CliRunner().invoke(cli, ["reconcile"]).stdout  # reported once
