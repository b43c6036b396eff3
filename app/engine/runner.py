"""The one path from Python to a Lua script.

Every script call of the service, single or several in one round trip, with or without plain
commands beside it, on one Redis (through a lane, app/engine/lane.py) or a cluster (through a lane
per primary, app/engine/cluster_lane.py), goes through a `ScriptRunner`. It

- knows every script of lua/ by name, with its SHA computed once (the text from app/engine/scripts.py);
- calls them by EVALSHA and, when the server's script cache is empty (a restart, a failover,
  `SCRIPT FLUSH`), loads them all and sends the refused calls once more: NOSCRIPT means the script
  did not run, so that resend cannot apply anything twice (on a cluster MOVED and ASK are
  followed likewise: the call did not run);
- raises every error reply as redis-py's exception for it (`ResponseError` and its subclasses),
  after reading every reply of the round trip, and never returns one as a result.

A connection failure is raised as redis-py's `ConnectionError` / `TimeoutError` and nothing is sent
again on it: a reserve sent twice would reserve twice. A connection found dead *before* a call is
sent on it (closed while it sat idle) is replaced first, by the lane and by redis-py's pool alike.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

from redis.exceptions import NoScriptError

from app.engine import cluster_lane
from app.engine import lane as lane_mod
from app.engine.scripts import key_count, names, source


class Script(NamedTuple):
    """One script call: its name (lua/<name>-<n>.lua), KEYS and ARGV."""

    name: str
    keys: Sequence
    args: Sequence


class Prepared(NamedTuple):
    """A script call whose KEYS are fixed, built once (the reserve's, per variant): on a lane, the
    packed head of its EVALSHA, so each call packs only its arguments; on a cluster also its slot."""

    name: str
    keys: tuple
    head: bytes | None
    slot: int | None = None


Command = tuple  # a plain command as Redis takes it, e.g. ("HGET", key, field)


class ScriptRunner:
    """Loads the scripts once and runs them; see the module docstring."""

    def __init__(self, redis):
        self.redis = redis
        self._sources = {name: source(name) for name in names()}
        self.sha = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._sources.items()}
        self._numkeys = {name: key_count(name) for name in self._sources}
        # the hot path's own connections: on a single Redis (or Sentinel's primary) a lane, on a
        # cluster a lane per primary; any other client (a test double) goes through redis-py
        self.lane = lane_mod.Lane(redis) if lane_mod.supports(redis) else None
        self.router = cluster_lane.ClusterRouter(redis) if cluster_lane.supports(redis) else None

    def load_all(self) -> None:
        """Put every script into the server's cache now (readiness, and after a NOSCRIPT); on a
        cluster into every primary's."""
        if self.router is not None:
            self.router.load(list(self._sources.values()))
            return
        for text in self._sources.values():
            self.redis.script_load(text)

    def close(self) -> None:
        """Disconnect this thread's lane connections."""
        if self.lane is not None:
            self.lane.close()
        if self.router is not None:
            self.router.close()

    # -- calls ----------------------------------------------------------------------------------

    def call(self, name: str, keys: Sequence, args: Sequence):
        """One script call; returns its reply."""
        return self.run([Script(name, keys, args)])[0]

    def run(self, calls: Sequence[Script | Command]) -> list:
        """Script calls and plain commands in one round trip (one per node on a cluster); returns
        their replies in order, HGETALL's as a dict."""
        if not calls:
            return []
        replies = self._send(calls)
        missing = [i for i, (c, r) in enumerate(zip(calls, replies))
                   if isinstance(r, NoScriptError) and isinstance(c, Script)]
        if missing:
            # a keyless command right after a refused call (WAIT) went without it: again, with it
            missing = sorted({*missing, *(j for i in missing for j in _followers(calls, i))})
            self.load_all()
            for i, reply in zip(missing, self._send([calls[i] for i in missing])):
                replies[i] = reply
        _raise_errors(replies)
        return replies

    def prepare(self, name: str, keys: Sequence, nargs: int) -> Prepared:
        """A call of `name` on these KEYS with `nargs` arguments, built once for many calls."""
        if len(keys) != self._numkeys[name]:
            raise ValueError(f"{name} takes {self._numkeys[name]} keys, got {len(keys)}")
        head = slot = None
        if self.lane is not None or self.router is not None:
            head = lane_mod.script_prefix(self.sha[name], len(keys), keys, len(keys) + nargs)
        if self.router is not None:
            slot = cluster_lane.slot_of(keys[0])
        return Prepared(name, tuple(keys), head, slot)

    def call_prepared(self, prep: Prepared, args: Sequence, commands: Sequence[Command] = ()) -> tuple:
        """A prepared call with its arguments, and plain commands beside it in the same round trip;
        returns (the script's reply, the commands' replies)."""
        if prep.head is None:
            replies = self.run([Script(prep.name, prep.keys, args), *commands])
            return replies[0], replies[1:]
        packed = prep.head + lane_mod.bulks(args)
        if prep.slot is not None:
            return self._call_routed(prep.slot, packed, commands)
        if not commands:
            try:
                return self.lane.call(packed), ()
            except NoScriptError:
                self.load_all()
                return self.lane.call(packed), ()
        packed += b"".join(lane_mod.pack(*c) for c in commands)
        count = 1 + len(commands)
        replies = self.lane.call_many(packed, count)
        if isinstance(replies[0], NoScriptError):
            self.load_all()
            replies = self.lane.call_many(packed, count)  # the commands beside it are reads or idempotent
        _raise_errors(replies)
        return replies[0], _shaped(commands, replies[1:])

    def _call_routed(self, slot: int, packed: bytes, commands: Sequence[Command]) -> tuple:
        """`call_prepared` on a cluster: the script on its slot's primary, the commands on theirs (a
        keyless one on the script's connection, after it), one write to each primary."""
        router = self.router
        if not commands:
            try:
                return router.call(slot, packed), ()
            except NoScriptError:
                self.load_all()
                return router.call(slot, packed), ()
        entries = [cluster_lane.Entry(slot, packed, True),
                   *(cluster_lane.Entry(router.command_slot(c), lane_mod.pack(*c), False) for c in commands)]
        replies = router.run(entries)
        if isinstance(replies[0], NoScriptError):
            self.load_all()
            replies = router.run(entries)  # the commands beside it are reads or idempotent
        _raise_errors(replies)
        return replies[0], _shaped(commands, replies[1:])

    # -- sending ----------------------------------------------------------------------------------

    def _send(self, calls: Sequence[Script | Command]) -> list:
        """One round trip; error replies are returned in their places."""
        if self.lane is not None:
            packed = b"".join(self._pack(c) for c in calls)
            return _shaped(calls, self.lane.call_many(packed, len(calls)))
        if self.router is not None:
            return _shaped(calls, self.router.run([self._entry(c) for c in calls]))
        pipe = self.redis.pipeline(transaction=False)
        for c in calls:
            if isinstance(c, Script):
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses the latter
                pipe.execute_command("EVALSHA", self.sha[c.name], len(c.keys), *c.keys, *c.args)
            else:
                pipe.execute_command(*c)
        return pipe.execute(raise_on_error=False)

    def _entry(self, c: Script | Command) -> cluster_lane.Entry:
        if isinstance(c, Script):
            return cluster_lane.Entry(cluster_lane.slot_of(c.keys[0]) if c.keys else None, self._pack(c), True)
        return cluster_lane.Entry(self.router.command_slot(c), self._pack(c), False)

    def _pack(self, c: Script | Command) -> bytes:
        if isinstance(c, Script):
            return lane_mod.pack("EVALSHA", self.sha[c.name], len(c.keys), *c.keys, *c.args)
        return lane_mod.pack(*c)


def _raise_errors(replies: list) -> None:
    """Raise the first error reply: redis-py's class for it, a `ResponseError` or, for LOADING, a
    `BusyLoadingError` (which redis-py files under ConnectionError)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _followers(calls: Sequence, i: int):
    """The keyless commands right after calls[i] (WAIT counts the writes before it on its connection)."""
    for j in range(i + 1, len(calls)):
        c = calls[j]
        if isinstance(c, Script) or str(c[0]).upper() not in cluster_lane.KEYLESS:
            return
        yield j


def _shaped(calls: Sequence, replies: list) -> list:
    """A lane's raw replies as redis-py shapes them where it matters here: HGETALL as a dict."""
    out = list(replies)
    for i, c in enumerate(calls):
        if not isinstance(c, Script) and c[0].upper() == "HGETALL" and isinstance(out[i], list):
            out[i] = lane_mod.as_dict(out[i])
    return out
