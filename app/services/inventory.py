"""Stock rows and adjustments: the database and the live counters changed together (DESIGN.md)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from app.clock import utcnow
from app.errors import NotFound, StockBelowReserved
from persistence.models import Stock, StockMovement, Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StockRow:
    variant_id: int
    sku: str
    on_hand: int
    available: int
    reserved: int
    active_holds: int
    updated_at: datetime


_ROW_QUERY = select(Stock.variant_id, Variant.sku, Stock.on_hand, Stock.version, Stock.updated_at).join(
    Variant, Variant.id == Stock.variant_id)


class _VersionMoved(Exception):
    pass


class InventoryService:
    """Stock rows (durable on_hand beside the live counters) and adjustments."""

    def __init__(self, sessions, holds):
        self.sessions = sessions
        self.holds = holds  # app.engine.holds.Holds

    def _rows(self, db_rows) -> list[StockRow]:
        counters = self.holds.counters([r.variant_id for r in db_rows])
        out = []
        for r in db_rows:
            live = counters[r.variant_id]
            out.append(StockRow(r.variant_id, r.sku, r.on_hand, live.available, live.reserved, live.active_holds,
                                r.updated_at))
        return out

    def list_stock(self, page: int, per_page: int) -> tuple[list[StockRow], int]:
        with self.sessions() as s:
            total = s.scalar(select(func.count()).select_from(Stock))
            db_rows = s.execute(_ROW_QUERY.order_by(Stock.variant_id).offset((page - 1) * per_page)
                                .limit(per_page)).all()
        return self._rows(db_rows), int(total or 0)


    def get_stock(self, variant_id: int) -> StockRow:
        with self.sessions() as s:
            row = s.execute(_ROW_QUERY.where(Stock.variant_id == variant_id)).first()
        if row is None:
            raise NotFound("variant", variant_id)
        return self._rows([row])[0]


    def adjust(self, variant_id: int, delta: int, reason: str, actor: str, kind: str = "adjust",
               expected_version: int | None = None) -> StockRow | None:
        """Change on_hand by delta in the database and the live counters, with a ledger row.

        Units leave `available` in Redis before the database commit and arrive after it, so a crash
        between the two can only undersell; the reconciler settles what a crash leaves.
        Returns None when `expected_version` no longer matches (the caller retries).

        Raises:
            StockBelowReserved: the delta would make `available` negative.
            NotFound: no such variant.
        """
        with self.sessions() as s:
            if s.get(Stock, variant_id) is None:
                raise NotFound("variant", variant_id)
        self.holds.adjust_phase(variant_id, "begin", delta)
        try:
            with self.sessions.begin() as s:
                where = [Stock.variant_id == variant_id, Stock.on_hand + delta >= 0]
                if expected_version is not None:
                    where.append(Stock.version == expected_version)
                # One conditional UPDATE: the row lock is held for the shortest time, on every backend.
                result = s.execute(update(Stock).where(*where).values(
                    on_hand=Stock.on_hand + delta, version=Stock.version + 1, updated_at=utcnow())
                    .returning(Stock.on_hand))
                on_hand = result.scalar_one_or_none()
                if on_hand is None:
                    current = s.get(Stock, variant_id)
                    if current is None:
                        raise NotFound("variant", variant_id)
                    if expected_version is not None and current.version != expected_version:
                        raise _VersionMoved()
                    raise StockBelowReserved(variant_id, current.on_hand, delta)
                s.add(StockMovement(variant_id=variant_id, delta=delta, on_hand_after=on_hand, kind=kind,
                                    reason=reason, actor=actor))
        except _VersionMoved:
            self.holds.adjust_phase(variant_id, "abort", delta)
            return None
        except BaseException:
            self.holds.adjust_phase(variant_id, "abort", delta)
            raise
        self.holds.adjust_phase(variant_id, "commit", delta)
        log.info("stock of variant %s changed by %+d by %s: %s", variant_id, delta, actor, reason)
        return self.get_stock(variant_id)


    def set_on_hand(self, variant_id: int, on_hand: int, reason: str, actor: str) -> StockRow:
        """Make on_hand exactly `on_hand` (as an adjustment by the difference, retried if it races)."""
        for _ in range(20):
            with self.sessions() as s:
                current = s.get(Stock, variant_id)
                if current is None:
                    raise NotFound("variant", variant_id)
                delta, version = on_hand - current.on_hand, current.version
            row = self.adjust(variant_id, delta, reason, actor, kind="set", expected_version=version)
            if row is not None:
                return row
        raise RuntimeError(f"stock of variant {variant_id} kept changing; try again")
