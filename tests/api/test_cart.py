"""Cart, checkout and orders through the HTTP API, against real Redis and a real database."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from app import faults
from persistence.models import IdempotencyRecord, Order, PricingRule, StockMovement
from tests.conftest import wait_for
from tests.factories import make_variant, on_hand


def counters(container, vid):
    return container.holds.counters([vid])[vid]


def assert_invariant(container, vid):
    live = counters(container, vid)
    assert live.available + live.reserved == on_hand(container.sessions, vid)
    assert live.available >= 0
    return live


def add(client, user, vid, qty, **extra):
    headers = extra.pop("headers", {})
    return client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid, "quantity": qty, **extra},
                       headers=headers)


@pytest.fixture
def seed_rules(sessions):
    with sessions.begin() as s:
        s.add(PricingRule(name="Bulk 5+", type="BULK", priority=1, percent=Decimal("10.00"), min_quantity=5,
                          active=True))
        s.add(PricingRule(name="Gold tier", type="USER_TIER", priority=2, percent=Decimal("5.00"), tier="GOLD",
                          active=True))


def test_adding_reserves_stock_and_snapshots_the_seed_example_price(client, container, sessions, seed_rules):
    vid = make_variant(sessions, on_hand=20, base_price="500.00", price_adjustment="50.00")
    response = add(client, 101, vid, 10, user_tier="GOLD")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["item"]["unit_price"] == "470.25"
    assert body["item"]["line_total"] == "4702.50"
    assert body["item"]["status"] == "held"
    assert body["item"]["quantity"] == 10
    assert body["cart"]["user_id"] == 101
    assert body["cart"]["subtotal"] == "4702.50"
    assert body["cart"]["expires_at"] == body["item"]["reserved_until"]
    assert body["cart"]["expires_at"].endswith("Z")
    live = assert_invariant(container, vid)
    assert (live.available, live.reserved) == (10, 10)


def test_a_second_add_merges_into_the_line_and_reprices_it(client, container, sessions, seed_rules):
    vid = make_variant(sessions, on_hand=20, base_price="500.00", price_adjustment="50.00")
    first = add(client, "alice", vid, 2).get_json()
    assert first["item"]["unit_price"] == "550.00"
    second = add(client, "alice", vid, 3)
    assert second.status_code == 201
    body = second.get_json()
    assert body["item"]["id"] == first["item"]["id"]
    assert body["item"]["quantity"] == 5
    assert body["item"]["unit_price"] == "495.00"  # bulk 5+ now applies
    assert len(body["cart"]["items"]) == 1
    assert counters(container, vid).reserved == 5


def test_a_shown_price_that_differs_is_a_conflict_and_reserves_nothing(client, container, sessions, seed_rules):
    vid = make_variant(sessions, on_hand=20, base_price="500.00", price_adjustment="50.00")
    response = add(client, 7, vid, 1, price="500.00")
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "price_changed"
    assert error["details"]["current_price"] == "550.00"
    assert counters(container, vid).reserved == 0
    assert client.get("/api/cart/7/").get_json()["items"] == []
    assert add(client, 7, vid, 1, price="550.00").status_code == 201


def test_insufficient_stock_is_refused_with_the_exact_message(client, container, sessions):
    vid = make_variant(sessions, on_hand=3)
    response = add(client, 1, vid, 5)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "insufficient_stock"
    assert error["message"] == "Only 3 units available, requested 5"
    assert error["details"]["available"] == 3 and error["details"]["requested"] == 5
    assert counters(container, vid).reserved == 0


def _commands(redis_client) -> dict[str, int]:
    return {name[len("cmdstat_"):]: stats["calls"] for name, stats in redis_client.info("commandstats").items()}


def test_a_new_line_goes_in_with_its_reserve_and_shows_what_the_hold_holds(client, container, sessions,
                                                                            redis_client, seed_rules,
                                                                            cluster_mode):
    vid = make_variant(sessions, on_hand=20, base_price="500.00", price_adjustment="50.00")
    assert add(client, "warm", vid, 1).status_code == 201  # the catalog cache is warm from here on
    before = _commands(redis_client)
    response = add(client, "fresh", vid, 5, user_tier="GOLD")
    after = _commands(redis_client)
    assert response.status_code == 201, response.get_json()
    item = response.get_json()["item"]
    assert (item["quantity"], item["unit_price"], item["status"]) == (5, "470.25", "held")
    # One script call and the line's conditional write beside it. commandstats also counts what the
    # script runs (its HSET of the counters, its HSETNX of the new hold), and a new hold needs no
    # HGET in the script: so no HGET at all means the line was not read back in a second round trip.
    # (One server's counts: on a cluster the cart and the stock live on different primaries.)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in ("evalsha", "hsetnx", "hset", "hget")}
    if not cluster_mode:
        assert delta == {"evalsha": 1, "hsetnx": 2, "hset": 1, "hget": 0}, delta
    hold = container.holds.holds([(vid, item["id"])])[0]
    cart = client.get("/api/cart/fresh/").get_json()
    assert cart["items"] == [item]
    assert hold.quantity == 5 and cart["expires_at"] == item["reserved_until"]
    assert counters(container, vid).reserved == 6


@pytest.fixture
def capped(env, build_app):
    """(client, container) of an app with MAX_UNITS_PER_CUSTOMER=3."""
    env["MAX_UNITS_PER_CUSTOMER"] = "3"
    return build_app(env)


def test_a_refused_add_of_a_new_line_leaves_no_line_behind(capped):
    client, container = capped
    vid = make_variant(container.sessions, on_hand=5)
    assert add(client, "warm", vid, 1).status_code == 201
    over_limit = add(client, "greedy", vid, 4)
    assert over_limit.get_json()["error"]["code"] == "limit_exceeded"
    assert client.get("/api/cart/greedy/").get_json()["items"] == []
    assert add(client, "late", vid, 3).status_code == 201  # 1 unit left
    refused = add(client, "later", vid, 2)
    assert refused.get_json()["error"]["code"] == "insufficient_stock"
    assert client.get("/api/cart/later/").get_json()["items"] == []
    live = assert_invariant(container, vid)
    assert (live.available, live.reserved) == (1, 4)


def test_a_rule_changed_between_adds_prices_the_new_line_anew(client, container, sessions):
    vid = make_variant(sessions, on_hand=20, base_price="100.00")
    assert add(client, "warm", vid, 1).get_json()["item"]["unit_price"] == "100.00"
    rule = client.post("/api/pricing/rules/", json={"name": "Sale", "type": "BULK", "priority": 1,
                                                    "percent": "20.00", "min_quantity": 1})
    assert rule.status_code == 201, rule.get_json()
    item = add(client, "next", vid, 1).get_json()["item"]
    assert item["unit_price"] == "80.00"
    assert client.get("/api/cart/next/").get_json()["items"] == [item]


def test_an_inactive_product_cannot_be_added(client, container, sessions):
    vid = make_variant(sessions, on_hand=3, status="draft")
    response = add(client, 1, vid, 1)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "product_not_active"
    assert counters(container, vid).reserved == 0


def test_an_unknown_variant_is_not_found(client):
    response = add(client, 1, 999999, 1)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("body, field", [
    ({"user_id": 1, "variant_id": 1, "quantity": "2"}, "quantity"),
    ({"user_id": 1, "variant_id": 1, "quantity": 0}, "quantity"),
    ({"user_id": 1, "variant_id": 1, "quantity": -1}, "quantity"),
    ({"user_id": 1, "variant_id": 1}, "quantity"),
    ({"user_id": "bad id!", "variant_id": 1, "quantity": 1}, "user_id"),
    ({"user_id": "x" * 65, "variant_id": 1, "quantity": 1}, "user_id"),
    ({"user_id": "u1\n", "variant_id": 1, "quantity": 1}, "user_id"),
    ({"user_id": 1, "variant_id": 1, "quantity": 1, "user_tier": "GOLD\n"}, "user_tier"),
    ({"user_id": 1, "variant_id": 1, "quantity": 1, "extra": True}, "extra"),
    ({"user_id": 1, "variant_id": 1, "quantity": 10**12}, "quantity"),
])
def test_bad_add_input_is_a_validation_error_and_reserves_nothing(client, container, sessions, body, field):
    vid = make_variant(sessions, on_hand=5)
    body = {**body, "variant_id": vid} if "variant_id" in body else body
    response = client.post("/api/cart/add/", json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]
    assert counters(container, vid).reserved == 0


def test_malformed_json_is_bad_json(client):
    response = client.post("/api/cart/add/", data="{nope", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "bad_json"


def test_the_per_customer_limit_counts_held_and_ordered_units(capped):
    client, container = capped
    vid = make_variant(container.sessions, on_hand=20)
    assert add(client, "u1", vid, 2).status_code == 201
    response = add(client, "u1", vid, 2)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "limit_exceeded"
    assert client.post("/api/cart/u1/checkout/").status_code == 201
    # two ordered, one more allowed
    assert add(client, "u1", vid, 1).status_code == 201
    assert add(client, "u1", vid, 1).get_json()["error"]["code"] == "limit_exceeded"
    # another customer is not affected
    assert add(client, "u2", vid, 3).status_code == 201


def test_changing_a_quantity_reserves_or_returns_the_difference(client, container, sessions):
    vid = make_variant(sessions, on_hand=10)
    item = add(client, 5, vid, 2).get_json()["item"]
    up = client.patch(f"/api/cart/{item['id']}/", json={"quantity": 6})
    assert up.status_code == 200
    assert up.get_json()["item"]["quantity"] == 6
    assert counters(container, vid).reserved == 6
    down = client.patch(f"/api/cart/{item['id']}", json={"quantity": 1})
    assert down.status_code == 200
    assert counters(container, vid).reserved == 1
    too_many = client.patch(f"/api/cart/{item['id']}/", json={"quantity": 11})
    assert too_many.status_code == 400
    assert too_many.get_json()["error"]["code"] == "insufficient_stock"
    assert counters(container, vid).reserved == 1
    assert_invariant(container, vid)


def test_removing_a_line_releases_its_units_at_once(client, container, sessions):
    vid = make_variant(sessions, on_hand=10)
    item = add(client, 5, vid, 4).get_json()["item"]
    assert client.delete(f"/api/cart/{item['id']}/").status_code == 204
    live = assert_invariant(container, vid)
    assert (live.available, live.reserved) == (10, 0)
    assert client.get("/api/cart/5/").get_json()["items"] == []
    missing = client.delete(f"/api/cart/{item['id']}/")
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "not_found"


def test_an_unknown_item_id_is_not_found(client):
    for item in ("nope", "12~", "~x", "1~bad!id", "../etc/passwd"):
        response = client.delete(f"/api/cart/{item}/")
        assert response.status_code in (404, 405), item
        assert response.get_json()["error"]["code"] in ("not_found", "method_not_allowed")


def test_a_user_with_no_cart_gets_an_empty_one(client):
    body = client.get("/api/cart/nobody/").get_json()
    assert body == {"user_id": "nobody", "items": [], "subtotal": "0.00", "expires_at": None}


def test_a_lapsed_line_stays_in_the_cart_as_expired_and_checkout_refuses_it(env, build_app):
    env["HOLD_TTL_SECONDS"] = "2"
    client, container = build_app(env)
    vid = make_variant(container.sessions, on_hand=10)
    other = make_variant(container.sessions, on_hand=10)
    item = add(client, 9, vid, 3).get_json()["item"]
    wait_for(lambda: client.get("/api/cart/9/").get_json()["items"][0]["status"] == "expired",
             timeout=6, message="line to show as expired")
    container.sweeper.sweep()
    # a fresh line beside the lapsed one (its hold lasts 2 s too: add it just before checkout):
    # checkout must still refuse as a whole
    add(client, 9, other, 1)
    cart = client.get("/api/cart/9/").get_json()
    statuses = {i["id"]: i["status"] for i in cart["items"]}
    assert statuses[item["id"]] == "expired"
    response = client.post("/api/cart/9/checkout/")
    assert response.status_code == 410
    error = response.get_json()["error"]
    assert error["code"] == "reservation_expired"
    assert error["details"]["expired_item_ids"] == [item["id"]]
    with container.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Order)) == 0
    assert on_hand(container.sessions, vid) == 10
    assert counters(container, vid).reserved == 0
    assert counters(container, other).reserved == 1  # unlocked, still held
    # removing the lapsed line lets the rest check out
    assert client.delete(f"/api/cart/{item['id']}/").status_code == 204
    assert client.post("/api/cart/9/checkout/").status_code == 201


def test_checkout_of_an_empty_cart_is_refused(client):
    response = client.post("/api/cart/42/checkout/")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "empty_cart"


def test_checkout_commits_every_line_as_one_order(client, container, sessions, seed_rules):
    a = make_variant(sessions, on_hand=10, base_price="500.00", price_adjustment="50.00")
    b = make_variant(sessions, on_hand=4, base_price="10.00")
    add(client, 101, a, 10, user_tier="GOLD")
    add(client, 101, b, 1)
    response = client.post("/api/cart/101/checkout/", json={})
    assert response.status_code == 201, response.get_json()
    order = response.get_json()
    assert order["status"] == "confirmed"
    assert order["user_id"] == 101
    assert order["total"] == "4712.50"
    assert sorted((i["variant_id"], i["quantity"], i["unit_price"]) for i in order["items"]) == sorted(
        [(a, 10, "470.25"), (b, 1, "10.00")])
    assert order["created_at"].endswith("Z")
    assert on_hand(sessions, a) == 0 and on_hand(sessions, b) == 3
    for vid in (a, b):
        assert counters(container, vid).reserved == 0
        assert_invariant(container, vid)
    assert client.get("/api/cart/101/").get_json()["items"] == []
    with sessions() as s:
        kinds = s.scalars(select(StockMovement.kind).where(StockMovement.order_id == order["id"])).all()
    assert sorted(kinds) == ["checkout", "checkout"]
    assert client.get(f"/api/orders/{order['id']}/").get_json() == order
    listed = client.get("/api/orders/?user_id=101").get_json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == order["id"]


def test_orders_are_listed_newest_first(client, sessions):
    vid = make_variant(sessions, on_hand=10)
    ids = []
    for _ in range(3):
        add(client, "eve", vid, 1)
        ids.append(client.post("/api/cart/eve/checkout/").get_json()["id"])
    listed = client.get("/api/orders/?user_id=eve").get_json()
    assert [o["id"] for o in listed["items"]] == list(reversed(ids))
    assert client.get("/api/orders/999999/").status_code == 404


def test_an_add_retried_with_the_same_key_reserves_once(client, container, sessions):
    vid = make_variant(sessions, on_hand=10)
    headers = {"Idempotency-Key": "add-1"}
    first = add(client, 3, vid, 2, headers=headers)
    second = add(client, 3, vid, 2, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.get_json() == second.get_json()
    assert counters(container, vid).reserved == 2
    assert add(client, 3, vid, 2, headers={"Idempotency-Key": "add-2"}).get_json()["item"]["quantity"] == 4


def test_racing_adds_with_one_key_reserve_once(client, container, sessions):
    vid = make_variant(sessions, on_hand=100)
    barrier = threading.Barrier(8)

    def go(_):
        barrier.wait()
        return add(client, "racer", vid, 1, headers={"Idempotency-Key": "same"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(go, range(8)))
    # each is the first result (replayed) or, while the first still runs, 409 with Retry-After
    done = [r for r in responses if r.status_code == 201]
    waiting = [r for r in responses if r.status_code == 409]
    assert len(done) + len(waiting) == 8, [r.get_json() for r in responses]
    assert done and len({r.get_data() for r in done}) == 1
    assert all(r.get_json()["error"]["code"] == "request_in_progress" and r.headers["Retry-After"] for r in waiting)
    assert counters(container, vid).reserved == 1
    retried = add(client, "racer", vid, 1, headers={"Idempotency-Key": "same"})
    assert retried.status_code == 201 and retried.get_data() == done[0].get_data()
    assert counters(container, vid).reserved == 1


def test_racing_checkouts_with_one_key_make_one_order(client, container, sessions):
    vid = make_variant(sessions, on_hand=10)
    add(client, "buyer", vid, 2)
    barrier = threading.Barrier(6)

    def go(_):
        barrier.wait()
        return client.post("/api/cart/buyer/checkout/", headers={"Idempotency-Key": "pay-1"})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(go, range(6)))
    done = [r for r in responses if r.status_code == 201]
    assert all(r.status_code in (201, 409) for r in responses), [r.get_json() for r in responses]
    assert done and len({r.get_json()["id"] for r in done}) == 1
    retried = client.post("/api/cart/buyer/checkout/", headers={"Idempotency-Key": "pay-1"})
    assert retried.status_code == 201 and retried.get_json()["id"] == done[0].get_json()["id"]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Order)) == 1
        assert s.scalar(select(func.count()).select_from(IdempotencyRecord)) == 1
    assert on_hand(sessions, vid) == 8
    assert_invariant(container, vid)


def test_fifty_concurrent_checkouts_sell_exactly_the_stock(client, container, sessions):
    vid = make_variant(sessions, on_hand=50)
    users = [f"shopper{i}" for i in range(50)]
    for user in users:
        assert add(client, user, vid, 1).status_code == 201
    barrier = threading.Barrier(len(users))

    def go(user):
        barrier.wait()
        return client.post(f"/api/cart/{user}/checkout/")

    with ThreadPoolExecutor(len(users)) as pool:
        responses = list(pool.map(go, users))
    assert [r.status_code for r in responses] == [201] * 50
    assert on_hand(sessions, vid) == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Order)) == 50
    live = assert_invariant(container, vid)
    assert (live.available, live.reserved) == (0, 0)


@pytest.mark.parametrize("point", ["checkout.after_lock", "checkout.after_commit", "checkout.after_finalize"])
def test_a_crash_at_any_checkout_step_heals_through_the_reconciler(client, container, sessions, point):
    vid = make_variant(sessions, on_hand=10)
    add(client, "crash", vid, 3)

    def die():
        raise faults.SimulatedCrash(point)

    faults.inject(point, die)
    try:
        with pytest.raises(faults.SimulatedCrash):
            client.post("/api/cart/crash/checkout/")
    finally:
        faults.clear()
    container.reconciler.reconcile(grace_ms=0)
    container.reconciler.reconcile(grace_ms=0)  # a second pass settles what the first unlocked or finalized
    with sessions() as s:
        orders = s.scalars(select(Order)).all()
    live = assert_invariant(container, vid)
    if point == "checkout.after_lock":
        assert orders == []
        assert on_hand(sessions, vid) == 10
        assert live.reserved == 3  # the hold is back to held: the shopper can still check out
        assert client.post("/api/cart/crash/checkout/").status_code == 201
        assert on_hand(sessions, vid) == 7
    else:
        assert len(orders) == 1
        with sessions() as s:
            assert s.get(Order, orders[0].id).lines[0].quantity == 3
        assert on_hand(sessions, vid) == 7
        assert (live.available, live.reserved) == (7, 0)
    assert_invariant(container, vid)


def test_a_database_failure_during_checkout_unlocks_the_holds(client, container, sessions, monkeypatch):
    vid = make_variant(sessions, on_hand=10)
    add(client, "dbfail", vid, 2)
    from sqlalchemy.exc import OperationalError

    def broken(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("database is gone"))

    monkeypatch.setattr(container.checkout, "_write_order", broken)
    response = client.post("/api/cart/dbfail/checkout/")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.get_json()["error"]["code"] == "unavailable"
    monkeypatch.undo()
    holds = container.holds.holds([(vid, f"{vid}~dbfail")])
    assert holds[0] is not None and holds[0].state == "held"
    assert client.post("/api/cart/dbfail/checkout/").status_code == 201
    assert on_hand(sessions, vid) == 8


def test_a_checkout_completed_by_the_reconciler_clears_its_cart_lines(client, container, sessions):
    vid = make_variant(sessions, on_hand=10)
    add(client, "healed", vid, 2)

    def die():
        raise faults.SimulatedCrash("after commit")

    faults.inject("checkout.after_commit", die)
    try:
        with pytest.raises(faults.SimulatedCrash):
            client.post("/api/cart/healed/checkout/")
    finally:
        faults.clear()
    report = container.reconciler.reconcile(grace_ms=0)
    assert report.locks_finalized == 1
    assert client.get("/api/cart/healed/").get_json()["items"] == []
    assert_invariant(container, vid)
