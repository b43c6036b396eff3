"""The reconciler: compares the live counters with the database and repairs the drift.

The database is the truth for `on_hand`, the live holds for `reserved` (DESIGN.md, Reconciliation).
Per variant, one `reconcileStock` script recomputes both counters from the `on_hand` and version
the stock repository read, so it never undoes a reserve, release, commit or adjustment running at
the same moment: a variant whose versions differ (an adjustment between its two halves) is skipped
for the next pass. Checkouts that crashed after locking their holds are healed first: finalized
when their order exists, unlocked (released, if lapsed) after the grace period when it does not.

Holds a failover lost (DESIGN.md, Failover and durability) are found through the cart lines they
leave behind: a line whose own hold (same generation) is gone before the line's expiry. Such a line
is read twice, before and after the counters' pass, so a release or checkout between removing the
hold and removing the line is not taken for a loss; one whose hold an order names was sold by a
checkout that stopped before clearing its lines, and is cleared. The others are reported (count,
item ids, `inventory_holds_lost_total`) and rewritten with expiry 0, only if unchanged, so each is
reported once and shows as lapsed (410 at checkout, as for any hold that is gone). A held hold whose
order was written after its last add came back with a replica that missed its finalize: it is
finalized again, so its units are not held on top of being sold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from app import clock
from app.engine.holds import Finalization
from app.engine.runner import Script
from app.errors import NotFound
from app.engine.carts import Line
from app.engine.holdrec import parse_hold_id
from app.metrics import HOLDS_LOST, RECONCILE_DRIFT

log = logging.getLogger(__name__)

MAX_REPORTED_IDS = 100  # the lost holds' item ids a report lists (its count is exact)


@dataclass
class ReconcileReport:
    checked: int = 0
    drifted: int = 0
    repaired: int = 0
    skipped: int = 0
    rebuilt: int = 0
    locks_finalized: int = 0
    locks_released: int = 0
    lost_holds: int = 0
    orders_finalized: int = 0
    lost_hold_ids: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    skipped_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked, "drifted": self.drifted, "repaired": self.repaired,
            "skipped": self.skipped, "rebuilt": self.rebuilt, "locks_finalized": self.locks_finalized,
            "locks_released": self.locks_released, "orders_finalized": self.orders_finalized,
            "lost_holds": self.lost_holds,
            "lost_hold_ids": self.lost_hold_ids, "rows": self.rows,
        }


class Reconciler:
    """Compare and repair, on a schedule (jobs), on demand (API, CLI)."""

    def __init__(self, runner, holds, carts, repository, settings):
        self.runner = runner
        self.holds = holds  # app.engine.holds.Holds
        self.carts = carts  # app.engine.carts.CartStore
        self.repository = repository  # persistence.repository.StockRepository
        self.grace_ms = settings.checkout_grace_seconds * 1000
        self.hold_ttl_ms = settings.hold_ttl_seconds * 1000

    def reconcile(self, variant_ids: Sequence[int] | None = None, *, dry_run: bool = False,
                  now: int | None = None, grace_ms: int | None = None, batch: int = 500,
                  progress: Callable[[int], None] | None = None) -> ReconcileReport:
        """Reconcile every variant, or those given (NotFound for one that does not exist)."""
        grace = self.grace_ms if grace_ms is None else grace_ms
        report = ReconcileReport()
        if variant_ids is not None:
            wanted = {int(v) for v in variant_ids}
            unknown = wanted - set(self.repository.levels(wanted))
            if unknown:
                raise NotFound("variant", min(unknown))  # before anything is changed
        now_ = clock.now_ms() if now is None else now
        self._finalize_resurrected(None if variant_ids is None else wanted, now_, report, dry_run)
        suspects = self._lost_suspects(None if variant_ids is None else wanted, now_, batch)
        for rows in self.repository.level_batches(variant_ids, batch):
            self._batch(rows, report, dry_run, now, grace, second_pass=False)
            if progress:
                progress(len(rows))
        if report.drifted:
            RECONCILE_DRIFT.labels("found").inc(report.drifted)
        if report.repaired:
            RECONCILE_DRIFT.labels("repaired").inc(report.repaired)
        if suspects:
            self._report_lost(suspects, report, dry_run)
        return report

    # -- what a failover undid ---------------------------------------------------------------------

    def _finalize_resurrected(self, wanted: set[int] | None, now: int, report: ReconcileReport,
                              dry_run: bool) -> None:
        """A held hold whose order was written after the hold's last add: the checkout finalized it,
        and a failover brought it back (the promoted replica never got the finalize). Finalized
        again, so its units are not held on top of being sold."""
        latest: dict[tuple[int, str], int] = {}
        for vid, hid, at in self.repository.ordered_holds_since(now - self.hold_ttl_ms):
            if wanted is None or vid in wanted:
                latest[(vid, hid)] = max(at, latest.get((vid, hid), at))
        recent = [(vid, hid, at) for (vid, hid), at in latest.items()]
        if not recent:
            return
        found = self.holds.holds([(vid, hid) for vid, hid, _ in recent])
        again = [Finalization(vid, hid, h.gen, h.quantity, h.user, 0) for (vid, hid, at), h in zip(recent, found)
                 if h is not None and h.state == "held" and h.expires_ms - self.hold_ttl_ms <= at]
        report.orders_finalized = len(again)
        if again and not dry_run:
            self.holds.finalize_many(again)
            log.warning("reconciler finalized %d hold(s) of committed orders that came back (a Redis failover?)",
                        len(again))

    # -- holds a failover lost ----------------------------------------------------------------------

    def _lost_suspects(self, wanted: set[int] | None, now: int, batch: int) -> list[tuple[Line, str]]:
        """Cart lines not yet lapsed whose own hold (same generation) is missing."""
        suspects = []
        for lines in self.carts.scan_lines(batch):
            lines = [(line, raw) for line, raw in lines
                     if line.expires_ms > now and (wanted is None or line.variant_id in wanted)]
            found = self.holds.holds([(line.variant_id, line.item_id) for line, _ in lines])
            suspects += [pair for pair, hold in zip(lines, found) if hold is None or hold.gen != pair[0].gen]
        return suspects

    def _report_lost(self, suspects: list[tuple[Line, str]], report: ReconcileReport, dry_run: bool) -> None:
        items = [line.item_id for line, _ in suspects]
        raws = self.carts.raw_lines(items)  # read again: still there, unchanged, and still no hold?
        found = self.holds.holds([(line.variant_id, line.item_id) for line, _ in suspects])
        still = [(line, raw) for (line, raw), now_raw, hold in zip(suspects, raws, found)
                 if now_raw == raw and (hold is None or hold.gen != line.gen)]
        ordered = self.repository.last_ordered([line.item_id for line, _ in still])
        # an order naming the hold, written after its last add: a checkout that stopped before clearing its lines
        sold = [(line, raw) for line, raw in still
                if ordered.get(line.item_id, -1) >= line.expires_ms - self.hold_ttl_ms]
        sold_ids = {line.item_id for line, _ in sold}
        lost = [(line, raw) for line, raw in still if line.item_id not in sold_ids]
        if sold and not dry_run:
            self.carts.drop_lines([(parse_hold_id(line.item_id)[1], line.item_id, line.gen) for line, _ in sold])
        ids = sorted(line.item_id for line, _ in lost) if dry_run else sorted(self.carts.mark_lost(lost))
        report.lost_holds = len(ids)
        report.lost_hold_ids = ids[:MAX_REPORTED_IDS]
        if ids and not dry_run:
            HOLDS_LOST.inc(len(ids))
            log.warning("reconciler found %d hold(s) lost with their cart lines left (a Redis failover?): %s",
                        len(ids), ", ".join(ids[:10]))

    def _batch(self, rows, report: ReconcileReport, dry_run: bool, now, grace: int, second_pass: bool) -> None:
        now_ = clock.now_ms() if now is None else now
        calls = [Script("reconcileStock", self.holds.indexed_keys(vid),
                        [on_hand, version, now_, grace, 1 if dry_run else 0]) for vid, on_hand, version in rows]
        results = self.runner.run(calls)
        stale: list[tuple[int, list]] = []
        missing = [vid for (vid, _o, _v), res in zip(rows, results) if res[0] == 2]
        if missing and not dry_run:
            self.holds.rebuild(missing)
        for (vid, _on_hand, version), res in zip(rows, results):
            status, available, reserved, exp_available, exp_reserved, _earliest, locks = res
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
                    continue  # never built yet (a new variant, a fresh Redis) and nothing held: not drift
            if status in (1, 2):
                self._drift(report, vid, version, dry_run, None if status == 2 else int(available),
                            None if status == 2 else int(reserved), int(exp_available), int(exp_reserved))
        if stale:
            if not dry_run:
                self._resolve_stale_locks(stale, report, now_)
            fresh = list(self.repository.level_batches([vid for vid, _ in stale], len(stale)))
            self._batch([r for rows in fresh for r in rows], report, dry_run, now, grace, second_pass=True)

    @staticmethod
    def _drift(report: ReconcileReport, vid: int, version: int, dry_run: bool, actual_a, actual_r,
               expected_a: int, expected_r: int) -> None:
        report.drifted += 1
        if not dry_run:
            report.repaired += 1
        if actual_a != expected_a:
            report.rows.append({"variant_id": vid, "field": "available", "expected": expected_a, "actual": actual_a})
        if actual_r != expected_r:
            report.rows.append({"variant_id": vid, "field": "reserved", "expected": expected_r, "actual": actual_r})
        if actual_a == expected_a and actual_r == expected_r:
            report.rows.append({"variant_id": vid, "field": "version", "expected": version, "actual": None})

    def _resolve_stale_locks(self, stale: list[tuple[int, list]], report: ReconcileReport, now: int) -> None:
        """A checkout that crashed after locking: finalize if its order exists, else unlock."""
        locks = []
        for vid, flat in stale:
            for i in range(0, len(flat), 5):
                hold_id, gen, token, qty, user = flat[i:i + 5]
                locks.append((vid, hold_id, gen, token, int(qty), user))
        committed = self.repository.committed_checkouts({lock[3] for lock in locks})
        to_finalize = [Finalization(vid, hid, gen, qty, user, 0)
                       for vid, hid, gen, token, qty, user in locks if token in committed]
        to_unlock = [(vid, hid, gen) for vid, hid, gen, token, _q, _u in locks if token not in committed]
        if to_finalize:
            self.holds.finalize_many(to_finalize)
            self.carts.drop_lines([(f.user, f.hold_id, f.gen) for f in to_finalize])
            report.locks_finalized += len(to_finalize)
            log.warning("reconciler finalized %d hold(s) of checkouts that committed but did not finish",
                        len(to_finalize))
        if to_unlock:
            self.holds.unlock_many(to_unlock, now=now)  # the reconcile's own time: a lapsed hold is released
            report.locks_released += len(to_unlock)
            log.warning("reconciler unlocked %d hold(s) of checkouts that never committed", len(to_unlock))
