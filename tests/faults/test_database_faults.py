"""The database goes away in the middle of a checkout.

A TCP proxy (tests/faults/proxy.py) sits between the app and Postgres and is cut from a fault hook
at the exact step under test. SQLite has no network connection to cut (making its file unreachable
is a different failure), so these run on Postgres only; CI runs them there.
"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from app import clock, faults
from app.composition import Container
from app.settings import load_settings
from persistence.models import Order, StockMovement
from tests.factories import make_variant
from tests.faults.conftest import assert_orders_durable, assert_stock_exact, is_postgres
from tests.faults.proxy import TcpProxy


@pytest.fixture
def db_proxy(database_url):
    if not is_postgres(database_url):
        pytest.skip("needs Postgres (DATABASE_URL=postgresql://...): an SQLite file has no connection "
                    "to cut; CI runs this on Postgres")
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, proxied
    proxy.cut()


@pytest.fixture
def direct(env, clean_stores):
    """A container on the real database (not through the proxy), for the checks."""
    c = Container(load_settings(env))
    yield c
    c.close()


@pytest.fixture(autouse=True)
def _no_hooks_left():
    yield
    faults.clear()


def _orders(c) -> int:
    with c.sessions() as s:
        return s.scalar(select(func.count()).select_from(Order))


def _checkout_movements(c) -> int:
    with c.sessions() as s:
        return s.scalar(select(func.count()).select_from(StockMovement).where(StockMovement.kind == "checkout"))


def test_the_database_cut_during_checkout_writes_nothing_and_keeps_the_holds(base_env, build, db_proxy, direct,
                                                                            capsys):
    proxy, proxied = db_proxy
    client, c = build({**base_env, "DATABASE_URL": proxied})
    a, b = make_variant(direct.sessions, on_hand=10), make_variant(direct.sessions, on_hand=5)
    for vid, qty in ((a, 3), (b, 2)):
        assert client.post("/api/cart/add/", json={"user_id": "dbcut", "variant_id": vid,
                                                   "quantity": qty}).status_code == 201
    before = {h.gen: h for h in direct.holds.holds([(a, f"{a}~dbcut"), (b, f"{b}~dbcut")])}

    faults.inject("checkout.after_lock", proxy.cut)
    started = time.monotonic()
    response = client.post("/api/cart/dbcut/checkout/")
    took = time.monotonic() - started
    faults.clear()

    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "unavailable"
    assert response.headers["Retry-After"]
    assert client.get("/readyz").status_code == 503
    # nothing half-written: no order, no ledger row, on_hand untouched
    assert _orders(direct) == 0 and _checkout_movements(direct) == 0
    assert assert_stock_exact(direct, [a, b]) == {a: (10, 7, 3), b: (5, 3, 2)}
    # the holds are unlocked, the same holds as before, and still valid
    now = clock.now_ms()
    for hold in direct.holds.holds([(a, f"{a}~dbcut"), (b, f"{b}~dbcut")]):
        assert hold is not None and hold.state == "held" and hold.gen in before and hold.expires_ms > now
    assert {i["status"] for i in client.get("/api/cart/dbcut/").get_json()["items"]} == {"held"}

    proxy.restore()
    again = client.post("/api/cart/dbcut/checkout/")
    assert again.status_code == 201, again.get_json()
    assert_orders_durable(direct, [again.get_json()])
    assert assert_stock_exact(direct, [a, b]) == {a: (7, 7, 0), b: (3, 3, 0)}
    with capsys.disabled():
        print(f"\n[database cut after lock] 503 in {took * 1000:.0f} ms, nothing written, holds held; "
              f"checkout 201 once the database is back")


def test_a_commit_whose_answer_is_lost_is_never_sold_twice(base_env, build, db_proxy, direct, capsys):
    """The server commits the order, then the connection dies before the app hears so."""
    proxy, proxied = db_proxy
    client, c = build({**base_env, "DATABASE_URL": proxied})
    vid = make_variant(direct.sessions, on_hand=10)
    assert client.post("/api/cart/add/", json={"user_id": "lost", "variant_id": vid, "quantity": 4}).status_code == 201

    faults.inject("checkout.after_lock", proxy.cut_after_commit)
    response = client.post("/api/cart/lost/checkout/", headers={"Idempotency-Key": "pay-lost-1"})
    faults.clear()
    assert proxy.commits_swallowed == 1
    assert response.status_code == 503, response.get_json()
    assert response.headers["Retry-After"]

    # The order is committed; the app could not know, so it left the hold locked, not released.
    assert _orders(direct) == 1
    hold = direct.holds.holds([(vid, f"{vid}~lost")])[0]
    assert hold is not None and hold.state == "locked"

    proxy.restore()
    # A retry without the key cannot buy the same units again...
    again = client.post("/api/cart/lost/checkout/")
    assert again.status_code == 409, again.get_json()
    # ...and with the key it gets the order that was committed.
    same = client.post("/api/cart/lost/checkout/", headers={"Idempotency-Key": "pay-lost-1"})
    assert same.status_code == 201, same.get_json()
    assert_orders_durable(direct, [same.get_json()])

    report = direct.reconciler.reconcile(grace_ms=0)
    assert report.locks_finalized == 1 and report.locks_released == 0
    direct.reconciler.reconcile(grace_ms=0)
    assert assert_stock_exact(direct, [vid]) == {vid: (6, 6, 0)}
    assert _orders(direct) == 1
    with capsys.disabled():
        print("\n[commit answer lost, database still down] 503, hold left locked, retry without key 409, "
              "with key 201 (same order), reconciler finalized it: 4 units sold once")


def test_a_commit_whose_answer_is_lost_is_finished_when_the_database_answers_again(base_env, build, db_proxy,
                                                                                   direct):
    proxy, proxied = db_proxy
    client, c = build({**base_env, "DATABASE_URL": proxied})
    vid = make_variant(direct.sessions, on_hand=10)
    assert client.post("/api/cart/add/", json={"user_id": "blip", "variant_id": vid, "quantity": 3}).status_code == 201

    faults.inject("checkout.after_lock", lambda: proxy.cut_after_commit(keep_listening=True))
    response = client.post("/api/cart/blip/checkout/")
    faults.clear()
    assert proxy.commits_swallowed == 1
    # the app asked the database whether the order is there, found it and finished the checkout
    assert response.status_code == 201, response.get_json()
    assert_orders_durable(direct, [response.get_json()])
    assert _orders(direct) == 1
    assert assert_stock_exact(direct, [vid]) == {vid: (7, 7, 0)}
    assert client.get("/api/cart/blip/").get_json()["items"] == []
