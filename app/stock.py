"""The reservation engine: the only module that reads or changes stock in Redis.

Every change goes through one of the Lua scripts in lua/ (see each file's header); this module
turns their return codes into domain errors and adds the database reads a script needs (on_hand
and version when counters must be rebuilt, and for the reconciler).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence

from redis.exceptions import NoScriptError, ResponseError
from sqlalchemy import func, select

from app import clock, keys
from app.engine import lane
from app.errors import Conflict, InsufficientStock, LimitExceeded, NotFound, StockBelowReserved
from app.metrics import HOLDS, RECONCILE_DRIFT, REJECTIONS
from app.scripts import Scripts
from persistence.models import Order, OrderLine, Stock

log = logging.getLogger(__name__)

HOLD_SEP = "~"
_RESERVED = HOLDS.labels("reserved")
SWEEP_SCRIPT_LIMIT = 1000


class CheckoutInProgress(Conflict):
    code = "checkout_in_progress"


# --- hold ids --------------------------------------------------------------------------------

_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)  # a forked child must not repeat its parent's numbers


def new_gen() -> str:
    """A fresh hold's generation: random, to tell a hold from an earlier one under the same id
    (not a secret; seeded from os.urandom per process, so no system call per reserve)."""
    return "%08x" % _rng.getrandbits(32)


def hold_id_for(variant_id: int, user_id: str) -> str:
    """One hold (and cart line) per customer and variant: a second add merges into it."""
    return f"{int(variant_id)}{HOLD_SEP}{user_id}"


def parse_hold_id(hold_id: str) -> tuple[int, str] | None:
    """(variant_id, user_id) of a hold id, or None if it is not one."""
    vid, sep, user = hold_id.partition(HOLD_SEP)
    if not sep or not vid.isdigit() or not user or len(vid) > 10:
        return None
    return int(vid), user


# --- values ------------------------------------------------------------------------------------

class Reservation(NamedTuple):
    """What a reserve did (a named tuple: built on every add-to-cart, at a fifth of a dataclass' cost)."""

    variant_id: int
    hold_id: str
    quantity: int
    expires_ms: int
    available: int
    gen: str
    also: tuple = ()


@dataclass(frozen=True)
class Counters:
    variant_id: int
    available: int
    reserved: int
    active_holds: int
    version: int


@dataclass(frozen=True)
class HoldView:
    quantity: int
    expires_ms: int
    state: str  # "held" | "locked"
    user: str
    gen: str
    token: str
    locked_ms: int


@dataclass(frozen=True)
class LockResult:
    variant_id: int
    hold_id: str
    ok: bool
    quantity: int = 0
    gen: str = ""
    user: str = ""
    reason: str = ""  # missing | expired | locked


@dataclass(frozen=True)
class Finalization:
    variant_id: int
    hold_id: str
    gen: str
    quantity: int
    user: str
    new_version: int


@dataclass
class SweepReport:
    variants: int = 0
    holds: int = 0
    units: int = 0


@dataclass
class ReconcileReport:
    checked: int = 0
    drifted: int = 0
    repaired: int = 0
    skipped: int = 0
    rebuilt: int = 0
    locks_finalized: int = 0
    locks_released: int = 0
    rows: list[dict] = field(default_factory=list)
    skipped_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked, "drifted": self.drifted, "repaired": self.repaired,
            "skipped": self.skipped, "rebuilt": self.rebuilt, "locks_finalized": self.locks_finalized,
            "locks_released": self.locks_released, "rows": self.rows,
        }


def unpack_hold(raw: str | None) -> HoldView | None:
    if not raw:
        return None
    parts = raw.split("|")
    if len(parts) != 7:
        return None
    qty, exp, state, user, gen, token, lockms = parts
    return HoldView(int(qty), int(exp), "locked" if state == "l" else "held", user, gen, token, int(lockms or 0))


class _ReserveHead(NamedTuple):
    """What a variant's reserve calls share, built once: the start of its hold ids, its KEYS, and
    the packed head of the EVALSHA (app/engine/lane.py)."""

    hold_prefix: str
    keys: list
    packed: bytes


def _raw_replies(commands: Sequence[tuple], replies: list) -> list:
    """Replies read off a lane: an error reply is raised, HGETALL's flat list is a dict."""
    out = []
    for cmd, reply in zip(commands, replies):
        if isinstance(reply, ResponseError):
            raise reply
        out.append(lane.as_dict(reply) if cmd[0].upper() == "HGETALL" else reply)
    return out


# --- the engine ----------------------------------------------------------------------------------

class StockEngine:
    """Typed operations on the live counters and holds."""

    def __init__(self, redis, sessions, settings):
        self.redis = redis
        self.sessions = sessions
        self.settings = settings
        self.scripts = Scripts(redis)
        self.ttl_ms = settings.hold_ttl_seconds * 1000
        self.grace_ms = settings.checkout_grace_seconds * 1000
        self._key_cache: dict[int, tuple[str, ...]] = {}
        # the hot path's own connections (app/engine/lane.py); a cluster client routes each call itself
        self.lane = lane.Lane(redis) if lane.supports(redis) else None
        self._reserve_heads: dict[int, _ReserveHead] = {}
        self._sha = {name: self.scripts[name].sha for name in ("reserveHold", "releaseHold", "lockHold",
                     "finalizeHold", "unlockHold", "adjustStock", "initStock", "sweepHolds", "reconcileStock",
                     "dropCartLines")}

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect this thread's hot-path connection."""
        if self.lane is not None:
            self.lane.close()

    def ensure_scripts_loaded(self) -> None:
        """Load every script into the server's cache (readiness)."""
        self.scripts.load_all()

    @staticmethod
    def _variant_keys(variant_id: int) -> list[str]:
        """A variant's stock, holds, expiry and customer keys: the KEYS of the hold scripts."""
        return [keys.stock(variant_id), keys.holds(variant_id), keys.hold_expiry(variant_id),
                keys.customer_units(variant_id)]

    def _indexed_keys(self, variant_id: int) -> list[str]:
        """The variant's keys, its slot's sweep index and its timer: the KEYS of the reserve, sweep
        and reconcile scripts. Built once per variant (reserve uses them on every call)."""
        cached = self._key_cache.get(variant_id)
        if cached is None:
            if len(self._key_cache) > 100_000:
                self._key_cache.clear()
            cached = (*self._variant_keys(variant_id), keys.sweep_index(variant_id), keys.variant_timer(variant_id))
            self._key_cache[variant_id] = cached
        return list(cached)

    def _run(self, calls: Sequence[tuple]) -> list:
        """Run script calls ("script", name, keys, args) and plain commands (see _cmd)
        in one pipeline (one round trip on a single node). A script missing from the server's cache
        (restart, failover, SCRIPT FLUSH) is loaded and that call alone is sent again: NOSCRIPT means
        it did not run."""
        results = self._pipeline(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            self.scripts.load_all()
            again = self._pipeline([calls[i] for i in missing])
            for i, r in zip(missing, again):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def _pipeline(self, calls: Sequence[tuple]) -> list:
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            if call[0] == "script":
                _, name, ks, args = call
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the latter
                pipe.execute_command("EVALSHA", self._sha[name], len(ks), *ks, *args)
            elif call[0] == "raw":
                pipe.execute_command(*call[1])
            else:
                _, method, args, kwargs = call
                getattr(pipe, method)(*args, **kwargs)
        return pipe.execute(raise_on_error=False)

    def _eval(self, name: str, ks: list[str], args: list):
        """One script call, straight (no pipeline object): the hot path's cheapest form."""
        try:
            return self.redis.execute_command("EVALSHA", self._sha[name], len(ks), *ks, *args)
        except NoScriptError:
            self.scripts.load_all()
            return self.redis.execute_command("EVALSHA", self._sha[name], len(ks), *ks, *args)

    @staticmethod
    def _cmd(method: str, *args, **kwargs) -> tuple:
        return ("cmd", method, args, kwargs)

    def _script(self, name: str, ks: list[str], args: list) -> list:
        return self._run([("script", name, ks, args)])[0]

    # -- counters ---------------------------------------------------------------------------------

    def rebuild_from_db(self, variant_ids: Iterable[int]) -> None:
        """Build missing counters from the database's on_hand and the live holds (atomic, idempotent)."""
        ids = list(variant_ids)
        with self.sessions() as s:
            rows = {r.variant_id: (r.on_hand, r.version) for r in
                    s.execute(select(Stock.variant_id, Stock.on_hand, Stock.version)
                              .where(Stock.variant_id.in_(ids)))}
        limit = self.settings.max_units_per_customer
        ordered: dict[int, list] = {vid: [] for vid in ids}
        if limit > 0:
            # the per-customer count includes units already ordered: rebuild it from the orders
            with self.sessions() as s:
                for vid, user, units in s.execute(
                        select(OrderLine.variant_id, Order.user_id, func.sum(OrderLine.quantity))
                        .join(Order, Order.id == OrderLine.order_id)
                        .where(OrderLine.variant_id.in_(ids))
                        .group_by(OrderLine.variant_id, Order.user_id)):
                    ordered[vid] += [user, int(units)]
        calls = []
        for vid in ids:
            if vid not in rows:
                raise NotFound("variant", vid)
            on_hand, version = rows[vid]
            calls.append(("script", "initStock", self._variant_keys(vid)[:4],
                          [on_hand, version, limit, *ordered[vid]]))
        results = self._run(calls)
        for vid, res in zip(ids, results):
            if res[0] == 1:
                log.info("rebuilt counters of variant %s from the database: available=%s reserved=%s",
                         vid, res[1], res[2])

    def counters(self, variant_ids: Sequence[int]) -> dict[int, Counters]:
        """Live counters per variant; missing ones are rebuilt from the database first."""
        ids = [int(v) for v in variant_ids]
        if not ids:
            return {}
        out = self._read_counters(ids)
        missing = [vid for vid in ids if vid not in out]
        if missing:
            self.rebuild_from_db(missing)
            out.update(self._read_counters(missing))
        return out

    def _read_counters(self, ids: list[int]) -> dict[int, Counters]:
        calls = []
        for vid in ids:
            calls.append(self._cmd("hmget", keys.stock(vid), ["available", "reserved", "version"]))
            calls.append(self._cmd("hlen", keys.holds(vid)))
        results = self._run(calls)
        out = {}
        for i, vid in enumerate(ids):
            (available, reserved, version), holds = results[2 * i], results[2 * i + 1]
            if available is None:
                continue
            out[vid] = Counters(vid, int(available), int(reserved or 0), int(holds), int(version or 0))
        return out

    def active_holds(self, variant_ids: Sequence[int]) -> dict[int, int]:
        """Number of live holds per variant."""
        ids = list(variant_ids)
        results = self._run([self._cmd("hlen", keys.holds(vid)) for vid in ids]) if ids else []
        return {vid: int(n) for vid, n in zip(ids, results)}

    def variants_with_holds(self) -> int:
        """How many variants have at least one hold (from the sweep indexes of every slot)."""
        return sum(int(n) for n in self._run([self._cmd("zcard", k) for k in keys.sweep_indexes()]))

    def forget(self, variant_id: int) -> None:
        """Drop a deleted variant's counters and holds from Redis."""
        self._run([self._cmd("delete", *self._variant_keys(variant_id), keys.variant_timer(variant_id)),
                   self._cmd("zrem", keys.sweep_index(variant_id), str(variant_id))])

    # -- holds ------------------------------------------------------------------------------------

    def reserve(self, variant_id: int, user_id: str, quantity: int, *, mode: str = "add",
                now: int | None = None, ttl_ms: int | None = None, limit: int | None = None,
                gen: str | None = None, also: Sequence[tuple] = ()) -> Reservation:
        """Reserve `quantity` more units (mode "add"), make the hold exactly `quantity` (mode "set"),
        or give back `quantity` units of it (mode "sub", to undo an add).

        `gen`: the generation a fresh hold gets (default: a new random one); a live hold keeps its own.
        `also`: plain commands as Redis takes them, e.g. ("GET", key), sent in the same round
        trip; their replies (HGETALL as a dict) are on the returned reservation's `also`.

        Raises:
            InsufficientStock, LimitExceeded, CheckoutInProgress, NotFound (no such variant).
        """
        now = clock.now_ms() if now is None else now
        ttl = self.ttl_ms if ttl_ms is None else ttl_ms
        limit = self.settings.max_units_per_customer if limit is None else limit
        head = self._reserve_heads.get(variant_id) or self._reserve_head(variant_id)
        hold_id = f"{head.hold_prefix}{user_id}"
        # the call's changing part: its arguments (every KEY is the variant's own, packed once)
        tail = (hold_id, quantity, now, ttl, user_id, mode, limit, gen or new_gen())
        if self.lane is not None and not also:
            res, replies = self._lane_eval(head.packed + lane.bulks(tail)), ()  # the flash-sale path
        else:
            res, replies = self._reserve_call(head, tail, also)
        if res[0] == 1 and not res[5]:
            _RESERVED.inc()
            # tuple.__new__: the named tuple without its Python-level __new__ (a frame per reserve)
            return tuple.__new__(Reservation, (variant_id, hold_id, res[2], res[3], res[1], res[4], replies))
        return self._reserved_or_raise(variant_id, head, tail, also, res, replies)

    def _reserved_or_raise(self, variant_id: int, head: "_ReserveHead", tail: tuple, also: Sequence[tuple],
                           res: list, replies: tuple) -> Reservation:
        """Everything but the common reply: a new earliest expiry (its due hint), counters to
        rebuild first (then one call again), and the refusals as domain errors."""
        hold_id, quantity, limit = tail[0], tail[1], tail[6]
        if res[0] == -1:
            self.rebuild_from_db([variant_id])
            res, more = self._reserve_call(head, tail, also)
            replies = replies or more
            if res[0] == -1:
                raise RuntimeError(f"counters of variant {variant_id} could not be rebuilt")
        code = res[0]
        if code == 1:
            _RESERVED.inc()
            if int(res[5]):
                # this hold is its variant's earliest: tell the listener's fast path (a hint;
                # later holds of a busy variant expire after it and need no write)
                self._plain([("ZADD", keys.due_hint(variant_id), "LT", int(res[3]), str(variant_id))])
            return Reservation(variant_id, hold_id, res[2], res[3], res[1], res[4], replies)
        if code == -2:
            REJECTIONS.labels("insufficient_stock").inc()
            raise InsufficientStock(variant_id, int(res[1]), quantity)
        if code == -3:
            REJECTIONS.labels("limit_exceeded").inc()
            raise LimitExceeded(variant_id, limit, int(res[1]), quantity)
        if code == -4:
            REJECTIONS.labels("checkout_in_progress").inc()
            raise CheckoutInProgress("This item is being checked out", {"variant_id": variant_id})
        raise RuntimeError(f"reserveHold returned {res!r}")

    def _reserve_head(self, variant_id: int) -> "_ReserveHead":
        if len(self._reserve_heads) > 100_000:
            self._reserve_heads.clear()
        fixed = self._indexed_keys(variant_id)
        head = self._reserve_heads[variant_id] = _ReserveHead(
            hold_id_for(variant_id, ""), fixed, lane.script_prefix(self._sha["reserveHold"], 6, fixed, 6 + 8))
        return head

    def _reserve_call(self, head: "_ReserveHead", tail: tuple, also: Sequence[tuple]) -> tuple[list, tuple]:
        """One reserveHold call with the `also` commands beside it, in one round trip."""
        if self.lane is None:
            ks = list(head.keys)
            if not also:
                return self._eval("reserveHold", ks, list(tail)), ()
            res, *more = self._run([("script", "reserveHold", ks, list(tail)),
                                    *(("raw", c) for c in also)])
            return res, tuple(more)
        packed = head.packed + lane.bulks(tail)
        if not also:
            return self._lane_eval(packed), ()
        packed += b"".join(lane.pack(*c) for c in also)
        results = self.lane.call_many(packed, 1 + len(also))
        if isinstance(results[0], NoScriptError):
            self.scripts.load_all()
            results = self.lane.call_many(packed, 1 + len(also))
        return results[0], tuple(_raw_replies(also, results[1:]))

    def _lane_eval(self, packed: bytes):
        """One packed EVALSHA through the lane; a script missing from the server's cache (restart,
        failover, SCRIPT FLUSH) is loaded and the call sent again: NOSCRIPT means it did not run."""
        try:
            return self.lane.call(packed)
        except NoScriptError:
            self.scripts.load_all()
            return self.lane.call(packed)

    def _plain(self, commands: Sequence[tuple]) -> list:
        """Plain commands as Redis takes them, e.g. ("HGET", key, field), in one round trip; HGETALL
        replies as dicts."""
        if self.lane is None:
            return self._run([("raw", c) for c in commands])
        return _raw_replies(commands, self.lane.execute(commands))

    def release(self, variant_id: int, hold_id: str, *, only_if_expired: bool = False,
                now: int | None = None, gen: str = "") -> int:
        """Release a hold; returns the units given back (0 if there was nothing to release)."""
        return self.release_many([(variant_id, hold_id)], only_if_expired=only_if_expired, now=now, gen=gen)[0]

    def release_many(self, holds: Sequence[tuple[int, str]], *, only_if_expired: bool = False,
                     now: int | None = None, gen: str = "") -> list[int]:
        """Release several holds in one round trip; returns units given back per hold."""
        mode = "expired" if only_if_expired else "any"
        out = []
        for res in self._release(holds, mode, gen, now):
            released = int(res[1]) if res[0] == 1 else 0
            if res[0] == 1:
                HOLDS.labels("expired" if only_if_expired else "released").inc()
            out.append(released)
        return out

    def release_lapsed(self, holds: Sequence[tuple[int, str]], now: int | None = None) -> list[tuple[int, int]]:
        """Release holds whose expiry time has passed (the listener's path).

        Returns per hold (units released, expiry ms when the hold is not yet due else 0): a timer
        can fire a little before this process's clock reaches the expiry, and the caller retries then.
        """
        out = []
        for res in self._release(holds, "expired", "", now):
            if res[0] == 1:
                HOLDS.labels("expired").inc()
                out.append((int(res[1]), 0))
            elif res[0] == -1:
                out.append((0, int(res[1])))
            else:
                out.append((0, 0))
        return out

    def _release(self, holds: Sequence[tuple[int, str]], mode: str, gen: str, now: int | None) -> list:
        now = clock.now_ms() if now is None else now
        calls = [("script", "releaseHold", self._variant_keys(vid), [hid, now, mode, gen])
                 for vid, hid in holds]
        return self._run(calls) if calls else []

    def holds(self, pairs: Sequence[tuple[int, str]]) -> list[HoldView | None]:
        """The current state of each (variant_id, hold_id): None when there is no such hold."""
        return self.read_holds(pairs)[0] if pairs else []

    def read_holds(self, pairs: Sequence[tuple[int, str]],
                   also: Sequence[tuple] = ()) -> tuple[list[HoldView | None], list]:
        """Holds as `holds` does, with the caller's own commands as Redis takes them (e.g.
        ("HSET", key, f, v)) sent first in the same round trip; returns (holds, replies to `also`)."""
        results = self._plain([*also, *(("HGET", keys.holds(vid), hid) for vid, hid in pairs)])
        return [unpack_hold(r) for r in results[len(also):]], results[:len(also)]

    # -- checkout ---------------------------------------------------------------------------------

    def lock_many(self, holds: Sequence[tuple[int, str]], token: str, now: int | None = None) -> list[LockResult]:
        """Lock holds for a checkout in one round trip; lapsed ones are released and refused."""
        now = clock.now_ms() if now is None else now
        calls = [("script", "lockHold", self._variant_keys(vid), [hid, token, now]) for vid, hid in holds]
        out = []
        for (vid, hid), res in zip(holds, self._run(calls)):
            if res[0] == 1:
                out.append(LockResult(vid, hid, True, int(res[1]), res[2], res[3]))
            else:
                out.append(LockResult(vid, hid, False, reason={-1: "missing", -2: "expired", -3: "locked"}[res[0]]))
        return out

    def unlock_many(self, locks: Sequence[tuple[int, str, str]], now: int | None = None) -> list[int]:
        """Undo locks (variant_id, hold_id, gen): held again, or released if lapsed meanwhile."""
        now = clock.now_ms() if now is None else now
        calls = [("script", "unlockHold", self._variant_keys(vid), [hid, gen, now]) for vid, hid, gen in locks]
        return [int(r[0]) for r in self._run(calls)] if calls else []

    def finalize_many(self, items: Sequence[Finalization]) -> list[int]:
        """Finalize locked holds whose order is committed (idempotent)."""
        calls = [("script", "finalizeHold", self._variant_keys(f.variant_id),
                  [f.hold_id, f.gen, f.quantity, f.new_version, f.user, self.settings.max_units_per_customer])
                 for f in items]
        out = [int(r[0]) for r in self._run(calls)] if calls else []
        HOLDS.labels("committed").inc(sum(1 for r in out if r))
        return out

    def drop_cart_lines(self, lines: Sequence[tuple[str, str, str]]) -> int:
        """Remove (user, item id, gen) cart lines of finalized holds; a newer line under the same
        item id is kept. Returns lines removed."""
        by_user: dict[str, list] = {}
        for user, item_id, gen in lines:
            by_user.setdefault(user, []).extend([item_id, gen])
        calls = [("script", "dropCartLines", [keys.cart(user)], args) for user, args in by_user.items()]
        return sum(int(n) for n in self._run(calls)) if calls else 0

    # -- adjustments ------------------------------------------------------------------------------

    def adjust_phase(self, variant_id: int, phase: str, delta: int, now: int | None = None) -> tuple[int, int, int]:
        """One phase of an adjustment's Redis half; returns (available, reserved, version).

        Raises:
            StockBelowReserved: in "begin", when the units to remove are not available.
        """
        now = clock.now_ms() if now is None else now
        for _ in range(2):
            res = self._script("adjustStock", [keys.stock(variant_id)], [phase, delta, now])
            if res[0] == 1:
                return int(res[1]), int(res[2]), int(res[3])
            if res[0] == -1:
                self.rebuild_from_db([variant_id])
                continue
            if res[0] == -2:
                raise StockBelowReserved(variant_id, int(res[1]), delta)
        raise RuntimeError(f"counters of variant {variant_id} could not be rebuilt")

    # -- expiry -----------------------------------------------------------------------------------

    def sweep(self, now: int | None = None, batch: int = 500, max_rounds: int = 1000,
              revisit_ms: int = 1000) -> SweepReport:
        """Release every lapsed hold. Variants with holds are found through the sweep index of each
        hash slot (kept exact by the reserve, sweep and reconcile scripts), so this works the same on
        one Redis and on every node of a cluster: no KEYS, no SCAN."""
        report = SweepReport()
        indexes = keys.sweep_indexes()
        # One time for the whole sweep: what a script re-indexes for later is not due again in it.
        now_ = clock.now_ms() if now is None else now
        slots = list(range(len(indexes)))
        for _ in range(max_rounds):
            reads = self._run([self._cmd("zrangebyscore", indexes[slot], "-inf", now_, start=0, num=batch)
                               for slot in slots])
            due = [(slot, int(v)) for slot, members in zip(slots, reads) for v in members]
            if not due:
                break
            again = {slot for slot, members in zip(slots, reads) if len(members) >= batch}
            for i in range(0, len(due), 1000):
                chunk = due[i:i + 1000]
                results = self._sweep_variants([v for _, v in chunk], now_, revisit_ms, report)
                again.update(slot for (slot, _v), res in zip(chunk, results) if int(res[0]) >= SWEEP_SCRIPT_LIMIT)
            if not again:
                break
            slots = sorted(again)
        return report

    def sweep_variants(self, variant_ids: Iterable[int], now: int | None = None,
                       revisit_ms: int = 1000) -> SweepReport:
        """Release the lapsed holds of these variants and re-arm their timers (the listener's path,
        on the timers' expired events); idempotent."""
        report = SweepReport()
        ids = list(dict.fromkeys(int(v) for v in variant_ids))
        if ids:
            self._sweep_variants(ids, clock.now_ms() if now is None else now, revisit_ms, report)
        return report

    def _sweep_variants(self, variant_ids: list[int], now: int, revisit_ms: int, report: SweepReport) -> list:
        """Run the sweep script on each variant (one round trip), add up the report; returns the
        scripts' replies {released holds, released units, earliest expiry left, holds left}."""
        results = self._run([("script", "sweepHolds", self._indexed_keys(v), [now, SWEEP_SCRIPT_LIMIT, v, revisit_ms])
                             for v in variant_ids])
        for count, units, _earliest, _left in results:
            report.variants += 1
            report.holds += int(count)
            report.units += int(units)
        if any(int(r[0]) for r in results):
            HOLDS.labels("expired").inc(sum(int(r[0]) for r in results))
        return results

    def sweep_due(self, now: int | None = None, batch: int = 500, revisit_ms: int = 1000) -> SweepReport:
        """The listener's fast path: sweep the variants the due hints name (a few reads, not the
        16,384 slot indexes), so holds come back within about a second even when Redis's own
        expiry of timer keys lags (it does with many live keys: its expiry cycle only samples)."""
        report = SweepReport()
        now_ = clock.now_ms() if now is None else now
        hints = keys.due_hints()
        reads = self._run([self._cmd("zrangebyscore", h, "-inf", now_, start=0, num=batch) for h in hints])
        due = [(h, int(v)) for h, members in zip(hints, reads) for v in members]
        if not due:
            return report
        # remove first: a reserve landing meanwhile adds its hint again after its own script ran
        self._run([self._cmd("zrem", h, *members) for h, members in zip(hints, reads) if members])
        results = self._sweep_variants([v for _, v in due], now_, revisit_ms, report)
        again = []
        for (h, v), (count, _units, earliest, _left) in zip(due, results):
            if int(count) >= SWEEP_SCRIPT_LIMIT:
                again.append(self._cmd("zadd", h, {str(v): now_}, lt=True))
            elif int(earliest) >= 0:
                again.append(self._cmd("zadd", h, {str(v): max(int(earliest), now_ + revisit_ms)}, lt=True))
        if again:
            self._run(again)
        return report

    # -- reconciliation ---------------------------------------------------------------------------

    def reconcile(self, variant_ids: Sequence[int] | None = None, *, dry_run: bool = False,
                  now: int | None = None, grace_ms: int | None = None, batch: int = 500,
                  progress: Callable[[int], None] | None = None) -> ReconcileReport:
        """Compare and repair the live counters against the database (DESIGN.md, Reconciliation).

        Locked holds older than the grace period are resolved first: finalized when their order
        exists, unlocked (or released, if lapsed) when it does not.
        """
        grace = self.grace_ms if grace_ms is None else grace_ms
        report = ReconcileReport()
        for rows in self._stock_batches(variant_ids, batch):
            self._reconcile_batch(rows, report, dry_run, now, grace, second_pass=False)
            if progress:
                progress(len(rows))
        if report.drifted:
            RECONCILE_DRIFT.labels("found").inc(report.drifted)
        if report.repaired:
            RECONCILE_DRIFT.labels("repaired").inc(report.repaired)
        return report

    def _stock_batches(self, variant_ids: Sequence[int] | None, batch: int):
        query = select(Stock.variant_id, Stock.on_hand, Stock.version).order_by(Stock.variant_id)
        if variant_ids is not None:
            ids = sorted({int(v) for v in variant_ids})
            for i in range(0, len(ids), batch):
                chunk = ids[i:i + batch]
                with self.sessions() as s:
                    rows = [tuple(r) for r in s.execute(query.where(Stock.variant_id.in_(chunk)))]
                found = {r[0] for r in rows}
                for vid in chunk:
                    if vid not in found:
                        raise NotFound("variant", vid)
                yield rows
            return
        last = 0
        while True:
            with self.sessions() as s:
                rows = [tuple(r) for r in s.execute(query.where(Stock.variant_id > last).limit(batch))]
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def _reconcile_batch(self, rows, report: ReconcileReport, dry_run: bool, now, grace: int,
                         second_pass: bool) -> None:
        now_ = clock.now_ms() if now is None else now
        calls = [("script", "reconcileStock", self._indexed_keys(vid),
                  [on_hand, version, now_, grace, 1 if dry_run else 0])
                 for vid, on_hand, version in rows]
        results = self._run(calls)
        stale: list[tuple[int, list]] = []
        missing = [vid for (vid, _o, _v), res in zip(rows, results) if res[0] == 2]
        if missing and not dry_run:
            self.rebuild_from_db(missing)
        for (vid, on_hand, version), res in zip(rows, results):
            status, available, reserved, exp_available, exp_reserved, earliest, locks = res
            if status == -3 and not second_pass:
                stale.append((vid, locks))
                continue
            report.checked += 1
            if status in (-1, -2, -3):
                report.skipped += 1
                report.skipped_ids.append(vid)
                continue
            if status == 2:
                report.rebuilt += 1
                if int(exp_reserved) == 0:
                    # never built yet (a new variant, a fresh Redis) and nothing held: not drift
                    continue
            if status in (1, 2):
                report.drifted += 1
                if not dry_run:
                    report.repaired += 1
                actual_a = None if status == 2 else int(available)
                actual_r = None if status == 2 else int(reserved)
                if actual_a != int(exp_available):
                    report.rows.append({"variant_id": vid, "field": "available",
                                        "expected": int(exp_available), "actual": actual_a})
                if actual_r != int(exp_reserved):
                    report.rows.append({"variant_id": vid, "field": "reserved",
                                        "expected": int(exp_reserved), "actual": actual_r})
                if actual_a == int(exp_available) and actual_r == int(exp_reserved):
                    report.rows.append({"variant_id": vid, "field": "version", "expected": version,
                                        "actual": None})
        if stale:
            if not dry_run:
                self._resolve_stale_locks(stale, report, now_)
            redo_ids = [vid for vid, _ in stale]
            with self.sessions() as s:
                fresh = [tuple(r) for r in s.execute(
                    select(Stock.variant_id, Stock.on_hand, Stock.version).where(Stock.variant_id.in_(redo_ids))
                    .order_by(Stock.variant_id))]
            self._reconcile_batch(fresh, report, dry_run, now, grace, second_pass=True)

    def _resolve_stale_locks(self, stale: list[tuple[int, list]], report: ReconcileReport, now: int) -> None:
        """A checkout that crashed after locking: finalize if its order exists, else unlock."""
        locks = []
        for vid, flat in stale:
            for i in range(0, len(flat), 5):
                hold_id, gen, token, qty, user = flat[i:i + 5]
                locks.append((vid, hold_id, gen, token, int(qty), user))
        tokens = {lock[3] for lock in locks}
        with self.sessions() as s:
            committed = set(s.scalars(select(Order.checkout_token).where(Order.checkout_token.in_(tokens))))
        to_finalize = [Finalization(vid, hid, gen, qty, user, 0)
                       for vid, hid, gen, token, qty, user in locks if token in committed]
        to_unlock = [(vid, hid, gen) for vid, hid, gen, token, _q, _u in locks if token not in committed]
        if to_finalize:
            self.finalize_many(to_finalize)
            self.drop_cart_lines([(f.user, f.hold_id, f.gen) for f in to_finalize])
            report.locks_finalized += len(to_finalize)
            log.warning("reconciler finalized %d hold(s) of checkouts that committed but did not finish",
                        len(to_finalize))
        if to_unlock:
            self.unlock_many(to_unlock, now=now)  # the reconcile's own time: a lapsed hold is released
            report.locks_released += len(to_unlock)
            log.warning("reconciler unlocked %d hold(s) of checkouts that never committed", len(to_unlock))

