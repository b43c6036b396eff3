"""Bundle add (API.md, Bundle add): several lines reserved, priced and added all or nothing,
through the HTTP API against real Redis (one server, or a 3-primary cluster with --redis-cluster)
and a real database."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from decimal import Decimal

import pytest

from app import clock, keys
from app.embedded import free_port
from app.engine.holdrec import hold_id_for
from app.settings import ROOT
from persistence.models import PricingRule
from tests.conftest import wait_for
from tests.factories import make_variant, on_hand

BUNDLE = "/api/cart/bundle/"


def bundle(client, user, lines, **extra):
    """POST a bundle; `lines` are (variant_id, quantity) or (variant_id, quantity, price)."""
    headers = extra.pop("headers", {})
    items = [{"variant_id": line[0], "quantity": line[1], **({"price": line[2]} if len(line) > 2 else {})}
             for line in lines]
    return client.post(BUNDLE, json={"user_id": user, "items": items, **extra}, headers=headers)


def add(client, user, vid, qty, **extra):
    return client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid, "quantity": qty, **extra})


def stock(container, vids) -> dict[int, tuple[int, int]]:
    """(available, reserved) per variant, each checked against available + reserved == on_hand."""
    live = container.holds.counters(list(vids))
    out = {}
    for vid in vids:
        c = live[vid]
        assert c.available >= 0
        assert c.available + c.reserved == on_hand(container.sessions, vid), vid
        out[vid] = (c.available, c.reserved)
    return out


def held_units(container, vid) -> dict[str, int]:
    """user -> units of that user's live hold of the variant, read from the hold records."""
    from app.engine.holdrec import unpack_hold

    records = container.redis.hgetall(keys.holds(vid))
    return {h.user: h.quantity for h in map(unpack_hold, records.values()) if h}


def variants_on_separate_slots(container, count: int, cluster_mode: bool, **kwargs) -> list[int]:
    """`count` new variants of distinct hash slots, sorted by slot; on a cluster they must span
    more than one primary, or the test would not cross nodes."""
    vids = [make_variant(container.sessions, **kwargs) for _ in range(count)]
    assert len({keys.variant_slot(v) for v in vids}) == count
    if cluster_mode:
        nodes = {container.redis.get_node_from_key(keys.stock(v)).name for v in vids}
        assert len(nodes) > 1, "the variants of this test all live on one primary"
    return sorted(vids, key=keys.variant_slot)


@pytest.fixture
def seed_rules(sessions):
    with sessions.begin() as s:
        s.add(PricingRule(name="Bulk 5+", type="BULK", priority=1, percent=Decimal("10.00"), min_quantity=5,
                          active=True))
        s.add(PricingRule(name="Gold tier", type="USER_TIER", priority=2, percent=Decimal("5.00"), tier="GOLD",
                          active=True))


# --- success ---------------------------------------------------------------------------------------

def test_a_bundle_of_three_is_added_with_its_items_in_the_order_sent_and_the_cart_shows_them(
        client, container, cluster_mode, seed_rules):
    a, b, c = variants_on_separate_slots(container, 3, cluster_mode, on_hand=20, base_price="100.00")
    sent = [(c, 5), (a, 1), (b, 2)]  # not in slot order: the answer keeps the order sent
    response = bundle(client, "ann", sent, user_tier="GOLD")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    items = body["items"]
    assert [(i["variant_id"], i["quantity"]) for i in items] == sent
    # priced as single adds would be: bulk 5+ and gold on the first line, gold alone on the others
    assert [i["unit_price"] for i in items] == ["85.50", "95.00", "95.00"]
    assert [i["line_total"] for i in items] == ["427.50", "95.00", "190.00"]
    assert {i["status"] for i in items} == {"held"}
    assert [i["id"] for i in items] == [hold_id_for(v, "ann") for v, _ in sent]
    assert body["cart"]["subtotal"] == "712.50"
    cart = client.get("/api/cart/ann/").get_json()
    assert cart == body["cart"]
    assert sorted(cart["items"], key=lambda i: i["id"]) == sorted(items, key=lambda i: i["id"])
    assert stock(container, [a, b, c]) == {c: (15, 5), a: (19, 1), b: (18, 2)}


def test_a_bundle_merges_into_existing_lines_repricing_and_renewing_them(client, container, cluster_mode,
                                                                         seed_rules):
    a, b = variants_on_separate_slots(container, 2, cluster_mode, on_hand=20, base_price="100.00")
    first = add(client, "bea", a, 2).get_json()["item"]
    assert first["unit_price"] == "100.00"
    before = container.holds.holds([(a, first["id"])])[0]
    # the shown price is the one at the merged quantity (2 + 3 = 5: bulk applies), as a single add's
    response = bundle(client, "bea", [(a, 3, "90.00"), (b, 1, "100.00")])
    assert response.status_code == 201, response.get_json()
    merged, new = response.get_json()["items"]
    assert merged["id"] == first["id"]
    assert (merged["quantity"], merged["unit_price"], merged["line_total"]) == (5, "90.00", "450.00")
    assert (new["quantity"], new["unit_price"]) == (1, "100.00")
    after = container.holds.holds([(a, first["id"])])[0]
    assert after.gen == before.gen and after.quantity == 5
    assert after.expires_ms >= before.expires_ms and merged["reserved_until"] >= first["reserved_until"]
    cart = client.get("/api/cart/bea/").get_json()
    assert len(cart["items"]) == 2 and cart["subtotal"] == "550.00"
    assert stock(container, [a, b]) == {a: (15, 5), b: (19, 1)}


def test_a_user_named_bundle_still_has_a_cart_of_its_own(client, container):
    vid = make_variant(container.sessions, on_hand=5)
    assert add(client, "bundle", vid, 1).status_code == 201
    cart = client.get("/api/cart/bundle/")
    assert cart.status_code == 200
    assert [i["variant_id"] for i in cart.get_json()["items"]] == [vid]


# --- refusals: that line's error, nothing held ------------------------------------------------------

def test_a_line_short_of_stock_leaves_nothing_held_and_the_cart_unchanged(client, container, cluster_mode):
    a, b, c = variants_on_separate_slots(container, 3, cluster_mode, on_hand=10)
    # the refused line is the 3rd sent and in the last slot: on a cluster the two slots before it
    # are reserved first and must be given back
    assert add(client, "cal", a, 2).status_code == 201
    assert add(client, "rival", c, 9).status_code == 201
    cart_before = client.get("/api/cart/cal/").get_json()
    hold_before = container.holds.holds([(a, hold_id_for(a, "cal"))])[0]
    counts_before = stock(container, [a, b, c])

    response = bundle(client, "cal", [(a, 3), (b, 4), (c, 2)])
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "insufficient_stock"
    assert error["details"] == {"variant_id": c, "available": 1, "requested": 2}
    assert error["message"] == "Only 1 units available, requested 2"
    assert stock(container, [a, b, c]) == counts_before
    # the line it would have merged into is exactly as it was: units, expiry, generation
    assert container.holds.holds([(a, hold_id_for(a, "cal"))])[0] == hold_before
    assert held_units(container, b) == {}
    assert client.get("/api/cart/cal/").get_json() == cart_before


def test_a_shown_price_that_differs_is_a_conflict_naming_the_line_and_reserves_nothing(client, container,
                                                                                      cluster_mode):
    a, b = variants_on_separate_slots(container, 2, cluster_mode, on_hand=10, base_price="100.00")
    response = bundle(client, "dee", [(a, 1, "100.00"), (b, 1, "99.00")])
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "price_changed"
    assert error["details"] == {"variant_id": b, "current_price": "100.00", "price": "99.00"}
    assert stock(container, [a, b]) == {a: (10, 0), b: (10, 0)}
    assert client.get("/api/cart/dee/").get_json()["items"] == []


def test_an_inactive_product_refuses_the_bundle_naming_its_line(client, container):
    active = make_variant(container.sessions, on_hand=10)
    draft = make_variant(container.sessions, on_hand=10, status="draft")
    response = bundle(client, "eve", [(active, 1), (draft, 1)])
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "product_not_active"
    assert error["details"]["variant_id"] == draft
    assert stock(container, [active, draft]) == {active: (10, 0), draft: (10, 0)}


def test_an_unknown_variant_is_not_found_naming_it_and_reserves_nothing(client, container):
    vid = make_variant(container.sessions, on_hand=10)
    response = bundle(client, "fay", [(vid, 1), (999_999, 1)])
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["code"] == "not_found"
    assert error["details"]["variant_id"] == 999_999
    assert stock(container, [vid]) == {vid: (10, 0)}


@pytest.fixture
def capped(env, build_app):
    """(client, container) of an app with MAX_UNITS_PER_CUSTOMER=3."""
    env["MAX_UNITS_PER_CUSTOMER"] = "3"
    return build_app(env)


def test_the_per_customer_limit_refuses_the_bundle_counting_what_is_already_held(capped, cluster_mode):
    client, container = capped
    a, b = variants_on_separate_slots(container, 2, cluster_mode, on_hand=10)
    assert add(client, "gil", b, 2).status_code == 201
    response = bundle(client, "gil", [(a, 3), (b, 2)])
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "limit_exceeded"
    assert error["details"] == {"variant_id": b, "limit": 3, "already": 2, "requested": 2}
    assert stock(container, [a, b]) == {a: (10, 0), b: (8, 2)}
    assert container.redis.hget(keys.customer_units(a), "gil") is None
    assert bundle(client, "gil", [(a, 3), (b, 1)]).status_code == 201
    assert stock(container, [a, b]) == {a: (7, 3), b: (7, 3)}


def test_a_variant_sent_twice_is_a_validation_error_naming_the_field(client, container):
    vid = make_variant(container.sessions, on_hand=10)
    response = bundle(client, "hal", [(vid, 1), (vid, 2)])
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert list(error["details"]["items"]["1"]) == ["variant_id"]
    assert stock(container, [vid]) == {vid: (10, 0)}


@pytest.mark.parametrize("count", [0, 51])
def test_no_line_or_more_than_fifty_is_a_validation_error(client, container, count):
    vid = make_variant(container.sessions, on_hand=10)
    response = client.post(BUNDLE, json={"user_id": "ian", "items": [
        {"variant_id": vid + i, "quantity": 1} for i in range(count)]})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and "items" in error["details"]
    assert stock(container, [vid]) == {vid: (10, 0)}


@pytest.mark.parametrize("body, field", [
    ({"user_id": "jo", "items": [{"variant_id": 1, "quantity": 0}]}, "items"),
    ({"user_id": "jo", "items": [{"variant_id": 1, "quantity": 1, "extra": 1}]}, "items"),
    ({"user_id": "jo", "items": "nope"}, "items"),
    ({"user_id": "jo"}, "items"),
    ({"user_id": "bad id!", "items": [{"variant_id": 1, "quantity": 1}]}, "user_id"),
    ({"user_id": "jo", "user_tier": "GOLD\n", "items": [{"variant_id": 1, "quantity": 1}]}, "user_tier"),
    ({"user_id": "jo", "items": [{"variant_id": 1, "quantity": 1, "price": "1.234"}]}, "items"),
])
def test_bad_bundle_input_is_a_validation_error(client, body, field):
    response = client.post(BUNDLE, json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and field in error["details"], error


# --- idempotency -----------------------------------------------------------------------------------

def test_the_same_key_and_body_replays_the_first_answer_and_reserves_once(client, container, cluster_mode):
    a, b = variants_on_separate_slots(container, 2, cluster_mode, on_hand=10)
    key = {"Idempotency-Key": "bundle-k-1"}
    first = bundle(client, "kim", [(a, 2), (b, 3)], headers=key)
    assert first.status_code == 201
    again = bundle(client, "kim", [(a, 2), (b, 3)], headers=key)
    assert again.status_code == 201 and again.get_data() == first.get_data()
    assert stock(container, [a, b]) == {a: (8, 2), b: (7, 3)}

    other_body = bundle(client, "kim", [(a, 2), (b, 4)], headers=key)
    assert other_body.status_code == 422
    assert other_body.get_json()["error"]["code"] == "idempotency_key_reused"
    other_endpoint = client.post("/api/cart/add/", json={"user_id": "kim", "variant_id": a, "quantity": 2},
                                 headers=key)
    assert other_endpoint.status_code == 422
    assert stock(container, [a, b]) == {a: (8, 2), b: (7, 3)}


def test_a_refused_bundle_is_replayed_with_its_refusal(client, container):
    vid = make_variant(container.sessions, on_hand=1)
    key = {"Idempotency-Key": "bundle-k-2"}
    refused = bundle(client, "lou", [(vid, 2)], headers=key)
    assert refused.status_code == 400
    assert bundle(client, "lou", [(vid, 2)], headers=key).get_data() == refused.get_data()
    assert stock(container, [vid]) == {vid: (1, 0)}


def test_a_retry_of_a_bundle_that_died_half_way_gives_back_what_it_held_first(client, container, cluster_mode,
                                                                             redis_client):
    from app import faults

    a, b, c = variants_on_separate_slots(container, 3, cluster_mode, on_hand=10)
    assert add(client, "max", a, 1).status_code == 201
    key = {"Idempotency-Key": "bundle-k-3"}

    def die():
        raise faults.SimulatedCrash()  # a BaseException: nothing is cleaned up, as in a killed process

    faults.inject("bundle.after_slot", die)
    try:
        with pytest.raises(faults.SimulatedCrash):
            bundle(client, "max", [(a, 2), (b, 2), (c, 2)], headers=key)
    finally:
        faults.clear()
    # the first slot's units are held (all of them on one Redis), no line was written
    held = {v: held_units(container, v).get("max", 0) for v in (a, b, c)}
    assert held[a] == 3 and sum(held.values()) == (7 if not cluster_mode else 3)
    # the dead request's marker lapses after a minute; here it is removed instead of waited for
    redis_client.delete(keys.idempotency("bundle-k-3"))

    retry = bundle(client, "max", [(a, 2), (b, 2), (c, 2)], headers=key)
    assert retry.status_code == 201, retry.get_json()
    assert [i["quantity"] for i in retry.get_json()["items"]] == [3, 2, 2]  # not 5, 4, 4
    assert stock(container, [a, b, c]) == {a: (7, 3), b: (8, 2), c: (8, 2)}


# --- concurrency -----------------------------------------------------------------------------------

def test_sixty_four_concurrent_overlapping_bundles_never_oversell_nor_keep_units_of_a_refused_one(
        client, container, cluster_mode):
    vids = variants_on_separate_slots(container, 6, cluster_mode, on_hand=12)
    rng = random.Random(7)
    wants = [[(v, rng.randint(1, 3)) for v in rng.sample(vids, 3)] for _ in range(64)]
    barrier = threading.Barrier(64)
    answers: list = [None] * 64

    def shop(i):
        barrier.wait()
        answers[i] = bundle(client, f"shopper{i}", wants[i])

    threads = [threading.Thread(target=shop, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    codes = [a.status_code for a in answers]
    assert set(codes) <= {201, 400}, codes
    won = [i for i, code in enumerate(codes) if code == 201]
    assert won and len(won) < 64  # 64 * 3 lines of 2 units on average against 72 units: some must lose
    for answer in answers:
        if answer.status_code == 400:
            assert answer.get_json()["error"]["code"] == "insufficient_stock"

    counts = stock(container, vids)
    for vid in vids:
        # every unit reserved belongs to a line of a bundle that answered 201, exactly
        expected = {f"shopper{i}": q for i in won for v, q in wants[i] if v == vid}
        assert held_units(container, vid) == expected
        assert counts[vid][1] == sum(expected.values()) <= 12
    for i in won:
        cart = client.get(f"/api/cart/shopper{i}/").get_json()
        assert sorted((x["variant_id"], x["quantity"]) for x in cart["items"]) == sorted(wants[i])


# --- a process killed half-way ----------------------------------------------------------------------

SERVER = """
import sys
from werkzeug.serving import make_server
from app import create_app
server = make_server("127.0.0.1", int(sys.argv[1]), create_app(), threaded=True)
print("serving", flush=True)
server.serve_forever()
"""


def _post(port: int, path: str, body: dict, timeout: float = 30):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_process_killed_between_slots_leaves_only_holds_that_lapse(container, env, cluster_mode, tmp_path,
                                                                     client):
    a, b, c = variants_on_separate_slots(container, 3, cluster_mode, on_hand=10)
    port = free_port()
    pause_file = tmp_path / "paused"
    log = open(tmp_path / "web.log", "wb")
    web = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, **env, "FAULT_PAUSE_AT": "bundle.after_slot",
                                "FAULT_PAUSE_FILE": str(pause_file), "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: _up(port) or web.poll() is not None, timeout=30, interval=0.1, message="web process up")
        assert web.poll() is None, (tmp_path / "web.log").read_text()
        outcome: dict = {}

        def shop():
            try:
                outcome["answer"] = _post(port, BUNDLE, {"user_id": "ned", "items": [
                    {"variant_id": v, "quantity": 2} for v in (c, a, b)]})
            except OSError as exc:  # the connection dies with the process
                outcome["error"] = type(exc).__name__

        shopper = threading.Thread(target=shop, daemon=True)
        shopper.start()
        wait_for(pause_file.exists, timeout=20, message="the web process to pause after its first slot")
        web.send_signal(signal.SIGKILL)
        web.wait(10)
        shopper.join(20)
        assert "answer" not in outcome, outcome
    finally:
        if web.poll() is None:
            web.kill()
            web.wait(10)
        log.close()

    # what it took before dying: the first slot (a's, the lowest) on a cluster, every line on one
    # Redis (one script); no cart line either way
    held = {v: held_units(container, v).get("ned", 0) for v in (a, b, c)}
    assert held == ({a: 2, b: 0, c: 0} if cluster_mode else {a: 2, b: 2, c: 2})
    assert client.get("/api/cart/ned/").get_json()["items"] == []
    stock(container, [a, b, c])

    # it lapses like any hold: the sweep after the hold's time gives every unit back
    report = container.sweeper.sweep(now=clock.now_ms() + container.holds.ttl_ms + 1)
    assert report.units == sum(held.values())
    assert stock(container, [a, b, c]) == {a: (10, 0), b: (10, 0), c: (10, 0)}
    assert all(held_units(container, v) == {} for v in (a, b, c))
