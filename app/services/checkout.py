"""Checkout, all-or-nothing across Redis and the database (DESIGN.md, Checkout).

1. lock every line's hold (lapsed or missing ones: undo the locks, 410);
2. one database transaction: order, lines, on_hand, ledger, idempotency record;
3. finalize the holds and clear the lines.
A crash between any two steps heals through the reconciler: locked holds whose order exists are
finalized, the others unlocked after CHECKOUT_GRACE_SECONDS.
"""
from __future__ import annotations

import logging
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update

from sqlalchemy import func

from app import faults
from app.clock import iso, utcnow
from app.engine.carts import Line
from app.engine.holds import Finalization
from app.errors import (CheckoutInProgress, Conflict, EmptyCart, InsufficientStock, NotFound, ReservationExpired,
                        Unavailable)
from app.money import cents, money
from app.services.cart import canonical_user, render_user
from persistence.models import IdempotencyRecord, Order, OrderLine, Stock, StockMovement

log = logging.getLogger(__name__)


def order_json(order: Order) -> dict:
    return {
        "id": order.id,
        "user_id": render_user(order.user_id),
        "status": order.status,
        "items": [{"variant_id": l.variant_id, "sku": l.sku, "quantity": l.quantity,
                   "unit_price": money(l.unit_price), "line_total": money(l.line_total)} for l in order.lines],
        "total": money(order.total),
        "created_at": iso(order.created_at),
    }


class CartChanged(Conflict):
    code = "cart_changed"


class _StockGone(Exception):
    def __init__(self, variant_id: int, on_hand: int | None, quantity: int):
        self.variant_id, self.on_hand, self.quantity = variant_id, on_hand, quantity


class CheckoutService:
    """Checkout and the orders it writes."""

    def __init__(self, sessions, holds, store, cart, settings):
        self.sessions = sessions
        self.holds = holds  # app.engine.holds.Holds
        self.store = store  # app.engine.carts.CartStore
        self.cart = cart  # app.services.cart.CartService (lines with their skus)
        self.settings = settings

    def checkout(self, user_id: Any, idempotency_key: str | None = None) -> dict:
        """Turn every held line of a customer's cart into one confirmed order; returns the order JSON.

        Raises:
            EmptyCart, ReservationExpired (410), CheckoutInProgress (409).
        """
        user = canonical_user(user_id)
        lines = self.cart.lines(user)
        if not lines:
            raise EmptyCart("The cart is empty")
        token = uuid.uuid4().hex

        # 1. lock
        results = self.holds.lock_many([(l.variant_id, l.item_id) for l in lines], token)
        by_item = {l.item_id: l for l in lines}
        locked = [r for r in results if r.ok and r.gen == by_item[r.hold_id].gen]
        stale_gen = [r for r in results if r.ok and r.gen != by_item[r.hold_id].gen]
        refused = [r for r in results if not r.ok]
        if refused or stale_gen:
            self.holds.unlock_many([(r.variant_id, r.hold_id, r.gen) for r in results if r.ok])
            expired = sorted([r.hold_id for r in refused if r.reason in ("missing", "expired")]
                             + [r.hold_id for r in stale_gen])
            if expired:
                raise ReservationExpired(expired)
            raise CheckoutInProgress("A checkout of this cart is already in progress", {"user_id": render_user(user)})
        changing = [r for r in locked if r.quantity != by_item[r.hold_id].quantity]
        if changing:
            # an add to the same line is between its reserve and its cart write: the line's price is
            # for another quantity than the hold's, so charge nothing until the line has caught up
            self.holds.unlock_many([(r.variant_id, r.hold_id, r.gen) for r in locked])
            raise CartChanged("The cart changed during checkout; retry", {"item_ids": [r.hold_id for r in changing]})
        faults.point("checkout.after_lock")

        # 2. the order, durably
        items = sorted(((by_item[r.hold_id], r) for r in locked), key=lambda pair: pair[0].variant_id)
        progress = {"commit_sent": False}
        try:
            order, new_versions = self._write_order(user, token, items, idempotency_key, progress)
        except _StockGone as gone:
            self.holds.unlock_many([(r.variant_id, r.hold_id, r.gen) for r in locked])
            if gone.on_hand is None:
                raise NotFound("variant", gone.variant_id) from None
            raise InsufficientStock(gone.variant_id, gone.on_hand, gone.quantity) from None
        except Exception as exc:
            committed = self._committed(token) if progress["commit_sent"] else False
            if committed is None:
                # The connection broke while committing and the database cannot be asked whether the
                # order is there. Unlocking now could sell these units twice (once in the order, once
                # to whoever gets them next), so the holds stay locked: the reconciler finalizes them
                # if the order exists, or unlocks them after CHECKOUT_GRACE_SECONDS.
                log.warning("checkout %s of user %s: commit outcome unknown (%s); left to the reconciler",
                            token, user, type(exc).__name__)
                raise Unavailable("database") from None
            if not committed:
                # the database refused or is gone: nothing was committed, the holds stay valid
                self.holds.unlock_many([(r.variant_id, r.hold_id, r.gen) for r in locked])
                raise
            # The commit went through although its answer was lost: finish the checkout as usual.
            order = self._order_by_token(token)
            new_versions = {line.variant_id: 0 for line, _ in items}  # 0: a gone hold is left to the reconciler
        faults.point("checkout.after_commit")

        # 3. finalize and clear the lines
        self.holds.finalize_many([Finalization(line.variant_id, line.item_id, r.gen, r.quantity, user,
                                           new_versions[line.variant_id]) for line, r in items])
        faults.point("checkout.after_finalize")
        self.store.drop_lines([(user, line.item_id, r.gen) for line, r in items])
        log.info("order %s confirmed for user %s: %d line(s), total %s", order["id"], user, len(items),
                 order["total"])
        return order


    def _committed(self, token: str) -> bool | None:
        """Whether the order of a checkout is in the database; None when the database cannot say."""
        try:
            with self.sessions() as s:
                return s.scalar(select(Order.id).where(Order.checkout_token == token)) is not None
        except Exception:  # noqa: BLE001 - unreachable or refusing: the outcome stays unknown
            return None


    def _order_by_token(self, token: str) -> dict:
        with self.sessions() as s:
            return order_json(s.scalars(select(Order).where(Order.checkout_token == token)).one())


    def _write_order(self, user: str, token: str, items: list[tuple[Line, Any]],
                     idempotency_key: str | None, progress: dict) -> tuple[dict, dict[int, int]]:
        """One transaction: order, lines, on_hand, ledger, idempotency record.

        Sets progress["commit_sent"] just before COMMIT: a failure after that point may or may not
        have committed (the answer to COMMIT can be lost with the connection).
        """
        new_versions: dict[int, int] = {}
        with self.sessions() as s, s.begin():
            total = Decimal("0")
            order = Order(user_id=user, status="confirmed", total=Decimal("0"), currency=self.settings.currency,
                          checkout_token=token, created_at=utcnow())
            s.add(order)
            s.flush()
            for line, lock in items:
                quantity = lock.quantity  # the hold is the truth for how many units are held
                row = s.execute(
                    update(Stock).where(Stock.variant_id == line.variant_id, Stock.on_hand >= quantity)
                    .values(on_hand=Stock.on_hand - quantity, version=Stock.version + 1, updated_at=utcnow())
                    .returning(Stock.on_hand, Stock.version)).first()
                if row is None:
                    current = s.scalar(select(Stock.on_hand).where(Stock.variant_id == line.variant_id))
                    raise _StockGone(line.variant_id, current, quantity)
                new_versions[line.variant_id] = int(row.version)
                line_total = cents(line.unit_price * quantity)
                total += line_total
                s.add(OrderLine(order_id=order.id, variant_id=line.variant_id, sku=line.sku, quantity=quantity,
                                unit_price=line.unit_price, line_total=line_total, hold_id=line.item_id))
                s.add(StockMovement(variant_id=line.variant_id, delta=-quantity, on_hand_after=int(row.on_hand),
                                    kind="checkout", reason=f"order {order.id}", actor=f"user:{user}",
                                    order_id=order.id))
            order.total = total
            s.flush()
            s.refresh(order, ["lines"])
            body = order_json(order)
            if idempotency_key:
                s.add(IdempotencyRecord(scope="checkout", key=idempotency_key, user_id=user, status_code=201,
                                        response=body))
            s.flush()
            progress["commit_sent"] = True  # leaving the block commits
        return body, new_versions


    def get_order(self, order_id: int) -> dict:
        with self.sessions() as s:
            order = s.get(Order, order_id)
            if order is None:
                raise NotFound("order", order_id)
            return order_json(order)


    def list_orders(self, user_id: Any | None, page: int, per_page: int) -> tuple[list[dict], int]:
        with self.sessions() as s:
            query = select(Order)
            count = select(func.count()).select_from(Order)
            if user_id is not None:
                user = canonical_user(user_id)
                query, count = query.where(Order.user_id == user), count.where(Order.user_id == user)
            total = s.scalar(count) or 0
            orders = s.scalars(query.order_by(Order.created_at.desc(), Order.id.desc())
                               .offset((page - 1) * per_page).limit(per_page)).all()
            return [order_json(o) for o in orders], int(total)


    def recorded_checkout(self, user: str, key: str) -> dict | None:
        """The order a checkout with this Idempotency-Key already produced, from the database."""
        with self.sessions() as s:
            record = s.scalar(select(IdempotencyRecord).where(
                IdempotencyRecord.scope == "checkout", IdempotencyRecord.user_id == user,
                IdempotencyRecord.key == key))
            return dict(record.response) if record else None

