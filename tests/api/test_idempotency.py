"""Strict Idempotency-Key (API.md, Cart): a key names one request; reused for another it is 422,
retried while the first still runs it is 409 with Retry-After, retried after it the first result."""
from __future__ import annotations

import threading

import pytest

from tests.factories import make_variant

ADD = "/api/cart/add/"


def add(client, user, vid, qty, key, **extra):
    return client.post(ADD, json={"user_id": user, "variant_id": vid, "quantity": qty, **extra},
                       headers={"Idempotency-Key": key})


def available(client, vid) -> int:
    return client.get(f"/api/inventory/{vid}/").get_json()["available"]


def assert_reused(response):
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == "idempotency_key_reused"


def test_the_same_key_with_another_body_is_refused_and_reserves_nothing(client, sessions):
    vid = make_variant(sessions, on_hand=10)
    assert add(client, "ann", vid, 2, "k-1").status_code == 201
    assert available(client, vid) == 8
    assert_reused(add(client, "ann", vid, 3, "k-1"))
    assert_reused(add(client, "ann", vid, 2, "k-1", user_tier="GOLD"))
    assert available(client, vid) == 8
    assert client.get("/api/cart/ann/").get_json()["items"][0]["quantity"] == 2


def test_the_same_key_for_another_user_or_endpoint_is_refused(client, sessions):
    vid = make_variant(sessions, on_hand=10)
    first = add(client, "bob", vid, 1, "k-2")
    assert first.status_code == 201
    assert_reused(add(client, "eve", vid, 1, "k-2"))
    assert_reused(client.post("/api/cart/bob/checkout/", headers={"Idempotency-Key": "k-2"}))
    assert available(client, vid) == 9
    assert client.get("/api/orders/?user_id=bob").get_json()["total"] == 0
    assert client.get("/api/cart/eve/").get_json()["items"] == []
    again = add(client, "bob", vid, 1, "k-2")
    assert again.status_code == 201 and again.get_data() == first.get_data()


def test_a_refusal_is_replayed_too_and_a_new_key_runs_again(client, sessions):
    vid = make_variant(sessions, on_hand=1)
    refused = add(client, "cat", vid, 5, "k-3")
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "insufficient_stock"
    assert add(client, "cat", vid, 5, "k-3").get_data() == refused.get_data()
    assert add(client, "cat", vid, 1, "k-4").status_code == 201


def test_a_retry_while_the_first_request_runs_is_409_with_retry_after(client, container, sessions,
                                                                       monkeypatch):
    vid = make_variant(sessions, on_hand=10)
    entered, release = threading.Event(), threading.Event()
    real_add = container.cart.add

    def slow_add(*args, **kwargs):
        entered.set()
        assert release.wait(10)
        return real_add(*args, **kwargs)

    monkeypatch.setattr(container.cart, "add", slow_add)
    answers = {}
    first = threading.Thread(target=lambda: answers.setdefault("first", add(client, "dan", vid, 2, "k-5")))
    first.start()
    try:
        assert entered.wait(10)
        retry = add(client, "dan", vid, 2, "k-5")
        assert retry.status_code == 409
        assert retry.get_json()["error"]["code"] == "request_in_progress"
        assert int(retry.headers["Retry-After"]) >= 1
        assert_reused(add(client, "dan", vid, 3, "k-5"))  # another body: refused even while pending
    finally:
        release.set()
        first.join(10)
    assert answers["first"].status_code == 201
    assert add(client, "dan", vid, 2, "k-5").get_data() == answers["first"].get_data()
    assert available(client, vid) == 8


@pytest.mark.parametrize("n", [16])
def test_concurrent_requests_with_one_key_reserve_exactly_once(client, sessions, n):
    vid = make_variant(sessions, on_hand=100)
    barrier = threading.Barrier(n)
    responses = [None] * n

    def go(i):
        barrier.wait()
        responses[i] = add(client, "eli", vid, 3, "k-6")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {201, 409} and 201 in codes, codes
    assert len({r.get_data() for r in responses if r.status_code == 201}) == 1
    assert available(client, vid) == 97
    inventory = client.get(f"/api/inventory/{vid}/").get_json()
    assert inventory["available"] + inventory["reserved"] == inventory["on_hand"]
