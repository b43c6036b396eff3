"""The hold lifecycle in Redis: reserve, release, lock, unlock, finalize, adjust.

Every change is one of the Lua scripts of lua/ (see each file's header), run through the one
runner; this module turns their return codes into domain errors. It speaks Redis only: when a
variant's counters are missing (a new variant, a Redis that came back empty) it asks the stock
repository (persistence/repository.py) for `on_hand` and rebuilds them.
"""
from __future__ import annotations

import logging
from typing import Iterable, NamedTuple, Sequence

from app import clock, keys
from app.engine.holdrec import HoldView, hold_id_for, new_gen, unpack_hold
from app.engine.runner import Command, Prepared, Script, ScriptRunner
from app.errors import CheckoutInProgress, InsufficientStock, LimitExceeded, NotFound, StockBelowReserved, Unavailable
from app.metrics import HOLDS, REJECTIONS

log = logging.getLogger(__name__)

_RESERVED = HOLDS.labels("created")  # API.md's label: every reserve that succeeded (a hold made or resized)
MAX_CACHED_VARIANTS = 100_000  # per-variant keys and prepared calls kept per process


class Reservation(NamedTuple):
    """What a reserve did (a named tuple: built on every add-to-cart, at a fifth of a dataclass' cost).
    `beside`: the replies of the commands sent beside the reserve (see `Holds.reserve`)."""

    variant_id: int
    hold_id: str
    quantity: int
    expires_ms: int
    available: int
    gen: str
    beside: tuple = ()


class Counters(NamedTuple):
    variant_id: int
    available: int
    reserved: int
    active_holds: int
    version: int


class LockResult(NamedTuple):
    variant_id: int
    hold_id: str
    ok: bool
    quantity: int = 0
    gen: str = ""
    user: str = ""
    reason: str = ""  # missing | expired | locked


class Finalization(NamedTuple):
    variant_id: int
    hold_id: str
    gen: str
    quantity: int
    user: str
    new_version: int


_LOCK_REFUSALS = {-1: "missing", -2: "expired", -3: "locked"}


class NotReplicated(Unavailable):
    """HOLD_DURABILITY=replicated: no replica acknowledged a reserve within HOLD_REPLICA_TIMEOUT_MS,
    and what it reserved was given back: 503 `unavailable` with Retry-After (counted, like every
    503 for Redis, in inventory_store_errors_total{store="redis"})."""

    def __init__(self, retry_after: int = 1):
        super().__init__("redis", retry_after)
        self.message = "No replica confirmed the hold in time; nothing was reserved, retry shortly"
        self.details = {"store": "redis", "reason": "not_replicated"}


def replica_wait(settings) -> Command | None:
    """The command that makes a reserve durable (HOLD_DURABILITY=replicated): `WAIT 1 <ms>` sent
    last in the reserve's round trip, on its connection, so its reply says whether a replica has
    every write of that round trip (the reserve and the commands beside it). None for `local`.
    On a Redis Cluster, the runner sends a keyless command to the node of the script call before it."""
    if getattr(settings, "hold_durability", "local") != "replicated":
        return None
    return ("WAIT", 1, int(settings.hold_replica_timeout_ms))


def variant_keys(variant_id: int) -> list[str]:
    """A variant's stock, holds, expiry and customer keys: the KEYS of the hold scripts."""
    return [keys.stock(variant_id), keys.holds(variant_id), keys.hold_expiry(variant_id),
            keys.customer_units(variant_id)]


def hold_reads(pairs: Sequence[tuple[int, str]]) -> list[Command]:
    """The commands that read these (variant_id, hold_id) records; parse each reply with unpack_hold."""
    return [("HGET", keys.holds(vid), hid) for vid, hid in pairs]


class _Reserve(NamedTuple):
    """What a variant's reserve calls share, built once: the start of its hold ids and the call."""

    hold_prefix: str
    call: Prepared


class Holds:
    """Typed operations on the live counters and holds of variants."""

    def __init__(self, runner: ScriptRunner, repository, settings):
        self.runner = runner
        self.repository = repository
        self.settings = settings
        self.ttl_ms = settings.hold_ttl_seconds * 1000
        self._indexed: dict[int, tuple[str, ...]] = {}
        self._reserves: dict[int, _Reserve] = {}
        self.wait = replica_wait(settings)  # None unless HOLD_DURABILITY=replicated

    def indexed_keys(self, variant_id: int) -> list[str]:
        """The variant's keys, its slot's sweep index and its timer: the KEYS of the reserve, sweep
        and reconcile scripts. Built once per variant (reserve uses them on every call)."""
        cached = self._indexed.get(variant_id)
        if cached is None:
            if len(self._indexed) >= MAX_CACHED_VARIANTS:
                self._indexed.clear()
            cached = (*variant_keys(variant_id), keys.sweep_index(variant_id), keys.variant_timer(variant_id))
            self._indexed[variant_id] = cached
        return list(cached)

    # -- counters ---------------------------------------------------------------------------------

    def rebuild(self, variant_ids: Iterable[int]) -> None:
        """Build missing counters from the database's on_hand and the live holds (atomic, idempotent).

        Raises:
            NotFound: a variant that is not in the database.
        """
        ids = list(variant_ids)
        levels = self.repository.levels(ids)
        limit = self.settings.max_units_per_customer
        # the per-customer count includes units already ordered: rebuild it from the orders
        ordered = self.repository.ordered_units(ids) if limit > 0 else {}
        calls = []
        for vid in ids:
            if vid not in levels:
                raise NotFound("variant", vid)
            on_hand, version = levels[vid]
            flat = [x for user, units in ordered.get(vid, ()) for x in (user, units)]
            calls.append(Script("initStock", variant_keys(vid), [on_hand, version, limit, *flat]))
        for vid, res in zip(ids, self.runner.run(calls)):
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
            self.rebuild(missing)
            out.update(self._read_counters(missing))
        return out

    def _read_counters(self, ids: list[int]) -> dict[int, Counters]:
        calls: list[Command] = []
        for vid in ids:
            calls.append(("HMGET", keys.stock(vid), "available", "reserved", "version"))
            calls.append(("HLEN", keys.holds(vid)))
        results = self.runner.run(calls)
        out = {}
        for i, vid in enumerate(ids):
            (available, reserved, version), holds = results[2 * i], results[2 * i + 1]
            if available is not None:
                out[vid] = Counters(vid, int(available), int(reserved or 0), int(holds), int(version or 0))
        return out

    def active_holds(self, variant_ids: Sequence[int]) -> dict[int, int]:
        """Number of live holds per variant."""
        ids = list(variant_ids)
        return {vid: int(n) for vid, n in zip(ids, self.runner.run([("HLEN", keys.holds(v)) for v in ids]))}

    def forget(self, variant_id: int) -> None:
        """Drop a deleted variant's counters and holds from Redis."""
        self.runner.run([("DEL", *variant_keys(variant_id), keys.variant_timer(variant_id)),
                         ("ZREM", keys.sweep_index(variant_id), str(variant_id))])

    # -- reserve ----------------------------------------------------------------------------------

    def reserve(self, variant_id: int, user_id: str, quantity: int, *, mode: str = "add",
                now: int | None = None, ttl_ms: int | None = None, limit: int | None = None,
                gen: str | None = None, beside: Sequence[Command] = (), durable: bool = True) -> Reservation:
        """Reserve `quantity` more units (mode "add"), make the hold exactly `quantity` (mode "set"),
        or give back `quantity` units of it (mode "sub", to undo an add).

        `gen`: the generation a fresh hold gets (default: a new random one); a live hold keeps its own.
        `beside`: commands of the engine's other stores (the cart store's, app/engine/carts.py) sent
        in the same round trip, after the reserve; their replies are the reservation's `beside`.
        HOLD_DURABILITY=replicated: an add stands only once a replica has it (`_reserve_replicated`;
        `durable=False` skips that, for its own call).

        Raises:
            InsufficientStock, LimitExceeded, CheckoutInProgress, NotFound (no such variant),
            NotReplicated (HOLD_DURABILITY=replicated, no replica acknowledged in time).
        """
        if self.wait is not None and durable and mode == "add":
            return self._reserve_replicated(variant_id, user_id, quantity, now, ttl_ms, limit, gen, beside)
        now = clock.now_ms() if now is None else now
        ttl = self.ttl_ms if ttl_ms is None else ttl_ms
        limit = self.settings.max_units_per_customer if limit is None else limit
        head = self._reserves.get(variant_id) or self._reserve_for(variant_id)
        hold_id = f"{head.hold_prefix}{user_id}"
        args = (hold_id, quantity, now, ttl, user_id, mode, limit, gen or new_gen())
        res, replies = self.runner.call_prepared(head.call, args, beside)
        if res[0] == 1 and not res[5]:  # the common reply: reserved, not the variant's earliest hold
            _RESERVED.inc()
            # tuple.__new__: the named tuple without its Python-level __new__ (a frame per reserve)
            return tuple.__new__(Reservation, (variant_id, hold_id, res[2], res[3], res[1], res[4], tuple(replies)))
        return self._reserved_or_raise(variant_id, head, args, beside, res, tuple(replies))

    def _reserved_or_raise(self, variant_id: int, head: _Reserve, args: tuple, beside: Sequence[Command],
                           res: list, replies: tuple) -> Reservation:
        """Everything but the common reply: a new earliest expiry (its due hint), counters to
        rebuild first (then one call again), and the refusals as domain errors."""
        hold_id, quantity, limit = args[0], args[1], args[6]
        if res[0] == -1:
            self.rebuild([variant_id])
            # the commands beside went with the refused call already: not again; but a replica
            # WAIT sent last must follow the call that reserves, to cover it
            tail = beside[-1:] if self.wait is not None and beside and beside[-1] is self.wait else ()
            res, again = self.runner.call_prepared(head.call, args, tail)
            if tail:
                replies = (*replies[:-1], *again)
            if res[0] == -1:
                raise RuntimeError(f"counters of variant {variant_id} could not be rebuilt")
        code = res[0]
        if code == 1:
            _RESERVED.inc()
            if int(res[5]):
                # this hold is its variant's earliest: tell the listener's fast path (a hint;
                # later holds of a busy variant expire after it and need no write)
                self.runner.run([("ZADD", keys.due_hint(variant_id), "LT", int(res[3]), str(variant_id))])
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

    def _reserve_replicated(self, variant_id: int, user_id: str, quantity: int, now, ttl_ms, limit, gen,
                            beside: Sequence[Command]) -> Reservation:
        """A reserve (mode "add") that stands only once a replica acknowledged it: WAIT goes last in
        its round trip. Without an acknowledgement the units are given back (mode "sub") and
        NotReplicated is raised; the caller takes back what it wrote beside (a cart line)."""
        r = self.reserve(variant_id, user_id, quantity, mode="add", now=now, ttl_ms=ttl_ms,
                         limit=limit, gen=gen, beside=(*beside, self.wait), durable=False)
        if int(r.beside[-1]) >= 1:
            return r._replace(beside=r.beside[:-1])
        log.warning("no replica acknowledged the reserve of %s unit(s) of variant %s within %s ms: given back",
                    quantity, variant_id, self.wait[2])
        self.reserve(variant_id, user_id, quantity, mode="sub")
        raise NotReplicated()

    def _reserve_for(self, variant_id: int) -> _Reserve:
        if len(self._reserves) >= MAX_CACHED_VARIANTS:
            self._reserves.clear()
        head = self._reserves[variant_id] = _Reserve(
            hold_id_for(variant_id, ""), self.runner.prepare("reserveHold", self.indexed_keys(variant_id), 8))
        return head

    # -- release ----------------------------------------------------------------------------------

    def release(self, variant_id: int, hold_id: str, *, gen: str = "", now: int | None = None) -> int:
        """Release a hold (only that generation of it, when `gen` is given); returns the units given back."""
        return self.release_many([(variant_id, hold_id)], gen=gen, now=now)[0]

    def release_many(self, holds: Sequence[tuple[int, str]], *, gen: str = "", now: int | None = None,
                     only_if_expired: bool = False) -> list[int]:
        """Release several holds in one round trip; returns the units given back per hold."""
        now = clock.now_ms() if now is None else now
        mode = "expired" if only_if_expired else "any"
        calls = [Script("releaseHold", variant_keys(vid), [hid, now, mode, gen]) for vid, hid in holds]
        out = []
        for res in self.runner.run(calls):
            if res[0] == 1:
                HOLDS.labels("expired" if only_if_expired else "released").inc()
            out.append(int(res[1]) if res[0] == 1 else 0)
        return out

    def holds(self, pairs: Sequence[tuple[int, str]]) -> list[HoldView | None]:
        """The current state of each (variant_id, hold_id): None when there is no such hold."""
        return [unpack_hold(r) for r in self.runner.run(hold_reads(pairs))]

    # -- checkout ---------------------------------------------------------------------------------

    def lock_many(self, holds: Sequence[tuple[int, str]], token: str, now: int | None = None) -> list[LockResult]:
        """Lock holds for a checkout in one round trip; lapsed ones are released and refused."""
        now = clock.now_ms() if now is None else now
        calls = [Script("lockHold", variant_keys(vid), [hid, token, now]) for vid, hid in holds]
        out = []
        for (vid, hid), res in zip(holds, self.runner.run(calls)):
            if res[0] == 1:
                out.append(LockResult(vid, hid, True, int(res[1]), res[2], res[3]))
            else:
                out.append(LockResult(vid, hid, False, reason=_LOCK_REFUSALS[res[0]]))
        return out

    def unlock_many(self, locks: Sequence[tuple[int, str, str]], now: int | None = None) -> list[int]:
        """Undo locks (variant_id, hold_id, gen): held again, or released if lapsed meanwhile."""
        now = clock.now_ms() if now is None else now
        calls = [Script("unlockHold", variant_keys(vid), [hid, gen, now]) for vid, hid, gen in locks]
        return [int(r[0]) for r in self.runner.run(calls)]

    def finalize_many(self, items: Sequence[Finalization]) -> list[int]:
        """Finalize locked holds whose order is committed (idempotent)."""
        calls = [Script("finalizeHold", variant_keys(f.variant_id),
                        [f.hold_id, f.gen, f.quantity, f.new_version, f.user, self.settings.max_units_per_customer])
                 for f in items]
        out = [int(r[0]) for r in self.runner.run(calls)]
        HOLDS.labels("committed").inc(sum(1 for r in out if r))
        return out

    # -- adjustments ------------------------------------------------------------------------------

    def adjust_phase(self, variant_id: int, phase: str, delta: int, now: int | None = None) -> tuple[int, int, int]:
        """One phase ("begin", "commit", "abort") of an adjustment's Redis half; returns
        (available, reserved, version).

        Raises:
            StockBelowReserved: in "begin", when the units to remove are not available.
        """
        now = clock.now_ms() if now is None else now
        for _ in range(2):
            res = self.runner.call("adjustStock", [keys.stock(variant_id)], [phase, delta, now])
            if res[0] == 1:
                return int(res[1]), int(res[2]), int(res[3])
            if res[0] == -2:
                raise StockBelowReserved(variant_id, int(res[1]), delta)
            self.rebuild([variant_id])  # -1: counters missing
        raise RuntimeError(f"counters of variant {variant_id} could not be rebuilt")

