"""The runner on a Redis Cluster of its own (app/engine/cluster_lane.py: a lane per primary, picked
by hash slot): calls across slots in order, MOVED and ASK after a slot migration followed once,
a killed primary, fork, NOSCRIPT on one primary, keyless commands beside a script call."""
from __future__ import annotations

import gc
import os
import signal

import pytest
import redis as redis_lib
from redis.crc import key_slot
from redis.exceptions import ConnectionError

from app import clock, keys
from app.composition import Container
from app.embedded import EmbeddedCluster
from app.engine import cluster_lane
from app.engine.holdrec import hold_id_for
from app.engine.lane import pack
from app.engine.runner import Script
from app.settings import load_settings
from tests.cluster.test_topology import variant_with_id
from tests.conftest import wait_for

pytestmark = pytest.mark.single_node  # it starts a cluster of its own; skipped when the suite is on one


@pytest.fixture
def container(cluster, env, clean_stores):
    c = Container(load_settings({**env, "REDIS_URL": cluster.url, "REDIS_CLUSTER": "1"}))
    yield c
    c.close()


def _node(port: int) -> redis_lib.Redis:
    return redis_lib.Redis(port=port, decode_responses=True)


def _owner(cluster: EmbeddedCluster, slot: int) -> int:
    """The port of the primary serving `slot`, as the first node says."""
    return _owner_seen_by(cluster.ports[0], slot)


def _calls(port: int, command: str) -> int:
    stats = _node(port).info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _variants_on_each_primary(cluster: EmbeddedCluster, sessions) -> dict[int, int]:
    """port -> a variant id whose slot that primary serves (made in the database)."""
    out: dict[int, int] = {}
    v = 0
    while len(out) < len(cluster.ports):
        v += 1
        port = _owner(cluster, keys.variant_slot(v))
        if port not in out:
            out[port] = variant_with_id(sessions, v, on_hand=100)
    return out


def _key_on(cluster: EmbeddedCluster, port: int, name: str) -> str:
    """A key (with a hash tag) whose slot `port` serves."""
    n = 0
    while True:
        key = f"router:{{{name}{n}}}"
        if _owner(cluster, cluster_lane.slot_of(key)) == port:
            return key
        n += 1


def _migrate(cluster: EmbeddedCluster, slot: int, source: int, target: int, finish: bool = True) -> None:
    """Move `slot` and its keys from one primary to another by hand (CLUSTER SETSLOT, MIGRATE);
    with finish=False the slot stays half-moved (MIGRATING / IMPORTING: the source answers ASK)."""
    src, dst = _node(source), _node(target)
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    while moving := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *moving)
    if finish:
        for port in (target, source, *[p for p in cluster.ports if p not in (source, target)]):
            _node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        wait_for(lambda: all(_owner_seen_by(p, slot) == target for p in cluster.ports), timeout=10,
                 message="every primary to agree on the slot's new owner")


def _owner_seen_by(port: int, slot: int) -> int:
    for start, end, (_host, owner, *_), *_ in _node(port).execute_command("CLUSTER", "SLOTS") or []:
        if int(start) <= slot <= int(end):
            return int(owner)
    return -1


def _reserved(c: Container, v: int) -> tuple[int, int]:
    counter = c.holds.counters([v])[v]
    return counter.available, counter.reserved


def test_calls_across_slots_in_one_run_come_back_in_order(cluster, container):
    runner = container.runner
    assert runner.router is not None and runner.lane is None
    by_port = {p: [_key_on(cluster, p, f"k{p}-{i}") for i in range(2)] for p in cluster.ports}
    ks = [k for p in cluster.ports for k in by_port[p]]
    ks = ks[::2] + ks[1::2]  # interleaved: consecutive calls on different primaries
    before = {p: _calls(p, "incrby") for p in cluster.ports}
    replies = runner.run([("INCRBY", k, i + 1) for i, k in enumerate(ks)]
                         + [("HSET", ks[0] + "h", "a", "1", "b", "2"), ("HGETALL", ks[0] + "h")]
                         + [("GET", k) for k in reversed(ks)])
    n = len(ks)
    assert replies[:n] == list(range(1, n + 1))
    assert replies[n:n + 2] == [2, {"a": "1", "b": "2"}]
    assert replies[n + 2:] == [str(i) for i in range(n, 0, -1)]
    for p in cluster.ports:  # each on its own primary, each once
        assert _calls(p, "incrby") - before[p] == 2
        assert [_node(p).get(k) for k in by_port[p]] == [str(ks.index(k) + 1) for k in by_port[p]]


def test_reserves_on_every_primary_and_commands_beside_them_on_theirs(cluster, container):
    c = container
    variants = _variants_on_each_primary(cluster, c.sessions)
    c.runner.load_all()  # on every primary (after a NOSCRIPT the commands beside go again: they must be idempotent)
    for port, v in variants.items():
        other = next(p for p in cluster.ports if p != port)
        key = _key_on(cluster, other, f"beside{v}")
        r = c.holds.reserve(v, "u1", 2, beside=[("SET", key, "x"), ("GET", key), ("INCR", key + "n")])
        assert r.available == 98
        assert r.beside[1:] == ("x", 1)
        assert _node(other).get(key) == "x"
        assert _reserved(c, v) == (98, 2)
        assert _node(port).hlen(keys.holds(v)) == 1


def test_moved_after_a_slot_migration_is_followed_and_applied_once(cluster, container):
    c = container
    v = variant_with_id(c.sessions, 1, on_hand=100)
    slot = keys.variant_slot(v)
    source = _owner(cluster, slot)
    target = next(p for p in cluster.ports if p != source)
    assert c.holds.reserve(v, "u1", 1).available == 99
    counter_key = f"moved:{{v{v}}}"  # same slot as the variant
    assert c.runner.run([("INCR", counter_key)]) == [1]
    _migrate(cluster, slot, source, target)
    assert c.runner.router.table[slot] is c.runner.router._lanes[f"127.0.0.1:{source}"]  # the map is old
    calls = {p: _calls(p, "evalsha") for p in (source, target)}
    assert c.holds.reserve(v, "u2", 1).available == 98  # MOVED, the map read again, sent to the target
    assert _calls(target, "evalsha") - calls[target] == 1
    assert _calls(source, "evalsha") - calls[source] == 0  # refused there (rejected_calls), not run
    assert _reserved(c, v) == (98, 2)
    assert _node(target).hlen(keys.holds(v)) == 2
    assert c.runner.router.table[slot] is c.runner.router._lanes[f"127.0.0.1:{target}"]
    # a plain command of a run on the moved slot too, beside one on another slot: each once
    _migrate(cluster, slot, target, source)
    other = _key_on(cluster, target, "other")
    assert c.runner.run([("INCR", other), ("INCR", counter_key), ("INCR", other)]) == [1, 2, 2]
    assert _node(source).get(counter_key) == "2"


def test_ask_during_a_migration_goes_to_the_importing_primary_once(cluster, container):
    c = container
    v = variant_with_id(c.sessions, 1, on_hand=100)
    slot = keys.variant_slot(v)
    source = _owner(cluster, slot)
    target = next(p for p in cluster.ports if p != source)
    assert c.holds.reserve(v, "u1", 1).available == 99
    moved, fresh = f"ask:{{v{v}}}", f"ask:{{v{v}}}:new"  # the variant's slot
    assert c.runner.run([("INCR", moved)]) == [1]
    _migrate(cluster, slot, source, target, finish=False)  # keys on the target, the slot still the source's
    calls = {p: _calls(p, "incr") for p in (source, target)}
    # ASK from the source (the keys are not there), then ASKING + the command on the target
    assert c.runner.run([("INCR", moved), ("INCR", fresh)]) == [2, 1]
    assert _calls(target, "incr") - calls[target] == 2 and _calls(source, "incr") == calls[source]
    router = c.runner.router
    assert router.table[slot] is router._lanes[f"127.0.0.1:{source}"]  # ASK does not move the slot
    target_id = _node(target).execute_command("CLUSTER MYID")
    for port in cluster.ports:
        _node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    wait_for(lambda: all(_owner_seen_by(p, slot) == target for p in cluster.ports), timeout=10,
             message="every primary to agree on the slot's new owner")
    assert (_node(target).get(moved), _node(target).get(fresh)) == ("2", "1")
    assert c.holds.reserve(v, "u3", 1).available == 98  # MOVED now
    assert _reserved(c, v) == (98, 2)
    assert router.table[slot] is router._lanes[f"127.0.0.1:{target}"]


def test_a_killed_primary_raises_connection_error_and_nothing_is_sent_again(cluster, container):
    c = container
    variants = _variants_on_each_primary(cluster, c.sessions)
    for v in variants.values():
        c.holds.reserve(v, "warm", 1)
    dead_port, v = next(iter(variants.items()))
    others = [p for p in cluster.ports if p != dead_port]
    node = next(n for n in cluster.nodes if n.port == dead_port)
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(10)
    before = {p: _calls(p, "evalsha") for p in others}
    with pytest.raises(ConnectionError):
        c.holds.reserve(v, "u1", 1)
    assert c.runner.router.stale  # the next call reads the topology first
    assert {p: _calls(p, "evalsha") for p in others} == before  # not sent anywhere else
    node.process = None
    node.start()  # same port and nodes.conf: back with its slots (its data gone: no persistence)
    wait_for(lambda: all("cluster_state:ok" in _node(p).execute_command("CLUSTER", "INFO") for p in cluster.ports),
             timeout=20, interval=0.1, message="the cluster to be whole again")
    assert c.holds.reserve(v, "u2", 1).available == 99  # counters rebuilt from the database, one reserve
    assert _node(dead_port).hlen(keys.holds(v)) == 1


def test_a_forked_child_gets_its_own_connections_and_leaves_the_parents_alone(cluster, container):
    c = container
    variants = list(_variants_on_each_primary(cluster, c.sessions).values())
    for v in variants:
        c.holds.reserve(v, "parent", 1)
    lanes = c.runner.router.primaries()
    parent_ids = [lane.call(pack("CLIENT", "ID")) for lane in lanes]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reserve on every primary, report its connections' ids
        code = 1
        try:
            os.close(r)
            gc.collect()
            ok = all(c.holds.reserve(v, "child", 1).available == 98 for v in variants)
            ids = [lane.call(pack("CLIENT", "ID")) for lane in lanes]
            os.write(w, f"{int(ok)} {' '.join(map(str, ids))}\n".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        ok, *child_ids = os.read(r, 200).decode().split()
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0 and ok == "1"
    assert not set(map(int, child_ids)) & set(parent_ids)
    assert [lane.call(pack("CLIENT", "ID")) for lane in lanes] == parent_ids  # untouched, in step
    for v in variants:
        assert _reserved(c, v) == (98, 2)


def test_noscript_after_a_script_flush_on_one_primary(cluster, container):
    c = container
    variants = _variants_on_each_primary(cluster, c.sessions)
    for v in variants.values():
        c.holds.reserve(v, "warm", 1)
    flushed, v = next(iter(variants.items()))
    _node(flushed).script_flush()
    assert c.holds.reserve(v, "u1", 1).available == 98  # refused (NOSCRIPT), loaded, sent once more
    _node(flushed).script_flush()
    now = clock.now_ms()
    calls = [Script("reserveHold", c.holds.indexed_keys(x),
                    [hold_id_for(x, "") + "u2", 1, now, 60_000, "u2", "add", 100, "g"]) for x in variants.values()]
    assert [res[0] for res in c.runner.run(calls)] == [1, 1, 1]
    for x in variants.values():
        assert _reserved(c, x) == ((97, 3) if x == v else (98, 2))


def test_keyless_commands_go_with_the_script_call_before_them(cluster, container):
    c = container
    variants = _variants_on_each_primary(cluster, c.sessions)
    port, v = next(iter(variants.items()))
    other = next(p for p in cluster.ports if p != port)
    c.holds.reserve(v, "warm", 1)
    before = {p: _calls(p, "wait") for p in cluster.ports}
    r = c.holds.reserve(v, "u1", 1, beside=[("GET", _key_on(cluster, other, "x")), ("WAIT", 0, 0)])
    assert r.beside == (None, 0)  # no replicas: WAIT answers 0 at once
    after = {p: _calls(p, "wait") for p in cluster.ports}
    assert {p: after[p] - before[p] for p in cluster.ports} == {p: int(p == port) for p in cluster.ports}
    # in a run: after the script call before it, not the plain command between them
    now = clock.now_ms()
    script = Script("reserveHold", c.holds.indexed_keys(v),
                    [hold_id_for(v, "") + "u2", 1, now, 60_000, "u2", "add", 100, "g"])
    replies = c.runner.run([script, ("INCR", _key_on(cluster, other, "y")), ("WAIT", 0, 0)])
    assert replies[0][0] == 1 and replies[1:] == [1, 0]
    assert _calls(port, "wait") - after[port] == 1 and _calls(other, "wait") == after[other]
    assert _reserved(c, v) == (97, 3)


def test_every_command_the_service_sends_is_routed_by_its_key(cluster, container):
    router = container.runner.router
    for command in [("HGET", "cart:{u1}", "x"), ("MEMORY", "USAGE", "cart:{u1}"), ("OBJECT", "ENCODING", "cart:{u1}"),
                    ("DEL", "cart:{u1}", "other:{u1}"), ("EVALSHA", "0" * 40, 1, "cart:{u1}")]:
        assert router.command_slot(command) == key_slot(b"u1"), command
    assert router.command_slot(("WAIT", 1, 100)) is None
