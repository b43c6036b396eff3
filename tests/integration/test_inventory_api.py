"""Inventory endpoints (API.md, Inventory): on_hand in the database and the live counters change together,
each change writes one ledger row, and a refused change writes nothing anywhere.
"""
from __future__ import annotations

import re
import threading

import pytest
from sqlalchemy import select

from app import keys
from persistence.models import Stock, StockMovement
from tests.factories import make_variant, on_hand

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ROW_KEYS = {"variant_id", "sku", "on_hand", "available", "reserved", "active_holds", "updated_at"}
TTL = 600_000


def ledger(sessions, vid) -> list[tuple[int, int, str, str, str]]:
    with sessions() as s:
        rows = s.scalars(select(StockMovement).where(StockMovement.variant_id == vid)
                         .order_by(StockMovement.id))
        return [(m.delta, m.on_hand_after, m.kind, m.reason, m.actor) for m in rows]


def db_version(sessions, vid) -> int:
    with sessions() as s:
        return s.get(Stock, vid).version


def snapshot(container, sessions, redis_client, vid) -> tuple:
    """Everything an adjustment could change, to show a refused one changed nothing."""
    c = container.holds.counters([vid])[vid]
    return (on_hand(sessions, vid), db_version(sessions, vid), ledger(sessions, vid),
            c.available, c.reserved, c.version, redis_client.hget(keys.stock(vid), "adj_pending"))


def assert_in_step(container, sessions, vid) -> None:
    c = container.holds.counters([vid])[vid]
    assert c.available + c.reserved == on_hand(sessions, vid)
    assert c.version == db_version(sessions, vid)


@pytest.fixture
def vid(sessions) -> int:
    return make_variant(sessions, on_hand=10, sku="AERO-8GB")


# --- reads ----------------------------------------------------------------------------------------

def test_the_stock_list_shows_on_hand_beside_the_live_counters(client, container, sessions, vid):
    other = make_variant(sessions, on_hand=4)
    container.holds.reserve(vid, "u1", 3, ttl_ms=TTL)
    container.holds.reserve(vid, "u2", 1, ttl_ms=TTL)
    response = client.get("/api/inventory/")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["page"], body["per_page"], body["total"]) == (1, 50, 2)
    rows = {row["variant_id"]: row for row in body["items"]}
    assert set(rows[vid]) == ROW_KEYS
    assert {k: rows[vid][k] for k in ("sku", "on_hand", "available", "reserved", "active_holds")} == {
        "sku": "AERO-8GB", "on_hand": 10, "available": 6, "reserved": 4, "active_holds": 2}
    assert (rows[other]["on_hand"], rows[other]["available"], rows[other]["reserved"]) == (4, 4, 0)


def test_the_stock_list_pages(client, sessions, vid):
    make_variant(sessions, on_hand=1)
    make_variant(sessions, on_hand=2)
    body = client.get("/api/inventory/?page=2&per_page=2").get_json()
    assert (body["page"], body["per_page"], body["total"]) == (2, 2, 3)
    assert [row["on_hand"] for row in body["items"]] == [2]


def test_one_variants_stock_row_is_live(client, container, vid):
    container.holds.reserve(vid, "u1", 2, ttl_ms=TTL)
    body = client.get(f"/api/inventory/{vid}/").get_json()
    fields = ("variant_id", "on_hand", "available", "reserved", "active_holds")
    assert tuple(body[f] for f in fields) == (vid, 10, 8, 2, 1)
    assert ISO_Z.match(body["updated_at"])


def test_an_unknown_variant_is_404_for_every_inventory_route(client, sessions, vid):
    before = ledger(sessions, vid)
    for response in (client.get("/api/inventory/999999/"),
                     client.post("/api/inventory/999999/adjust/", json={"delta": 1, "reason": "x"}),
                     client.put("/api/inventory/999999/", json={"on_hand": 1, "reason": "x"})):
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"
    assert ledger(sessions, vid) == before
    with sessions() as s:
        assert s.scalars(select(StockMovement).where(StockMovement.variant_id == 999999)).first() is None


# --- changes --------------------------------------------------------------------------------------

def test_adjusting_changes_the_database_and_the_counters_together_with_a_ledger_row(
        client, container, sessions, vid):
    container.holds.reserve(vid, "u1", 2, ttl_ms=TTL)
    response = client.post(f"/api/inventory/{vid}/adjust/", json={"delta": 5, "reason": "restock"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["on_hand"], body["available"], body["reserved"]) == (15, 13, 2)
    assert on_hand(sessions, vid) == 15
    assert ledger(sessions, vid)[-1] == (5, 15, "adjust", "restock", "admin")

    body = client.post(f"/api/inventory/{vid}/adjust/", json={"delta": -4, "reason": "damaged"}).get_json()
    assert (body["on_hand"], body["available"], body["reserved"]) == (11, 9, 2)
    assert ledger(sessions, vid)[-1] == (-4, 11, "adjust", "damaged", "admin")
    assert len(ledger(sessions, vid)) == 3  # initial, +5, -4
    assert_in_step(container, sessions, vid)


def test_setting_on_hand_changes_both_stores_and_writes_the_difference_to_the_ledger(
        client, container, sessions, vid):
    container.holds.reserve(vid, "u1", 2, ttl_ms=TTL)
    response = client.put(f"/api/inventory/{vid}/", json={"on_hand": 4, "reason": "stock count"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["on_hand"], body["available"], body["reserved"]) == (4, 2, 2)
    assert on_hand(sessions, vid) == 4
    assert ledger(sessions, vid)[-1] == (-6, 4, "set", "stock count", "admin")

    body = client.put(f"/api/inventory/{vid}/", json={"on_hand": 30, "reason": "delivery"}).get_json()
    assert (body["on_hand"], body["available"]) == (30, 28)
    assert ledger(sessions, vid)[-1] == (26, 30, "set", "delivery", "admin")
    assert_in_step(container, sessions, vid)


def test_an_adjustment_that_would_make_available_negative_is_409_and_changes_nothing(
        client, container, sessions, redis_client, vid):
    container.holds.reserve(vid, "u1", 8, ttl_ms=TTL)
    before = snapshot(container, sessions, redis_client, vid)
    response = client.post(f"/api/inventory/{vid}/adjust/", json={"delta": -3, "reason": "shrinkage"})
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "stock_below_reserved"
    assert error["details"] == {"variant_id": vid, "available": 2, "delta": -3}
    put = client.put(f"/api/inventory/{vid}/", json={"on_hand": 7, "reason": "count"})
    assert put.status_code == 409
    assert put.get_json()["error"]["code"] == "stock_below_reserved"
    assert snapshot(container, sessions, redis_client, vid) == before


@pytest.mark.parametrize("route, method, body", [
    ("adjust/", "post", {"delta": 2}),                          # reason missing
    ("adjust/", "post", {"delta": 2, "reason": ""}),            # reason empty
    ("adjust/", "post", {"delta": "2", "reason": "restock"}),   # a string is not an integer
    ("adjust/", "post", {"delta": 2.5, "reason": "restock"}),
    ("adjust/", "post", {"reason": "restock"}),                 # delta missing
    ("", "put", {"on_hand": -1, "reason": "count"}),            # negative stock
    ("", "put", {"on_hand": "5", "reason": "count"}),
    ("", "put", {"on_hand": 5}),
])
def test_an_invalid_change_is_a_validation_error_and_writes_nothing(
        client, container, sessions, redis_client, vid, route, method, body):
    container.holds.reserve(vid, "u1", 1, ttl_ms=TTL)
    before = snapshot(container, sessions, redis_client, vid)
    response = getattr(client, method)(f"/api/inventory/{vid}/{route}", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "validation_error"
    assert snapshot(container, sessions, redis_client, vid) == before


def test_concurrent_adjustments_each_land_once_in_both_stores_and_the_ledger(app, container, sessions, vid):
    barrier = threading.Barrier(8)
    statuses: list[int] = []

    def adjust():
        client = app.test_client()
        barrier.wait()
        for _ in range(3):
            statuses.append(client.post(f"/api/inventory/{vid}/adjust/",
                                        json={"delta": 1, "reason": "restock"}).status_code)

    threads = [threading.Thread(target=adjust) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 24
    assert on_hand(sessions, vid) == 34
    assert [row[1] for row in ledger(sessions, vid)[1:]] == list(range(11, 35))
    c = container.holds.counters([vid])[vid]
    assert (c.available, c.reserved, c.version) == (34, 0, 24)
    assert_in_step(container, sessions, vid)


# --- auth -----------------------------------------------------------------------------------------

def test_inventory_routes_need_an_admin_key(auth_env, client, sessions, admin_headers, storefront_headers):
    vid = make_variant(sessions, on_hand=10)
    adjust = {"delta": 1, "reason": "restock"}
    assert client.get("/api/inventory/").status_code == 401
    wrong = {"Authorization": "Bearer wrong-key-123"}
    assert client.get(f"/api/inventory/{vid}/", headers=wrong).status_code == 401
    response = client.post(f"/api/inventory/{vid}/adjust/", json=adjust)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    response = client.post(f"/api/inventory/{vid}/adjust/", json=adjust, headers=storefront_headers)
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"
    assert client.put(f"/api/inventory/{vid}/", json={"on_hand": 1, "reason": "x"},
                      headers=storefront_headers).status_code == 403
    assert client.post("/api/ops/reconcile/", headers=storefront_headers).status_code == 403
    assert on_hand(sessions, vid) == 10 and len(ledger(sessions, vid)) == 1

    assert client.get("/api/inventory/", headers=admin_headers).status_code == 200
    response = client.post(f"/api/inventory/{vid}/adjust/", json=adjust, headers=admin_headers)
    assert response.status_code == 200
    assert ledger(sessions, vid)[-1] == (1, 11, "adjust", "restock", "admin")
