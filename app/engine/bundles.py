"""A bundle's holds in Redis: several variants reserved all or nothing (DESIGN.md, Bundles).

One script cannot span hash slots on a cluster, so the lines are grouped by the slot of their
variant and each group is reserved by one `reserveBundle` call (all or nothing inside it), the
groups one after another in the order of their slot numbers: two bundles that share variants
take them in the same order, so one of them gets through instead of each refusing the other.
When a group refuses, the groups already reserved are given back at once, by the same script's
"undo", before the refusal is raised.

On a single Redis every key is on the one server, which lets one script touch keys of any slot:
all lines go in one call there, so there is no moment at which part of a bundle is held.

Each call writes, in its own slot and in the same step, the bundle's journal: what it did to each
hold (the units it added, the hold as it was before). The undo reads it, so it gives back exactly
the bundle's units even where the line merged into a hold the customer already had, and a retry
of a bundle that died half-way (the same bundle id: see app/services/bundle.py) can give back what
the dead attempt left before reserving again. The journal lapses with the holds; whatever a crash
leaves held lapses like any hold.
"""
from __future__ import annotations

import logging
from typing import Sequence

from app import clock, faults, keys
from app.engine.expiry import is_cluster
from app.engine.holdrec import hold_id_for, new_gen
from app.engine.holds import Holds, NotReplicated, Reservation
from app.engine.runner import Script, ScriptRunner
from app.errors import CheckoutInProgress, InsufficientStock, LimitExceeded, NotFound
from app.metrics import HOLDS, REJECTIONS

log = logging.getLogger(__name__)

Line = tuple[int, int]  # (variant_id, quantity)
Group = tuple[int, list[int]]  # (the slot of its journal, indexes of its lines in the order sent)


class Bundles:
    """Reserve a bundle's lines all or nothing, and give them back."""

    def __init__(self, runner: ScriptRunner, holds: Holds, settings):
        self.runner = runner
        self.holds = holds
        self.settings = settings
        self.cluster = is_cluster(runner.redis)

    def groups(self, variant_ids: Sequence[int]) -> list[Group]:
        """The calls a bundle of these variants is reserved in, in the order they are made: one per
        hash slot in slot order on a cluster, one for everything on a single Redis."""
        slots = [keys.variant_slot(v) for v in variant_ids]
        if not self.cluster:
            return [(min(slots), list(range(len(slots))))]
        by_slot: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            by_slot.setdefault(slot, []).append(i)
        return sorted(by_slot.items())

    def reserve(self, bundle_id: str, user: str, lines: Sequence[Line], *, now: int | None = None,
                ttl_ms: int | None = None, limit: int | None = None) -> list[Reservation]:
        """Reserve every line (mode "add", as Holds.reserve), or none; returns the reservations in
        the order of `lines`.

        Raises:
            InsufficientStock, LimitExceeded, CheckoutInProgress: the first line refused, in the
                order of the calls; every group reserved before it has been given back.
            NotFound: a variant that is not in the database (its counters could not be built).
        """
        now = clock.now_ms() if now is None else now
        ttl = self.holds.ttl_ms if ttl_ms is None else ttl_ms
        limit = self.settings.max_units_per_customer if limit is None else limit
        out: list[Reservation | None] = [None] * len(lines)
        done: list[Group] = []
        for group in self.groups([vid for vid, _ in lines]):
            try:
                self._reserve_group(bundle_id, user, lines, group, now, ttl, limit, out)
            except Exception:
                if done:
                    self._give_back(bundle_id, user, lines, done, now)
                raise
            done.append(group)
            faults.point("bundle.after_slot")
        return out  # type: ignore[return-value]

    def undo(self, bundle_id: str, user: str, lines: Sequence[Line], *, now: int | None = None) -> int:
        """Give back what this bundle id reserved for these lines (nothing where it reserved
        nothing: idempotent); returns the units given back."""
        now = clock.now_ms() if now is None else now
        return self._undo_groups(bundle_id, user, lines, self.groups([vid for vid, _ in lines]), now)

    # -- the calls --------------------------------------------------------------------------------

    def _call(self, op: str, bundle_id: str, user: str, lines: Sequence[Line], group: Group, now: int,
              ttl: int, limit: int) -> Script:
        slot, members = group
        ks: list[str] = [keys.bundle_journal(slot, bundle_id)]
        args: list = [op, now, ttl, user, limit]
        for i in members:
            vid, qty = lines[i]
            ks.extend(self.holds.indexed_keys(vid))
            args.extend((hold_id_for(vid, user), qty, new_gen()))
        return Script("reserveBundle", ks, args)

    def _reserve_group(self, bundle_id: str, user: str, lines: Sequence[Line], group: Group, now: int,
                       ttl: int, limit: int, out: list) -> None:
        members = group[1]
        call = self._call("reserve", bundle_id, user, lines, group, now, ttl, limit)
        # HOLD_DURABILITY=replicated: WAIT last in the call's round trip (the group's node on a cluster)
        tail = () if self.holds.wait is None else (self.holds.wait,)
        res, *acks = self.runner.run([call, *tail])
        if res[0] == -1:
            # counters missing (a new variant, a Redis that came back empty): built from the
            # database, then once more; the refused call wrote nothing
            try:
                self.holds.rebuild([lines[i][0] for i in members])
            except NotFound as exc:  # deleted since the service's checks: that line is refused
                exc.details["variant_id"] = exc.details.get("id")
                raise
            res, *acks = self.runner.run([call, *tail])
        code = res[0]
        if code == 1 and tail and int(acks[0]) < 1:
            log.warning("bundle %s: no replica acknowledged its reserve within %s ms: given back",
                        bundle_id, tail[0][2])
            self._undo_groups(bundle_id, user, lines, [group], now)
            raise NotReplicated()
        if code == 1:
            hints = []
            for j, i in enumerate(members):
                available, quantity, expires, gen, earliest = res[1 + 5 * j: 6 + 5 * j]
                vid = lines[i][0]
                out[i] = Reservation(vid, hold_id_for(vid, user), int(quantity), int(expires), int(available),
                                     gen)
                if int(earliest):
                    hints.append(("ZADD", keys.due_hint(vid), "LT", int(expires), str(vid)))
            HOLDS.labels("created").inc(len(members))  # as Holds.reserve counts each reserve
            if hints:
                self.runner.run(hints)  # the listener's fast path, as Holds.reserve leaves it
            return
        if code == -1:
            raise RuntimeError(f"counters of variants {[lines[i][0] for i in members]} could not be rebuilt")
        vid, qty = lines[members[int(res[1]) - 1]]
        if code == -2:
            REJECTIONS.labels("insufficient_stock").inc()
            raise InsufficientStock(vid, int(res[2]), qty)
        if code == -3:
            REJECTIONS.labels("limit_exceeded").inc()
            raise LimitExceeded(vid, limit, int(res[2]), qty)
        if code == -4:
            REJECTIONS.labels("checkout_in_progress").inc()
            raise CheckoutInProgress("This item is being checked out", {"variant_id": vid})
        raise RuntimeError(f"reserveBundle returned {res!r}")

    def _undo_groups(self, bundle_id: str, user: str, lines: Sequence[Line], groups: list[Group],
                     now: int) -> int:
        calls = [self._call("undo", bundle_id, user, lines, g, now, 0, 0) for g in groups]
        results = self.runner.run(calls)  # one round trip (one per node on a cluster)
        units = sum(int(r[0]) for r in results)
        holds_back = sum(int(r[1]) for r in results)
        if holds_back:
            HOLDS.labels("released").inc(holds_back)
        locked = sum(int(r[2]) for r in results)
        if locked:
            log.warning("bundle %s: %d hold(s) locked by a checkout were left to it", bundle_id, locked)
        return units

    def _give_back(self, bundle_id: str, user: str, lines: Sequence[Line], done: list[Group], now: int) -> None:
        """Undo the groups already reserved. If Redis fails here, that failure is raised instead of
        the refusal (503: a retry with the same Idempotency-Key gives back what is left first)."""
        try:
            self._undo_groups(bundle_id, user, lines, done, now)
        except Exception:
            log.warning("bundle %s: could not give back its reserved groups now; they lapse", bundle_id)
            raise
