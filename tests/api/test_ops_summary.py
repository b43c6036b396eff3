"""GET /api/ops/summary/ on a real Redis and database: the shape of API.md, what each figure counts,
the busiest first, the invariant, the rates, the jobs and the listener."""
from __future__ import annotations

import threading

import pytest

import jobs.tasks
from app import clock, keys
from app.composition import Container
from jobs.listener import ExpiryListener
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, wait_for
from tests.factories import make_variant, make_variants

URL = "/api/ops/summary/"
VARIANT_FIELDS = {"variant_id", "sku", "on_hand", "available", "reserved", "active_holds", "reservations_per_minute"}


def summary(client, query: str = "") -> dict:
    response = client.get(URL + query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def add(client, user: str, vid: int, quantity: int = 1) -> int:
    return client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid, "quantity": quantity}).status_code


@pytest.fixture
def jobs_container(container):
    jobs.tasks.use_container(container)
    yield container
    jobs.tasks.use_container(None)


# --- shape ----------------------------------------------------------------------------------------

def test_the_summary_has_exactly_the_fields_of_the_contract(client, sessions):
    vid = make_variant(sessions, on_hand=7, sku="SHAPE-1")
    assert add(client, "s1", vid, 2) == 201
    body = summary(client)
    assert set(body) == {"variants", "totals", "holds_lapsing_next_minute", "reservations_per_second",
                         "refusals_per_second", "invariant", "jobs", "listener", "generated_at"}
    assert body["variants"] == [{"variant_id": vid, "sku": "SHAPE-1", "on_hand": 7, "available": 5, "reserved": 2,
                                 "active_holds": 1, "reservations_per_minute": 1}]
    assert body["totals"] == {"on_hand": 7, "available": 5, "reserved": 2, "holds_live": 1}
    assert body["invariant"] == {"ok": True, "violations": []}
    assert set(body["jobs"]) == {"sweep", "reconcile"}
    assert set(body["jobs"]["sweep"]) == {"last_success_at", "released"}
    assert set(body["jobs"]["reconcile"]) == {"last_success_at", "drifted", "repaired"}
    assert set(body["listener"]) == {"alive", "lag_p99_ms"}
    assert body["generated_at"].endswith("Z")


def test_the_summary_needs_the_admin_key(build_app, auth_env):
    client, _ = build_app(auth_env)
    assert client.get(URL).status_code == 401
    assert client.get(URL, headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}).status_code == 403
    assert client.get(URL, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


# --- which variants ---------------------------------------------------------------------------------

def test_the_busiest_variants_come_first_and_limit_cuts_the_list(client, sessions):
    quiet, busy, busier = make_variants(sessions, 3, on_hand=20)
    for n in range(2):
        assert add(client, f"b{n}", busy) == 201
    for n in range(3):
        assert add(client, f"c{n}", busier) == 201
    ids = [row["variant_id"] for row in summary(client)["variants"]]
    assert ids == [busier, busy, quiet]
    assert [row["variant_id"] for row in summary(client, "?limit=1")["variants"]] == [busier]
    assert summary(client, "?limit=0")["variants"] == []


def test_ties_in_reservations_go_to_the_variant_with_more_units_reserved(client, sessions):
    small, large = make_variants(sessions, 2, on_hand=20)
    assert add(client, "t1", small, 1) == 201
    assert add(client, "t2", large, 5) == 201
    assert [row["variant_id"] for row in summary(client, "?limit=2")["variants"]] == [large, small]


def test_a_variant_asked_for_is_listed_beside_the_busiest(client, sessions):
    quiet, other, busy = make_variants(sessions, 3, on_hand=20)
    assert add(client, "p1", busy) == 201
    rows = summary(client, f"?limit=1&variant_id={quiet}&variant_id={other}")["variants"]
    assert [row["variant_id"] for row in rows] == [busy, quiet, other]
    # one that is among the busiest already is not listed twice
    rows = summary(client, f"?limit=1&variant_id={busy}")["variants"]
    assert [row["variant_id"] for row in rows] == [busy]


def test_the_default_limit_is_fifty(client, sessions):
    make_variants(sessions, 55, on_hand=1)
    assert len(summary(client)["variants"]) == 50


@pytest.mark.parametrize("query", ["?limit=501", "?limit=-1", "?limit=x", "?variant_id=0", "?variant_id=abc"])
def test_a_bad_limit_or_variant_id_is_a_validation_error(client, query):
    response = client.get(URL + query)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "validation_error"


def test_an_unknown_variant_id_is_not_found(client, sessions):
    vid = make_variant(sessions)
    response = client.get(f"{URL}?variant_id={vid}&variant_id={vid + 1000}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


# --- what is counted -----------------------------------------------------------------------------

def test_a_variant_never_used_shows_all_its_units_available_and_breaks_nothing(client, sessions, redis_client):
    vid = make_variant(sessions, on_hand=9)
    body = summary(client)
    assert not redis_client.exists(keys.stock(vid)), "reading must not build counters"
    (row,) = body["variants"]
    assert (row["on_hand"], row["available"], row["reserved"], row["active_holds"]) == (9, 9, 0, 0)
    assert body["invariant"]["ok"] is True


def test_lapsed_and_soon_lapsing_holds_are_counted_apart(container, client, sessions):
    vid = make_variant(sessions, on_hand=10)
    now = clock.now_ms()
    container.holds.reserve(vid, "old", 1, now=now - 120_000, ttl_ms=60_000)  # lapsed, not swept yet
    container.holds.reserve(vid, "soon", 2, ttl_ms=30_000)  # lapses within the minute
    container.holds.reserve(vid, "long", 3)  # HOLD_TTL_SECONDS: 900
    body = summary(client)
    (row,) = body["variants"]
    assert row["active_holds"] == 2  # the lapsed hold is not live any more
    assert body["totals"]["holds_live"] == 2
    assert body["holds_lapsing_next_minute"] == 1
    assert row["reserved"] == 6 and row["available"] == 4  # its units wait for the sweep


def test_reservations_per_minute_counts_holds_made_in_the_last_minute_only(container, client, sessions):
    vid = make_variant(sessions, on_hand=10)
    now = clock.now_ms()
    container.holds.reserve(vid, "earlier", 1, now=now - 120_000)  # two minutes ago, still live
    container.holds.reserve(vid, "now1", 1)
    container.holds.reserve(vid, "now2", 1)
    (row,) = summary(client)["variants"]
    assert row["active_holds"] == 3
    assert row["reservations_per_minute"] == 2


def test_a_broken_counter_is_a_violation_until_the_reconciler_repairs_it(client, sessions, redis_client):
    good, bad = make_variants(sessions, 2, on_hand=10)
    assert add(client, "i1", good) == 201 and add(client, "i2", bad) == 201
    redis_client.hincrby(keys.stock(bad), "available", 3)
    invariant = summary(client)["invariant"]
    assert invariant == {"ok": False, "violations": [bad]}
    assert client.post("/api/ops/reconcile/", json={}).status_code == 200
    assert summary(client)["invariant"] == {"ok": True, "violations": []}


@pytest.mark.parametrize("in_flight", [{"adj_pending": 1}, {"version": 7}])
def test_a_variant_with_a_change_in_flight_is_not_counted_as_broken(client, sessions, redis_client, in_flight):
    vid = make_variant(sessions, on_hand=10)
    assert add(client, "f1", vid) == 201
    # the counters as they stand half-way: an adjustment's units taken out before the database
    # commit, or Redis's version moved by a checkout the database read did not see yet
    redis_client.hincrby(keys.stock(vid), "available", -4)
    redis_client.hset(keys.stock(vid), mapping=in_flight)
    assert summary(client)["invariant"] == {"ok": True, "violations": []}


# --- rates ------------------------------------------------------------------------------------------

def test_the_rates_are_the_reserves_and_refusals_since_the_last_sample(client, sessions):
    vid = make_variant(sessions, on_hand=5)
    t0 = clock.now_ms()
    first = summary(client)
    assert first["reservations_per_second"] == 0.0  # no sample before the first summary
    for n in range(5):
        assert add(client, f"r{n}", vid) == 201
    assert add(client, "r-late", vid) == 400
    # a sample is taken over at least a second: asked before, the rate is still the first sample's 0
    body = wait_for(lambda: (b := summary(client))["reservations_per_second"] > 0 and b, timeout=5,
                    message="a rate over a window of a second")
    window_s = (clock.now_ms() - t0) / 1000  # the sample's span lies within this, and is >= 1 s
    assert 5 / window_s <= body["reservations_per_second"] <= 5.0
    assert 1 / window_s <= body["refusals_per_second"] <= 1.0
    # asked again at once, the rate is taken from the sample before: not a window of milliseconds
    again = summary(client)
    assert again["reservations_per_second"] > 0


# --- jobs and listener ------------------------------------------------------------------------------

def test_the_jobs_last_success_is_shown_once_they_ran(container, client, sessions, jobs_container):
    vid = make_variant(sessions, on_hand=5)
    past = clock.now_ms() - 60_000
    for user in ("j1", "j2"):
        container.holds.reserve(vid, user, 1, now=past, ttl_ms=1_000)
    before = summary(client)["jobs"]
    assert before == {"sweep": {"last_success_at": None, "released": None},
                      "reconcile": {"last_success_at": None, "drifted": None, "repaired": None}}
    t0 = clock.now_ms()
    jobs.tasks.sweep_job()
    jobs.tasks.reconcile_job()
    after = summary(client)["jobs"]
    assert after["sweep"]["released"] == 2
    assert after["sweep"]["last_success_at"] >= clock.ms_to_iso(t0)  # ISO with ms: ordered as text
    assert after["reconcile"]["drifted"] == 0 and after["reconcile"]["repaired"] == 0
    assert after["reconcile"]["last_success_at"] is not None


def test_a_dry_run_reconcile_is_not_recorded_as_the_jobs_success(client, jobs_container):
    jobs.tasks.reconcile_job(dry_run=True)
    assert summary(client)["jobs"]["reconcile"]["last_success_at"] is None


def test_the_listener_shows_alive_while_it_runs_with_its_release_lag(settings, client, sessions):
    from app import metrics

    metrics._recent_lags.clear()  # the window is per process: earlier tests' sweeps are not this listener's
    assert summary(client)["listener"] == {"alive": False, "lag_p99_ms": None}
    c = Container(settings)
    listener = ExpiryListener(c, max_backoff=0.2)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        vid = make_variant(sessions, on_hand=5)
        c.holds.reserve(vid, "l1", 1, ttl_ms=200)
        wait_for(lambda: listener.released_holds >= 1, timeout=5, message="the listener's release")
        state = wait_for(lambda: (s := summary(client)["listener"])["lag_p99_ms"] is not None and s,
                         timeout=5, message="a heartbeat carrying the lag")
        assert state["alive"] is True
        # released by the listener within a couple of seconds of its expiry, not at a sweep's pace
        assert 0 <= state["lag_p99_ms"] < 3_000
    finally:
        listener.stop.set()
        thread.join(5)
        c.close()
    assert not thread.is_alive()


def test_the_listener_shows_down_once_its_heartbeat_lapses(container, client, redis_client):
    listener = ExpiryListener(container)
    assert listener.heartbeat() is False  # not subscribed: no heartbeat
    listener.connected.set()
    assert listener.heartbeat() is True
    assert summary(client)["listener"]["alive"] is True
    assert 0 < redis_client.pttl(keys.listener_heartbeat()) <= 10_000
    redis_client.delete(keys.listener_heartbeat())  # what its TTL does when the listener stops beating
    assert summary(client)["listener"]["alive"] is False


# --- cost -------------------------------------------------------------------------------------------

def test_the_summary_reads_redis_in_one_round_trip_per_500_variants(container, client, sessions, monkeypatch):
    make_variants(sessions, 1_200, on_hand=1)
    runs: list[int] = []
    original = container.runner.run
    monkeypatch.setattr(container.runner, "run", lambda calls: runs.append(len(calls)) or original(calls))
    summary(client)
    # one read of the jobs, the listener, the rate samples and a shared scan; then three batches of
    # variants, four commands each; then at most the shared scan's and the first rate sample's writes
    assert runs[0] == 5
    assert runs[1:4] == [2_000, 2_000, 800]
    assert len(runs) <= 6


def test_a_slow_scan_is_shared_by_the_next_callers_until_it_ages(container, client, sessions, redis_client,
                                                                  monkeypatch):
    quiet, busy = make_variants(sessions, 2, on_hand=10)
    container.ops.reuse_from_ms = 0  # every scan counts as slow: shared for five times its duration
    first = summary(client)
    assert redis_client.pttl(keys.ops_scan()) > 0
    container.holds.reserve(busy, "x1", 4)
    runs: list[int] = []
    original = container.runner.run
    monkeypatch.setattr(container.runner, "run", lambda calls: runs.append(len(calls)) or original(calls))
    # asked at once: the figures of the shared scan, not read again; a variant asked for by id is
    second = summary(client, f"?variant_id={busy}&limit=0")
    assert second["generated_at"] == first["generated_at"]
    assert second["totals"] == first["totals"]
    assert second["variants"] == [{**second["variants"][0], "reserved": 4, "available": 6}]
    assert 8 not in runs  # no batch of the two variants (four commands each) was read
    redis_client.delete(keys.ops_scan())  # what its TTL does: the next caller reads the stores
    assert summary(client)["totals"]["reserved"] == 4


def test_a_fast_scan_is_not_shared(client, sessions, redis_client):
    make_variants(sessions, 3, on_hand=1)
    summary(client)
    assert not redis_client.exists(keys.ops_scan())
