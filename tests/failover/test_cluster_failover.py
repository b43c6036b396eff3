"""A Redis Cluster primary lost mid-sale (3 primaries, one replica each, node timeout 1 s).

The web server is the real one (gunicorn, 4 workers) on a cluster of real redis-servers. Client
threads run a flash sale: every add a new customer, half of them on two hot variants whose slots
live on one primary, the rest spread over variants on every primary. That primary is then killed
with SIGKILL after its replica was stopped (SIGSTOP) for a moment, so the replica promoted in its
place lacks the last writes the primary acknowledged (asynchronous replication at its worst);
checkouts run inside that moment too. Then:

- adds are refused with 503 `unavailable` and Retry-After while the slots have no primary, never a
  500 or a hang, and succeed again within RECOVERY_BOUND_S of the kill;
- no variant sells more than its on_hand; orders written before the failover stay, with their units;
- after a reconcile, available + reserved == on_hand for every variant, and every acknowledged hold
  is either still held or reported lost (report and metric), unless its cart line was lost with it
  (the cart lived on the same primary: nothing is left to see; counted apart);
- a checkout whose finalize failed because its primary died after the order committed ends with the
  order kept and the counters right once the reconciler has run.

The figures (how long adds were refused, holds lost and reported) are printed: run with -s.
"""
from __future__ import annotations

import signal

import pytest
from redis.cluster import RedisCluster
from sqlalchemy import select

from app import faults, keys
from app.embedded import EmbeddedCluster, free_port
from persistence.models import Order, Stock
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.failover.sale import Topology, replicas_for, print_figures, ready, sale_across_failover, web_command
from tests.faults.conftest import assert_stock_exact

pytestmark = [pytest.mark.slow, pytest.mark.single_node]  # it starts its own cluster

NODE_TIMEOUT_MS = 1000
# node timeout (1 s) + failure agreement and the replica's election (~1-2 s) + every worker's
# client finding the new primary, with a margin for a loaded machine
RECOVERY_BOUND_S = 10.0
HOT_ON_HAND = 300
SPREAD_ON_HAND = 1000


@pytest.fixture
def cluster(tmp_path, request):
    c = EmbeddedCluster(tmp_path / "cluster", size=3, replicas=replicas_for(request),
                        node_timeout_ms=NODE_TIMEOUT_MS).start()
    try:
        yield c
    finally:
        c.stop()


def _variants(sessions, cluster: EmbeddedCluster) -> tuple[int, list[int], list[int]]:
    """(the hot primary's port, two hot variants on it, two variants on every primary)."""
    by_primary: dict[int, list[int]] = {}
    while len(by_primary) < 3 or min(len(v) for v in by_primary.values()) < 4:
        vid = make_variant(sessions, on_hand=SPREAD_ON_HAND)
        by_primary.setdefault(cluster.primary_of_key(keys.stock(vid)), []).append(vid)
    hot_port = next(iter(by_primary))
    hot = by_primary[hot_port][:2]
    with sessions.begin() as s:
        for vid in hot:
            s.get(Stock, vid).on_hand = HOT_ON_HAND
    return hot_port, hot, [vid for vids in by_primary.values() for vid in vids[2:4]]


class ClusterPrimaryLost(Topology):
    def __init__(self, cluster: EmbeddedCluster, primary: int, tag: str, start_url: str):
        self.cluster, self.primary, self.tag, self.start_url = cluster, primary, tag, start_url

    def replica_pids(self) -> list[int]:
        return [self.cluster.node(port).process.pid for port in self.cluster.replicas_of(self.primary)]

    def backlog(self, data: bytes) -> None:
        with self.cluster.client(self.primary) as r:
            r.set(f"backlog:{self.tag}", data)  # in the lost primary's slots

    def kill_primary(self) -> None:
        self.cluster.kill(self.primary)

    def wait_healed(self) -> float:
        return self.cluster.wait_ok(30)

    def reader(self):
        return RedisCluster.from_url(self.start_url, decode_responses=True)


@pytest.mark.parametrize("durability", ["local", "replicated"])
def test_a_primary_lost_mid_sale_oversells_nothing_reports_lost_holds_and_heals(
        cluster, base_env, build, processes, redis_url, tmp_path, durability):
    env = {**base_env, "REDIS_CLUSTER": "1", "RQ_REDIS_URL": redis_url, "WEB_CONCURRENCY": "4",
           "PORT": str(free_port()), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "LOG_LEVEL": "WARNING"}
    env.pop("API_KEYS", None)
    env["HOLD_DURABILITY"] = durability
    _client, c = build({**env, "REDIS_URL": cluster.url})
    hot_primary, hot, spread = _variants(c.sessions, cluster)
    # the node the clients start from stays up (any live node gives the topology)
    env["REDIS_URL"] = f"redis://127.0.0.1:{next(p for p in cluster.primaries() if p != hot_primary)}/0"
    _client, c = build(env)
    web = processes.start("web", web_command(), env)
    port = int(env["PORT"])
    wait_for(lambda: ready(port), timeout=40, interval=0.1, message="gunicorn ready on the cluster")

    topology = ClusterPrimaryLost(cluster, hot_primary, keys.variant_tag(hot[0]), env["REDIS_URL"])
    on_hand = {**{vid: HOT_ON_HAND for vid in hot}, **{vid: SPREAD_ON_HAND for vid in spread}}
    # this process's client last saw the old topology: its first call fails and marks it stale
    figures = sale_across_failover(
        port, c, topology, hot, spread, on_hand, RECOVERY_BOUND_S,
        lambda: wait_for(lambda: _reconciled(c), timeout=20, interval=0.2, message="a reconcile on the new primary"))
    print_figures(f"cluster failover, HOLD_DURABILITY={durability}", figures)
    if durability == "local":
        assert figures["acked_lost"] > 0  # the replica was behind: the scenario did lose holds
    else:  # an add answers 201 only once the replica has it: the same scenario loses none
        assert figures["acked_lost"] == 0, figures
    processes.kill(web, signal.SIGTERM)


def test_a_checkout_whose_primary_died_after_its_order_committed_keeps_the_order(cluster, base_env, build,
                                                                                 redis_url):
    env = {**base_env, "REDIS_CLUSTER": "1", "RQ_REDIS_URL": redis_url, "REDIS_URL": cluster.url}
    client, c = build(env)
    vid = make_variant(c.sessions, on_hand=10)
    primary = cluster.primary_of_key(keys.stock(vid))
    assert client.post("/api/cart/add/", json={"user_id": "buyer", "variant_id": vid, "quantity": 3}).status_code == 201
    assert client.post("/api/cart/add/", json={"user_id": "other", "variant_id": vid, "quantity": 2}).status_code == 201

    def die():  # the order is committed; the lock reached the replica; the primary is lost
        with cluster.client(primary) as r:
            assert r.execute_command("WAIT", 1, 2000) >= 1
        cluster.kill(primary)

    faults.inject("checkout.after_commit", die)
    try:
        response = client.post("/api/cart/buyer/checkout/")
    finally:
        faults.clear()
    assert response.status_code in (201, 503), response.get_json()
    with c.sessions() as s:
        orders = s.scalars(select(Order).where(Order.user_id == "buyer")).all()
    assert len(orders) == 1  # the order stands whatever the answer was
    cluster.wait_ok(30)
    report = wait_for(lambda: _reconciled(c), timeout=20, interval=0.2, message="a reconcile on the new primary")
    assert report.locks_finalized == (1 if response.status_code == 503 else 0)
    levels = assert_stock_exact(c, [vid])
    assert levels[vid] == (7, 5, 2)  # on_hand 7: the 3 units stay sold; the other customer's 2 still held
    assert c.reconciler.reconcile(grace_ms=0).drifted == 0
    print_figures("checkout across a failover", {"answer": response.status_code,
                                                 "locks_finalized": report.locks_finalized})


def _reconciled(c):
    try:
        return c.reconciler.reconcile(grace_ms=0)
    except Exception:  # noqa: BLE001 - the client still finding the new primary
        return None
