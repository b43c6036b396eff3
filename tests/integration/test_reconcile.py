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
from sqlalchemy import select, update

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
    assert sum(r.drifted for r in reports) == 0
    assert sum(r.checked for r in reports) > sum(r.skipped for r in reports)

    for vid in vids:
        holds = assert_invariant(engine, sessions, redis_client, vid)
        assert holds == {hid: q for per in expected.values() for hid, q in per.items()
                         if hid.startswith(f"{vid}~")}
    final = reconciler.reconcile()
    assert (final.drifted, final.skipped) == (0, 0)
