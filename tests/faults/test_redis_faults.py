"""Redis stopped, and Redis restarted empty, while shoppers keep sending requests.

Each test runs its own redis-server (never a shared one), stops it for real in the middle of the
traffic and brings it back on the same port; the app is never restarted.
"""
from __future__ import annotations

import time

from sqlalchemy import select

from persistence.models import IdempotencyRecord
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.faults.conftest import assert_orders_durable, assert_stock_exact, raw_redis, units_sold
from tests.faults.traffic import Traffic

ON_HAND = 40


def _ready(client) -> bool:
    return client.get("/readyz").status_code == 200


def _settle(container, variant_ids):
    """What the periodic jobs do after a fault: sweep, then reconcile twice (the first pass may only
    resolve stale checkout locks). grace_ms=0: nothing is in flight any more."""
    container.sweeper.sweep()
    container.reconciler.reconcile(grace_ms=0)
    container.reconciler.reconcile(grace_ms=0)
    check = container.reconciler.reconcile(variant_ids, dry_run=True, grace_ms=0)
    assert check.drifted == 0 and check.skipped == 0, check.as_dict()


def test_redis_stopped_mid_traffic_answers_503_and_recovers_without_a_restart(base_env, build, own_redis, capsys):
    server = own_redis(persist=True)  # "stopped", not wiped: it comes back with its data (AOF)
    client, c = build({**base_env, "REDIS_URL": server.url})
    variants = [make_variant(c.sessions, on_hand=ON_HAND) for _ in range(3)]
    traffic = Traffic(client, variants, [f"shopper{i}" for i in range(12)]).start()
    try:
        wait_for(lambda: traffic.successes() >= 40, timeout=20, message="traffic before the fault")

        stopped_at = time.monotonic()
        server.stop()
        wait_for(lambda: traffic.count(status=503, since=stopped_at) >= 20
                 and time.monotonic() - stopped_at >= 1.5, timeout=20, message="503s while Redis is stopped")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert ready.get_json()["checks"]["redis"].startswith("error")
        down_for = time.monotonic() - stopped_at

        server = own_redis.restart(server, persist=True)
        back_at = time.monotonic()
        wait_for(lambda: _ready(client), timeout=15, message="/readyz 200 after Redis is back")
        ready_after = time.monotonic() - back_at
        wait_for(lambda: traffic.successes(since=back_at) >= 40, timeout=20,
                 message="requests succeeding again without a restart")
        resumed_after = time.monotonic() - back_at
    finally:
        traffic.stop()

    assert traffic.problems == [], traffic.problems[:10]
    errors_while_down = traffic.count(status=503, since=stopped_at)
    assert traffic.count(status=500) == 0

    # A checkout that answered 503 may still have committed (Redis went away after the database
    # commit): its Idempotency-Key gets the order back, and nothing is committed twice.
    with c.sessions() as s:
        recorded = {r.key: r.response["id"] for r in s.scalars(select(IdempotencyRecord))}
    retried = 0
    for answer in traffic.unavailable_checkouts():
        if answer.key in recorded:
            again = client.post(f"/api/cart/{answer.user}/checkout/", headers={"Idempotency-Key": answer.key})
            assert again.status_code == 201, again.get_json()
            assert again.get_json()["id"] == recorded[answer.key]
            retried += 1

    _settle(c, variants)
    assert_stock_exact(c, variants)
    orders = traffic.orders()
    assert_orders_durable(c, orders)
    sold = units_sold(c, variants)
    state = assert_stock_exact(c, variants)
    for vid in variants:
        assert state[vid][0] + sold.get(vid, 0) == ON_HAND
    with capsys.disabled():
        print(f"\n[redis stopped] down {down_for:.2f}s: {errors_while_down} x 503 (0 x 500); /readyz 200 "
              f"{ready_after:.2f}s after restart, traffic resumed in {resumed_after:.2f}s; {len(orders)} "
              f"orders, {retried} committed-but-503 checkout(s) recovered by Idempotency-Key; "
              f"{traffic.summary()}")


def test_redis_restarted_empty_rebuilds_counters_and_oversells_nothing(base_env, build, own_redis, capsys):
    server = own_redis(persist=False)
    client, c = build({**base_env, "REDIS_URL": server.url})
    variants = [make_variant(c.sessions, on_hand=ON_HAND) for _ in range(3)]
    # One shopper with a held line we follow through the restart.
    watched = client.post("/api/cart/add/", json={"user_id": "watched", "variant_id": variants[0], "quantity": 2})
    assert watched.status_code == 201
    watched_item = watched.get_json()["item"]["id"]

    traffic = Traffic(client, variants, [f"shopper{i}" for i in range(12)]).start()
    try:
        wait_for(lambda: traffic.successes() >= 40, timeout=20, message="traffic before the fault")
        server = own_redis.restart(server, persist=False)  # everything in Redis is gone
        back_at = time.monotonic()
        assert raw_redis(server.url).dbsize() < 50  # it really came back empty (traffic may refill it)
        wait_for(lambda: _ready(client), timeout=15, message="/readyz 200 after the empty restart")
        wait_for(lambda: traffic.successes(since=back_at) >= 40, timeout=20,
                 message="requests succeeding against the empty Redis")
        resumed_after = time.monotonic() - back_at
    finally:
        traffic.stop()
    assert traffic.problems == [], traffic.problems[:10]
    assert traffic.count(status=500) == 0

    # The watched hold is gone. Its line is never shown as held, and it can never be checked out.
    cart = client.get("/api/cart/watched/").get_json()
    lines = {i["id"]: i["status"] for i in cart["items"]}
    assert lines.get(watched_item, "expired") == "expired", cart
    refused = client.post("/api/cart/watched/checkout/")
    assert refused.status_code in (400, 410), refused.get_json()
    assert refused.get_json()["error"]["code"] in ("empty_cart", "reservation_expired")

    _settle(c, variants)
    state = assert_stock_exact(c, variants)
    sold = units_sold(c, variants)
    for vid in variants:
        assert state[vid][0] + sold.get(vid, 0) == ON_HAND

    # Nothing oversold afterwards: buy everything that is left, then not one unit more.
    for n, vid in enumerate(variants):
        left = c.holds.counters([vid])[vid].available
        if left:
            buyer = f"sweeper{n}"
            assert client.post("/api/cart/add/", json={"user_id": buyer, "variant_id": vid,
                                                       "quantity": left}).status_code == 201
            assert client.post(f"/api/cart/{buyer}/checkout/").status_code == 201
        one_more = client.post("/api/cart/add/", json={"user_id": "late", "variant_id": vid, "quantity": 1})
        assert one_more.status_code == 400 and one_more.get_json()["error"]["code"] == "insufficient_stock"
    _settle(c, variants)
    sold = units_sold(c, variants)
    final = assert_stock_exact(c, variants)
    for vid in variants:
        on_hand, available, reserved = final[vid]
        # what is not sold is still held by a shopper's live line: sold + held is exactly the stock
        assert available == 0 and on_hand == reserved and sold.get(vid, 0) + reserved == ON_HAND
    assert_orders_durable(c, traffic.orders())
    total_sold = sum(sold.values())
    with capsys.disabled():
        print(f"\n[redis restarted empty] traffic resumed {resumed_after:.2f}s after the restart; "
              f"{len(traffic.orders())} orders; then sold {total_sold} and held "
              f"{sum(f[2] for f in final.values())} of {3 * ON_HAND} units, not one more; {traffic.summary()}")


def test_the_per_customer_limit_survives_redis_restarted_empty(base_env, build, own_redis):
    server = own_redis(persist=False)
    client, c = build({**base_env, "REDIS_URL": server.url, "MAX_UNITS_PER_CUSTOMER": "2"})
    vid = make_variant(c.sessions, on_hand=20)
    body = {"user_id": "capped", "variant_id": vid, "quantity": 2}
    assert client.post("/api/cart/add/", json=body).status_code == 201
    assert client.post("/api/cart/capped/checkout/").status_code == 201  # two ordered: the cap is reached
    own_redis.restart(server, persist=False)
    wait_for(lambda: _ready(client), timeout=15, message="/readyz after the empty restart")
    c.reconciler.reconcile(grace_ms=0)
    again = client.post("/api/cart/add/", json={"user_id": "capped", "variant_id": vid, "quantity": 1})
    assert again.status_code == 400 and again.get_json()["error"]["code"] == "limit_exceeded"
