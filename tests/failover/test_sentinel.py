"""Redis Sentinel (REDIS_SENTINELS): the service, its listener and its rq queue on the primary the
sentinels name, and what each does when that primary dies (SIGKILL) and a replica is promoted.

A real topology (app/embedded.py, EmbeddedSentinelGroup): one primary, one replica, three sentinels,
quorum 2, down-after 1 s, failover-timeout 2 s. Adds between the kill and the promotion answer 503
`unavailable` with Retry-After, never 500, and succeed again within FAILOVER_BOUND_S of the kill
(down-after 1 s + an election and a promotion, a few seconds on loopback, + a wide margin for a
busy machine).
"""
from __future__ import annotations

import signal
import threading
import time

import pytest
from redis.sentinel import SentinelConnectionPool

from app import keys
from app.embedded import EmbeddedSentinelGroup
from app.engine.holdrec import hold_id_for
from app.settings import load_settings
from jobs.listener import ExpiryListener
from tests.conftest import wait_for
from tests.factories import make_variant, on_hand

pytestmark = [pytest.mark.slow, pytest.mark.single_node]

FAILOVER_BOUND_S = 20.0


@pytest.fixture
def group(tmp_path):
    sentinels = EmbeddedSentinelGroup(tmp_path / "sentinel").start()
    try:
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
def sentinel_env(base_env, group):
    env = {k: v for k, v in base_env.items() if k not in ("REDIS_URL", "RQ_REDIS_URL")}
    return {**env, **group.env, "REDIS_CLUSTER": "0"}


def add(client, user, vid, qty):
    return client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid, "quantity": qty})


def replicated(group: EmbeddedSentinelGroup) -> bool:
    """Every replica has every write of the primary."""
    info = group.client(group.primary_port).info("replication")
    offset = info["master_repl_offset"]
    return all(info.get(f"slave{i}", {}).get("offset") == offset for i in range(len(group.replica_ports)))


def test_adds_answer_503_during_a_failover_and_succeed_on_the_promoted_replica(build, sentinel_env, group):
    client, container = build(sentinel_env)
    assert isinstance(container.redis.connection_pool, SentinelConnectionPool)
    vid = make_variant(container.sessions, on_hand=100)
    held = 0
    for i in range(3):
        response = add(client, f"before-{i}", vid, 2)
        assert response.status_code == 201, response.get_json()
        held += 2
    assert group.client(group.primary_port).hget(keys.stock(vid), "reserved") == str(held)
    wait_for(lambda: replicated(group), 10, message="the replica to have every write")

    old = group.kill_primary()
    killed_at = time.monotonic()
    answers = []
    while True:
        response = add(client, f"during-{len(answers)}", vid, 1)
        answers.append(response.status_code)
        if response.status_code == 201:
            held += 1
            break
        assert response.status_code == 503, (response.status_code, response.get_json())
        assert response.get_json()["error"]["code"] == "unavailable"
        assert int(response.headers["Retry-After"]) >= 1
        assert time.monotonic() - killed_at < FAILOVER_BOUND_S, f"no 201 within {FAILOVER_BOUND_S}s: {answers}"
        time.sleep(0.1)
    recovered_after = time.monotonic() - killed_at
    assert answers[0] == 503  # the first add after the kill found no primary
    new = group.wait_for_promotion(5)
    assert new != old
    # adds go on as usual, on the new primary, and the counters are exact
    for i in range(3):
        response = add(client, f"after-{i}", vid, 1)
        assert response.status_code == 201, response.get_json()
        held += 1
    counters = container.holds.counters([vid])[vid]
    assert counters.reserved == held, f"reserved {counters.reserved}, acknowledged {held}"
    assert counters.available + counters.reserved == on_hand(container.sessions, vid)
    assert group.client(new).hget(keys.stock(vid), "reserved") == str(held)
    print(f"failover: {len(answers) - 1} add(s) answered 503, the first 201 {recovered_after:.1f}s after the kill")


def test_the_listener_follows_the_promotion_and_releases_holds_on_the_new_primary(build, sentinel_env, group):
    _, container = build(sentinel_env)
    replica = group.replica_ports[0]
    assert group.client(replica).config_get("notify-keyspace-events")["notify-keyspace-events"] == ""
    listener = ExpiryListener(container)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        wait_for(listener.connected.is_set, 10, message="the listener to subscribe")
        group.kill_primary()
        new = group.wait_for_promotion(FAILOVER_BOUND_S)
        assert new == replica
        channel = "__keyevent@0__:expired"

        def subscribed_on_new_primary():
            flags = group.client(new).config_get("notify-keyspace-events")["notify-keyspace-events"]
            subscribers = dict(group.client(new).pubsub_numsub(channel)).get(channel, 0)
            return "E" in flags and ("x" in flags or "A" in flags) and subscribers >= 1 and listener.connected.is_set()

        wait_for(subscribed_on_new_primary, FAILOVER_BOUND_S, 0.1, "the listener to subscribe on the new primary")
        vid = make_variant(container.sessions, on_hand=5)
        container.holds.reserve(vid, "short", 2, ttl_ms=300)
        assert group.client(new).hexists(keys.holds(vid), hold_id_for(vid, "short"))

        def released():
            c = container.holds.counters([vid])[vid]
            return c.available == 5 and c.reserved == 0 and not group.client(new).hlen(keys.holds(vid))

        wait_for(released, 10, 0.05, "the listener to release the lapsed hold on the new primary")
        assert listener.released_holds >= 1
    finally:
        listener.stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_the_rq_queue_and_the_scheduler_go_through_the_sentinels(build, sentinel_env, group):
    import jobs.tasks
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    from jobs.scheduler import make_scheduler, rq_connection, run_worker, scheduler_tick

    settings = load_settings(sentinel_env)
    _, container = build(sentinel_env)
    connection = rq_connection(settings)
    assert isinstance(connection.connection_pool, SentinelConnectionPool)
    jobs.tasks.use_container(container)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        scheduler = make_scheduler(settings)
        assert scheduler_tick(scheduler, settings) == 2  # the schedule installed, both jobs due now
        queue = Queue(jobs.tasks.QUEUE, connection=connection)
        assert len(queue) == 2
        assert group.client(group.primary_port).llen(f"rq:queue:{jobs.tasks.QUEUE}") == 2
        run_worker(settings, burst=True)
        assert len(queue) == 0
        assert FinishedJobRegistry(queue=queue).count == 2
    finally:
        jobs.tasks.use_container(None)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_replicated_durability_on_sentinel_has_the_hold_on_the_replica(build, sentinel_env, group):
    client, container = build({**sentinel_env, "HOLD_DURABILITY": "replicated"})
    vid = make_variant(container.sessions, on_hand=4)
    response = add(client, "gil", vid, 3)
    assert response.status_code == 201, response.get_json()
    item = response.get_json()["item"]["id"]
    replica = group.client(group.replica_ports[0])
    assert replica.hexists(keys.holds(vid), item)
    assert replica.hget(keys.cart("gil"), item) is not None
