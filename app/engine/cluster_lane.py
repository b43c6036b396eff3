"""Lanes on a Redis Cluster: one per primary, picked by the call's hash slot.

redis-py's `RedisCluster` costs about 55 us of client CPU per call on top of a plain client's
(the key's slot found by parsing the command, the node looked up under a lock, a pool checkout,
the retry and redirect wrappers; a cluster pipeline more), four times what a reservation costs
through a lane on one node (bench/README.md). A `ClusterRouter` keeps what matters from redis-py:
its client's slot map (`nodes_manager.slots_cache`, refreshed by `nodes_manager.initialize()`) and
each primary's connection settings, from which it builds a lane (app/engine/lane.py) per primary.
Every call goes to the lane of its slot: a prepared call's slot is computed once, with its packed
head; several calls are grouped per primary, written to every primary, then every reply is read,
and the replies are put back in the caller's order.

Replies that mean a command did not run are followed, a bounded number of times (MAX_REDIRECTS):
MOVED (the slot has moved: the map is read again and the call sent to the new owner) and ASK (the
slot is migrating: the call is sent once to the importing primary, after ASKING). Nothing else is
sent again: TRYAGAIN and CLUSTERDOWN are error replies raised to the caller (an outage, 503), and a
connection error or timeout on a primary is raised as redis-py's `ConnectionError` / `TimeoutError`
and marks the map stale, so the next call reads the topology again (after a failover the replica
that took over owns the slots).

A command without a key (WAIT, PING) has no slot: it goes to the primary of the script call before
it in the list (or of the nearest call with a key), on the same connection, after that call, so a
WAIT counts that call's writes.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import NamedTuple, Sequence

from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ConnectionError, MovedError, RedisClusterException
from redis.exceptions import SlotNotCoveredError, TimeoutError

from app.engine import lane as lane_mod

SLOTS = 16384
MAX_REDIRECTS = 3  # MOVED / ASK followed at most this many times per call

# Commands without a key: sent beside the call before them (see the module docstring).
KEYLESS = frozenset({"WAIT", "WAITAOF", "PING", "ECHO", "TIME", "INFO", "DBSIZE", "LASTSAVE"})
# Commands whose one key is their first argument (the rest are found by redis-py's command table).
_FIRST_KEY = frozenset({
    "GET", "SET", "SETNX", "SETEX", "PSETEX", "GETDEL", "GETEX", "INCR", "INCRBY", "DECR", "DECRBY", "APPEND",
    "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST", "TTL", "PTTL", "TYPE",
    "HGET", "HSET", "HSETNX", "HMSET", "HMGET", "HDEL", "HGETALL", "HLEN", "HEXISTS", "HINCRBY", "HKEYS", "HVALS",
    "ZADD", "ZREM", "ZCARD", "ZCOUNT", "ZSCORE", "ZRANGE", "ZRANGEBYSCORE", "ZREVRANGE", "ZREVRANGEBYSCORE",
    "ZREMRANGEBYSCORE", "ZINCRBY", "ZRANK", "SADD", "SREM", "SCARD", "SMEMBERS", "SISMEMBER",
    "LPUSH", "RPUSH", "LPOP", "RPOP", "LRANGE", "LLEN", "LTRIM", "XADD", "XLEN",
})
_SECOND_KEY = frozenset({"MEMORY", "OBJECT"})  # a subcommand, then the key
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "TOUCH", "MGET"})  # every argument a key, one slot
_ASKING = lane_mod.pack("ASKING")

_routers: "weakref.WeakSet[ClusterRouter]" = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    # a lock held by another thread at the fork would stay held in the child; the lanes forget their
    # connections themselves (lane._forget_all_in_child)
    for router in list(_routers):
        router._lock = threading.RLock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)


def supports(redis) -> bool:
    """A redis-py `RedisCluster` whose primaries a lane can speak to."""
    from redis.cluster import RedisCluster

    if not isinstance(redis, RedisCluster):
        return False
    return all(lane_mod.supports(node.redis_connection) for node in redis.get_primaries()
               if node.redis_connection is not None)


def slot_of(key) -> int:
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


class Entry(NamedTuple):
    """One call of a round trip: its slot (None: no key), packed command, and whether it is a script
    call (a keyless command follows the script call before it)."""

    slot: int | None
    packed: bytes
    script: bool


class ClusterRouter:
    """Lanes per primary of a `RedisCluster` client, and the slot map; see the module docstring."""

    def __init__(self, redis):
        self.redis = redis
        self._lanes: dict[str, lane_mod.Lane] = {}  # node name (host:port) -> its lane
        self._lock = threading.RLock()
        self.table: list = [None] * SLOTS  # slot -> the lane of its primary
        self.stale = True  # read the map before the next call
        _routers.add(self)
        self._rebuild()

    # -- the map ------------------------------------------------------------------------------------

    def _lane_named(self, name: str):
        """The lane of the node host:port (made from its redis-py client's settings), or None when
        redis-py does not know that node."""
        lane = self._lanes.get(name)
        if lane is None:
            with self._lock:
                lane = self._lanes.get(name)
                node = self.redis.nodes_manager.nodes_cache.get(name)
                if lane is None and node is not None and node.redis_connection is not None:
                    lane = self._lanes[name] = lane_mod.Lane(node.redis_connection)
        return lane

    def _rebuild(self) -> None:
        with self._lock:
            table = [None] * SLOTS
            by_name: dict[str, object] = {}
            for slot, nodes in self.redis.nodes_manager.slots_cache.items():
                name = nodes[0].name
                if name not in by_name:
                    by_name[name] = self._lane_named(name)
                table[slot] = by_name[name]
            self.table, self.stale = table, False

    def refresh(self) -> None:
        """Read the topology again (CLUSTER SLOTS through redis-py) and rebuild the map."""
        with self._lock:
            try:
                self.redis.nodes_manager.initialize()
            except RedisClusterException as exc:
                self.stale = True
                raise ConnectionError(f"Redis Cluster topology unavailable: {exc}") from exc
            self._rebuild()

    def lane(self, slot: int) -> lane_mod.Lane:
        if self.stale:
            self.refresh()
        lane = self.table[slot]
        if lane is None:
            raise SlotNotCoveredError(f"slot {slot} is not covered by the cluster")
        return lane

    def primaries(self) -> list:
        """The lane of every primary in the map."""
        if self.stale:
            self.refresh()
        return list({id(lane): lane for lane in self.table if lane is not None}.values())

    def _moved(self, error: MovedError) -> None:
        """A MOVED reply: read the map again, and trust the reply for its own slot."""
        self.refresh()
        lane = self._lane_named(f"{error.host}:{error.port}")
        if lane is not None:
            self.table[error.slot_id] = lane

    def _asked(self, error: AskError):
        lane = self._lane_named(f"{error.host}:{error.port}")
        if lane is None:
            self.refresh()
            lane = self._lane_named(f"{error.host}:{error.port}")
        return lane

    # -- slots of commands --------------------------------------------------------------------------

    def command_slot(self, command: Sequence) -> int | None:
        """The slot of a plain command's keys; None for a command without a key."""
        name = command[0].upper() if isinstance(command[0], str) else command[0].decode().upper()
        if name in _FIRST_KEY:
            return slot_of(command[1])
        if name in KEYLESS:
            return None
        if name in _SECOND_KEY:  # MEMORY USAGE key, OBJECT ENCODING key
            return slot_of(command[2])
        if name in _ALL_KEYS:
            slots = {slot_of(k) for k in command[1:]}
            if len(slots) != 1:
                raise RedisClusterException(f"{name} - all keys must map to the same key slot")
            return slots.pop()
        return self.redis.determine_slot(*command)

    # -- calls --------------------------------------------------------------------------------------

    def call(self, slot: int, packed: bytes):
        """One packed command on its slot's primary; its reply (an error reply raised). MOVED and ASK
        are followed; a connection fault marks the map stale and is raised."""
        lane = self.table[slot]
        if lane is None or self.stale:
            lane = self.lane(slot)
        try:
            return lane.call(packed)
        except AskError as exc:  # MOVED too (a subclass): the command did not run
            reply = self.run([Entry(slot, packed, False)], first=exc)[0]
            if isinstance(reply, Exception):
                raise reply from None
            return reply
        except (ConnectionError, TimeoutError, ClusterDownError):
            self.stale = True
            raise

    def run(self, entries: Sequence[Entry], first: AskError | None = None) -> list:
        """Packed commands on their slots' primaries: one write per primary, then every reply read;
        replies in the order of `entries`, error replies in their places (MOVED / ASK followed).
        A fault on any primary is raised once every other primary's replies are read. `first`: the
        redirect that a lone entry already got."""
        anchor = _anchors(entries)
        if first is None:
            replies: list = [None] * len(entries)
            default = None
            route: dict[int, tuple] = {}
            for i, a in enumerate(anchor):
                if a == i:
                    route[i] = (self.lane(entries[i].slot), False)
                elif a is not None:
                    route[i] = route[a]
                else:  # no call with a key at all: any primary
                    default = default or self.primaries()[0]
                    route[i] = (default, False)
            self._round(entries, range(len(entries)), route, replies)
            redirected = [i for i, a in enumerate(anchor) if a == i and isinstance(replies[i], AskError)]
        else:
            replies, redirected = [first], [0]
        for _ in range(MAX_REDIRECTS):
            if not redirected:
                break
            route, todo = self._redirects(entries, replies, redirected, anchor)
            if not todo:
                break
            self._round(entries, todo, route, replies)
            redirected = [i for i in todo if anchor[i] == i and isinstance(replies[i], AskError)]
        return replies

    def _redirects(self, entries, replies, redirected, anchor):
        """Where the redirected entries (and the keyless ones after them) go next."""
        route = {}
        for i in redirected:
            error = replies[i]
            if isinstance(error, MovedError):
                self._moved(error)
                route[i] = (self.lane(entries[i].slot), False)
            else:
                lane = self._asked(error)
                if lane is None:
                    continue  # an unknown node: the ASK reply stays, raised to the caller
                route[i] = (lane, True)
        for i, a in enumerate(anchor):
            if a != i and a in route:
                route[i] = (route[a][0], False)
        return route, sorted(route)

    def _round(self, entries, todo, route, replies) -> None:
        groups: dict[int, tuple] = {}
        for i in todo:
            lane, asking = route[i]
            group = groups.get(id(lane))
            if group is None:
                group = groups[id(lane)] = (lane, [])
            group[1].append((i, asking))
        sent, error, done = [], None, 0
        try:
            for lane, items in groups.values():
                packed = b"".join(_ASKING + entries[i].packed if asking else entries[i].packed
                                  for i, asking in items)
                try:
                    sent.append((lane.send(packed), items))
                except (ConnectionError, TimeoutError) as exc:
                    error = error or exc
            for wire, items in sent:
                done += 1
                try:
                    got = iter(wire.read(len(items) + sum(asking for _, asking in items)))
                except Exception as exc:  # noqa: BLE001 - raised below, once every primary is read
                    error = error or exc
                    continue
                for i, asking in items:
                    if asking:
                        next(got)  # ASKING's OK
                    replies[i] = next(got)
        except BaseException:
            for wire, _ in sent[done:]:
                wire.drop()  # an interrupt: what they owe cannot be read in step any more
            raise
        if error is not None:
            if isinstance(error, (ConnectionError, TimeoutError)):
                self.stale = True
            raise error
        if any(isinstance(replies[i], ClusterDownError) for i in todo):
            self.stale = True

    def load(self, texts: Sequence[str]) -> None:
        """SCRIPT LOAD every text on every primary (one round trip each); an error reply is raised."""
        for lane in self.primaries():
            for reply in lane.execute([("SCRIPT", "LOAD", text) for text in texts]):
                if isinstance(reply, Exception):
                    raise reply

    def close(self) -> None:
        """Disconnect this thread's connection to every primary."""
        for lane in list(self._lanes.values()):
            lane.close()


def _anchors(entries: Sequence[Entry]) -> list:
    """For each entry, the entry whose primary it goes to: itself when it has a slot; for a keyless
    one the script call before it, else the nearest entry with a slot before it, else after it;
    None when no entry has a slot."""
    out: list = []
    last_script = last_keyed = None
    for i, e in enumerate(entries):
        if e.slot is not None:
            out.append(i)
            last_keyed = i
            if e.script:
                last_script = i
        else:
            out.append(last_script if last_script is not None else last_keyed)
    if None in out:
        following = next((i for i, e in enumerate(entries) if e.slot is not None), None)
        out = [following if a is None else a for a in out]
    return out
