"""A real Redis Cluster of its own (3 primaries on loopback ports): variants spread over every
primary, and the expiry listener follows a primary added while it runs."""
from __future__ import annotations

import shutil
import subprocess
import threading
from decimal import Decimal

import pytest
from redis.exceptions import ClusterDownError
import redis as redis_lib
from redis.cluster import RedisCluster

import jobs.listener
from app import clock, keys
from app.composition import Container
from app.embedded import EmbeddedRedis, find_redis_server, free_port
from app.settings import load_settings
from jobs.listener import ExpiryListener
from persistence.models import Product, Stock, Variant
from tests.conftest import wait_for

pytestmark = pytest.mark.single_node  # it starts a cluster of its own; skipped when the suite is on one


@pytest.fixture
def cluster_container(cluster, env, clean_stores):
    env = {**env, "REDIS_URL": cluster.url, "REDIS_CLUSTER": "1"}
    c = Container(load_settings(env))
    yield c
    c.close()


def owner_by_slot(client: RedisCluster) -> dict[int, str]:
    owners = {}
    for (start, end), info in client.cluster_slots(target_nodes=RedisCluster.RANDOM).items():
        host, port = info["primary"][:2]
        name = f"{host}:{port}"
        for slot in range(int(start), int(end) + 1):
            owners[slot] = name
    return owners


def variant_with_id(sessions, variant_id: int, on_hand: int = 10) -> int:
    with sessions.begin() as s:
        product = Product(name=f"P{variant_id}", description="", base_price=Decimal("1.00"), status="active")
        s.add(product)
        s.flush()
        s.add(Variant(id=variant_id, product_id=product.id, sku=f"SKU-{variant_id}", attributes={},
                      price_adjustment=Decimal("0")))
        s.flush()
        s.add(Stock(variant_id=variant_id, on_hand=on_hand, version=0))
    return variant_id


def test_variants_spread_over_all_three_primaries_and_each_is_served(cluster_container):
    c = cluster_container
    ids = [variant_with_id(c.sessions, v) for v in range(1, 13)]
    owners = owner_by_slot(c.redis)
    assert len({owners[keys.variant_slot(v)] for v in ids}) == 3
    for v in ids:
        assert c.holds.reserve(v, "u1", 2).available == 8
        # every key of a variant, its slot's sweep index included, is on the variant's node
        assert {owners[c.redis.keyslot(k)] for k in c.holds.indexed_keys(v)} == {owners[keys.variant_slot(v)]}
    report = c.sweeper.sweep(now=clock.now_ms() + 10**7)
    assert (report.holds, report.units) == (12, 24)
    assert all(x.available == 10 and x.reserved == 0 for x in c.holds.counters(ids).values())


def test_the_listener_follows_a_primary_added_while_it_runs(cluster, cluster_container, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs.listener, "TOPOLOGY_CHECK_S", 0.3)
    c = cluster_container
    listener = ExpiryListener(Container(c.settings), max_backoff=0.2)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        assert listener.connected.wait(10)
        assert len(listener._subscribers) == 3

        port = free_port()
        while port > 55535:
            port = free_port()
        node = EmbeddedRedis(tmp_path / "node-4", port=port,
                             extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]).start()
        try:
            cli = shutil.which("redis-cli") or str(find_redis_server()).replace("redis-server", "redis-cli")
            subprocess.run([cli, "--cluster", "add-node", f"127.0.0.1:{port}", f"127.0.0.1:{cluster.ports[0]}"],
                           check=True, capture_output=True, timeout=30)
            new_id = redis_lib.Redis(port=port, decode_responses=True).execute_command("CLUSTER MYID")

            def everyone_knows_four() -> bool:
                for p in [*cluster.ports, port]:
                    info = redis_lib.Redis(port=p, decode_responses=True).execute_command("CLUSTER INFO")
                    text = info if isinstance(info, str) else str(info)
                    if "cluster_known_nodes:4" not in text.replace("'", "").replace(": ", ":"):
                        return False
                return True

            # a reshard started before every node knows the new one leaves a slot half-moved
            wait_for(everyone_knows_four, timeout=20, interval=0.2, message="every node to know the new one")
            entry = f"127.0.0.1:{cluster.ports[0]}"

            def resharded() -> bool:
                # On a loaded machine the nodes can still disagree for a moment (the check fails), or a
                # reshard can stop half-way; `fix` closes a half-moved slot before the next try.
                if subprocess.run([cli, "--cluster", "check", entry], capture_output=True, timeout=30).returncode:
                    subprocess.run([cli, "--cluster", "fix", entry, "--cluster-yes"], capture_output=True, timeout=60)
                    return False
                done = subprocess.run([cli, "--cluster", "reshard", entry, "--cluster-from", "all", "--cluster-to",
                                       new_id, "--cluster-slots", "300", "--cluster-yes"],
                                      capture_output=True, timeout=60)
                return done.returncode == 0

            wait_for(resharded, timeout=60, interval=0.5, message="300 slots to move to the new primary")
            c.redis.nodes_manager.initialize()
            owners = owner_by_slot(c.redis)
            moved = next(v for v in range(1, 200_000) if owners[keys.variant_slot(v)] == f"127.0.0.1:{port}")
            variant_with_id(c.sessions, moved)

            wait_for(lambda: len(listener._subscribers) == 4 and listener.connected.is_set(), timeout=10,
                     message="the listener to follow the new primary")
            # the new primary may answer CLUSTERDOWN for a moment after the reshard (the service's
            # 503) until every node agrees on the new configuration
            made = []

            def reserved() -> bool:
                try:
                    made.append(c.holds.reserve(moved, "u1", 3, ttl_ms=300))
                except ClusterDownError:
                    return False
                return True

            wait_for(reserved, timeout=10, interval=0.1, message="the new primary to serve its slots")
            assert made[0].available == 7
            # no sweeper runs here: only the new node's expired event can bring the units back
            wait_for(lambda: c.holds.counters([moved])[moved].available == 10, timeout=3,
                     message="the listener to release the hold on the new primary")
        finally:
            listener.stop.set()
            thread.join(10)
            node.stop()
    finally:
        listener.stop.set()
    assert not thread.is_alive()
