"""HOLD_DURABILITY=replicated: an add answers 201 only once a replica has its hold (WAIT 1 <ms>),
and otherwise gives back what it reserved and answers 503 `unavailable`. Against a real primary
with a real replica (replicaof), which a test stops with SIGSTOP to keep it from acknowledging."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest
import redis as redis_lib

from app import keys
from app.embedded import EmbeddedRedis
from app.engine.holdrec import hold_id_for
from tests.conftest import wait_for
from tests.factories import make_variant, on_hand

pytestmark = pytest.mark.single_node

TIMEOUT_MS = 150


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(primary, replica): two redis-servers, the second a replica of the first, in sync."""
    base = tmp_path_factory.mktemp("durability")
    primary = EmbeddedRedis(base / "primary").start()
    replica = EmbeddedRedis(base / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    client = redis_lib.Redis(port=primary.port, decode_responses=True)
    try:
        wait_for(lambda: client.info("replication")["connected_slaves"] == 1
                 and client.info("replication")["slave0"]["state"] == "online", 10, message="replica in sync")
        yield primary, replica
    finally:
        client.close()
        replica.stop()
        primary.stop()


@pytest.fixture
def primary_env(env, pair):
    primary, _ = pair
    redis_lib.Redis(port=primary.port).flushdb()
    return {**env, "REDIS_URL": primary.url, "REDIS_CLUSTER": "0", "HOLD_REPLICA_TIMEOUT_MS": str(TIMEOUT_MS)}


@contextmanager
def stopped(server: EmbeddedRedis):
    """The server's process stopped (SIGSTOP): connected, but it acknowledges nothing."""
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def add(client, user, vid, qty):
    return client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid, "quantity": qty})


def state(container, sessions, vid, user):
    """(available, reserved, the user's cart) with the invariant checked."""
    live = container.holds.counters([vid])[vid]
    assert live.available + live.reserved == on_hand(sessions, vid)
    return live.available, live.reserved, container.redis.hgetall(keys.cart(user))


def test_replicated_add_is_on_the_replica_when_it_answers(build_app, primary_env, pair, sessions):
    _, replica = pair
    client, container = build_app({**primary_env, "HOLD_DURABILITY": "replicated"})
    vid = make_variant(sessions, on_hand=10)
    on_replica = redis_lib.Redis(port=replica.port, decode_responses=True)
    for user, qty in (("ann", 2), ("bob", 3), ("ann", 1)):  # a fresh hold, another, a merge
        response = add(client, user, vid, qty)
        assert response.status_code == 201, response.get_json()
        item = response.get_json()["item"]
        # read at once from the replica: WAIT said it has the hold and the line
        assert on_replica.hget(keys.holds(vid), item["id"]) is not None
        assert on_replica.hget(keys.cart(user), item["id"]) is not None
        assert on_replica.hget(keys.stock(vid), "reserved") == container.redis.hget(keys.stock(vid), "reserved")
    assert state(container, sessions, vid, "ann")[:2] == (4, 6)
    on_replica.close()


def test_without_an_acknowledgement_the_add_is_undone_and_answers_503(build_app, primary_env, pair, sessions):
    _, replica = pair
    client, container = build_app({**primary_env, "HOLD_DURABILITY": "replicated"})
    vid = make_variant(sessions, on_hand=10)
    assert add(client, "cid", vid, 2).status_code == 201  # a line to merge into
    before = state(container, sessions, vid, "cid")
    assert before[:2] == (8, 2)
    errors_before = _store_errors(client)
    with stopped(replica):
        for user, qty in (("cid", 3), ("dee", 4)):  # a merge into a live hold, then a fresh hold
            started = time.monotonic()
            response = add(client, user, vid, qty)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.get_json()
            body = response.get_json()["error"]
            assert body["code"] == "unavailable"
            assert "replica" in body["message"]
            assert int(response.headers["Retry-After"]) >= 1
            assert elapsed < TIMEOUT_MS / 1000 + 2.0  # about the timeout, not a socket timeout
    after = state(container, sessions, vid, "cid")
    assert after[:2] == before[:2]
    assert after[2] == before[2]  # cid's line as it was
    assert state(container, sessions, vid, "dee")[2] == {}  # no line left for the refused fresh add
    assert container.holds.holds([(vid, hold_id_for(vid, "dee"))])[0] is None
    assert _store_errors(client) == errors_before + 2
    # the replica back: adds stand again
    wait_for(lambda: add(client, "dee", vid, 4).status_code == 201, 10, message="an add after the replica resumed")
    assert state(container, sessions, vid, "dee")[:2] == (4, 6)


def test_a_bundle_without_an_acknowledgement_is_undone_whole(build_app, primary_env, pair, sessions):
    _, replica = pair
    client, container = build_app({**primary_env, "HOLD_DURABILITY": "replicated"})
    a, b = make_variant(sessions, on_hand=5), make_variant(sessions, on_hand=5)
    body = {"user_id": "eve", "items": [{"variant_id": a, "quantity": 2}, {"variant_id": b, "quantity": 1}]}
    assert client.post("/api/cart/bundle/", json=body).status_code == 201
    with stopped(replica):
        response = client.post("/api/cart/bundle/", json=body)
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "unavailable"
    assert "Retry-After" in response.headers
    assert state(container, sessions, a, "eve")[:2] == (3, 2)
    assert state(container, sessions, b, "eve")[:2] == (4, 1)
    lines = container.redis.hgetall(keys.cart("eve"))
    assert sorted(int(v.split("|")[0]) for v in lines.values()) == [1, 2]


def test_local_durability_answers_without_any_replica(build_app, primary_env, pair, sessions):
    _, replica = pair
    client, container = build_app(primary_env)  # HOLD_DURABILITY unset: local
    assert container.holds.wait is None
    vid = make_variant(sessions, on_hand=3)
    with stopped(replica):
        response = add(client, "fay", vid, 2)
    assert response.status_code == 201, response.get_json()
    assert state(container, sessions, vid, "fay")[:2] == (1, 2)


def _store_errors(client) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith('inventory_store_errors_total{store="redis"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
