"""The stock rows the engine needs from the database (SQL lives here, with the models).

The reservation engine speaks Redis only; when it must rebuild counters or reconcile them, it asks
this repository for the durable side: `on_hand` and its version per variant, the units each
customer already ordered, and which checkouts committed.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from persistence.models import Order, OrderLine, Stock, Variant

StockLevel = tuple[int, int, int]  # (variant_id, on_hand, version)

_LEVELS = select(Stock.variant_id, Stock.on_hand, Stock.version).order_by(Stock.variant_id)


class StockRepository:
    """Reads of stock, orders and checkouts, each in its own short session."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def levels(self, variant_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        """{variant_id: (on_hand, version)} of the variants that exist."""
        ids = list(variant_ids)
        with self.sessions() as s:
            rows = s.execute(_LEVELS.where(Stock.variant_id.in_(ids)))
            return {vid: (on_hand, version) for vid, on_hand, version in rows}

    def level_batches(self, variant_ids: Sequence[int] | None, batch: int) -> Iterator[list[StockLevel]]:
        """Every variant's level in id order, `batch` at a time; only `variant_ids` when given
        (ids that do not exist are left out: the caller compares)."""
        if variant_ids is not None:
            ids = sorted({int(v) for v in variant_ids})
            for i in range(0, len(ids), batch):
                with self.sessions() as s:
                    yield [tuple(r) for r in s.execute(_LEVELS.where(Stock.variant_id.in_(ids[i:i + batch])))]
            return
        last = 0
        while True:
            with self.sessions() as s:
                rows = [tuple(r) for r in s.execute(_LEVELS.where(Stock.variant_id > last).limit(batch))]
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def ordered_units(self, variant_ids: Iterable[int]) -> dict[int, list[tuple[str, int]]]:
        """{variant_id: [(user, units ordered), ...]} over every order."""
        ids = list(variant_ids)
        out: dict[int, list[tuple[str, int]]] = {vid: [] for vid in ids}
        with self.sessions() as s:
            for vid, user, units in s.execute(
                    select(OrderLine.variant_id, Order.user_id, func.sum(OrderLine.quantity))
                    .join(Order, Order.id == OrderLine.order_id)
                    .where(OrderLine.variant_id.in_(ids))
                    .group_by(OrderLine.variant_id, Order.user_id)):
                out[vid].append((user, int(units)))
        return out

    def last_ordered(self, hold_ids: Iterable[str]) -> dict[str, int]:
        """{hold id: when (ms since the epoch) its latest order was written} for the hold ids that
        an order line names (the reconciler tells a sold cart line from a lost one)."""
        wanted = list(set(hold_ids))
        if not wanted:
            return {}
        with self.sessions() as s:
            rows = s.execute(select(OrderLine.hold_id, func.max(Order.created_at))
                             .join(Order, Order.id == OrderLine.order_id)
                             .where(OrderLine.hold_id.in_(wanted)).group_by(OrderLine.hold_id))
            return {hold_id: int(at.replace(tzinfo=at.tzinfo or timezone.utc).timestamp() * 1000)
                    for hold_id, at in rows}

    def ordered_holds_since(self, since_ms: int) -> list[tuple[int, str, int]]:
        """(variant_id, hold id, when its order was written in ms) of the order lines written since
        `since_ms` (the reconciler finds the holds of committed orders that a failover brought back)."""
        since = datetime.fromtimestamp(since_ms / 1000, timezone.utc)
        with self.sessions() as s:
            rows = s.execute(select(OrderLine.variant_id, OrderLine.hold_id, Order.created_at)
                             .join(Order, Order.id == OrderLine.order_id).where(Order.created_at >= since))
            return [(vid, hold_id, int(at.replace(tzinfo=at.tzinfo or timezone.utc).timestamp() * 1000))
                    for vid, hold_id, at in rows if hold_id]

    def committed_checkouts(self, tokens: Iterable[str]) -> set[str]:
        """The checkout tokens whose order is in the database."""
        wanted = list(tokens)
        if not wanted:
            return set()
        with self.sessions() as s:
            return set(s.scalars(select(Order.checkout_token).where(Order.checkout_token.in_(wanted))))

    def stock_rows(self, variant_ids: Iterable[int]) -> list[tuple[int, str, int, int]]:
        """(variant_id, sku, on_hand, version) of the variants that exist among these, in id order."""
        ids = sorted({int(v) for v in variant_ids})
        query = (select(Stock.variant_id, Variant.sku, Stock.on_hand, Stock.version)
                 .join(Variant, Variant.id == Stock.variant_id).order_by(Stock.variant_id))
        out: list[tuple[int, str, int, int]] = []
        for i in range(0, len(ids), 500):
            with self.sessions() as s:
                out += [tuple(r) for r in s.execute(query.where(Stock.variant_id.in_(ids[i:i + 500])))]
        return out
