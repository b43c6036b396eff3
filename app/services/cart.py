"""The cart: every line is a hold (app.stock), priced once when it is added (a price snapshot).

Add-to-cart is the hot path of a flash sale: one round trip to Redis for a new line (the reserve
script with the reads it needs and the line's write beside it), two when it merges into a line, and
none to the database once the catalog cache is warm. Stock and carts live in different hash slots,
so the hold is taken first and the line written second: a crash in between leaves a hold with no
line, which simply lapses (DESIGN.md).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from decimal import Decimal
from typing import Any

from app import catalog_cache, clock, keys
from app.composition import Container
from app.errors import InsufficientStock, NotFound, PriceChanged, ProductNotActive, ValidationFailed
from app.stock import hold_id_for, new_gen, parse_hold_id

log = logging.getLogger(__name__)

USER_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # fullmatch: "$" would let a final "\n" through
MAX_INT_USER = 10**18  # an integer user id is below this
CENTS = Decimal("0.01")


def canonical_user(user_id: Any) -> str:
    """The one string form of a user id (101 and "101" are the same customer)."""
    if isinstance(user_id, bool):
        raise ValidationFailed("Request has invalid fields", {"user_id": ["Not a valid user id."]})
    if isinstance(user_id, int):
        if user_id < 0 or user_id >= MAX_INT_USER:
            raise ValidationFailed("Request has invalid fields", {"user_id": ["Not a valid user id."]})
        return str(user_id)
    if isinstance(user_id, str) and USER_ID_RE.fullmatch(user_id):
        return user_id
    raise ValidationFailed("Request has invalid fields",
                           {"user_id": ["An integer, or 1-64 characters of [A-Za-z0-9_.-]."]})


def render_user(user: str) -> int | str:
    """Digits render as the integer a client most likely sent."""
    if user.isdigit() and (user == "0" or not user.startswith("0")) and len(user) < 19:
        return int(user)
    return user


@lru_cache(maxsize=8192)  # a sale renders the same few prices and totals on every add
def money(value: Decimal) -> str:
    return format(Decimal(value).quantize(CENTS), "f")


@dataclass
class Line:
    """A cart line as stored in the cart hash (see dumps)."""

    item_id: str
    variant_id: int
    sku: str
    quantity: int
    unit_price: Decimal
    expires_ms: int
    gen: str
    tier: str | None = None

    def dumps(self) -> str:
        """`qty|unit_price|expires_ms|gen|tier`: short enough (<= 64 bytes) that Redis keeps a cart
        as a compact listpack; the variant id is in the item id and the sku in the catalog cache."""
        return f"{self.quantity}|{money(self.unit_price)}|{self.expires_ms}|{self.gen}|{self.tier or ''}"

    @classmethod
    def loads(cls, item_id: str, raw: str, sku: str = "") -> "Line":
        variant_id = int(item_id.partition("~")[0])
        quantity, price, expires, gen, tier = raw.split("|")
        return cls(item_id, variant_id, sku, int(quantity), Decimal(price), int(expires), gen, tier or None)


_STORE_ATTEMPTS = 5
# After a refusal for stock, adds of that variant in this process skip the line written ahead of
# the reserve for a moment: a sold-out item would otherwise cost each refused add a second round trip.
_SHORT_SECONDS = 1.0
_SHORT_UNTIL: dict[int, float] = {}


def _stale(line: Line, hold) -> bool:
    """The line's hold lives on (same generation) but holds another quantity or expiry than the line says."""
    return (hold is not None and hold.gen == line.gen
            and (hold.quantity != line.quantity or hold.expires_ms != line.expires_ms))


def _require_active(info) -> None:
    if info.product_status != "active":
        raise ProductNotActive(f"Product {info.product_id} is not active",
                               {"product_id": info.product_id, "status": info.product_status})


def _line_is_live(line: Line, hold, now: int) -> bool:
    return hold is not None and hold.gen == line.gen and hold.expires_ms > now


def item_json(line: Line, held: bool) -> dict:
    return {
        "id": line.item_id,
        "variant_id": line.variant_id,
        "sku": line.sku,
        "quantity": line.quantity,
        "unit_price": money(line.unit_price),
        "line_total": money(line.unit_price * line.quantity),
        "status": "held" if held else "expired",
        "reserved_until": clock.ms_to_iso(line.expires_ms),
    }


def cart_json(user: str, lines: list[Line], live: dict[str, bool]) -> dict:
    items = [item_json(line, live[line.item_id]) for line in sorted(lines, key=lambda l: l.item_id)]
    held = [line for line in lines if live[line.item_id]]
    subtotal = sum((line.unit_price * line.quantity for line in held), Decimal("0"))
    expires = min((line.expires_ms for line in held), default=None)
    return {"user_id": render_user(user), "items": items, "subtotal": money(subtotal),
            "expires_at": clock.ms_to_iso(expires)}


class CartService:
    def __init__(self, container: Container):
        self.c = container
        self.redis = container.redis
        self.engine = container.stock
        self.pricing = container.pricing

    # -- reads ------------------------------------------------------------------------------------

    def _lines(self, user: str) -> list[Line]:
        raw = self.redis.hgetall(keys.cart(user))
        return self._with_skus([Line.loads(item_id, body) for item_id, body in raw.items()])

    def _with_skus(self, lines: list[Line], version: int | None = None) -> list[Line]:
        """Fill in each line's sku from the catalog cache (a deleted variant keeps an empty one)."""
        if not lines:
            return lines
        if version is None:
            version = self.pricing.read_catalog_version()
        for line in lines:
            if not line.sku:
                try:
                    line.sku = self.pricing.variant_info(line.variant_id, catalog_version=version).sku
                except NotFound:
                    line.sku = ""
        return lines

    def _liveness(self, lines: list[Line], now: int | None = None) -> dict[str, bool]:
        now = clock.now_ms() if now is None else now
        holds = self.engine.holds([(line.variant_id, line.item_id) for line in lines])
        return {line.item_id: _line_is_live(line, hold, now) for line, hold in zip(lines, holds)}

    def get_cart(self, user_id: Any) -> dict:
        user = canonical_user(user_id)
        lines = self._lines(user)
        return cart_json(user, lines, self._liveness(lines))

    # -- add ----------------------------------------------------------------------------------------

    def add(self, user_id: Any, variant_id: int, quantity: int, user_tier: str | None = None,
            shown_price: Decimal | None = None) -> dict:
        """Reserve `quantity` more units of a variant for a customer and snapshot the unit price.

        Raises:
            NotFound, ProductNotActive, PriceChanged, InsufficientStock, LimitExceeded, CheckoutInProgress.
        """
        user = canonical_user(user_id)
        tier = user_tier.upper() if user_tier else None
        item_id = hold_id_for(variant_id, user)
        now = clock.now_ms()
        cached = self.pricing.cached_variant_info(variant_id)
        if shown_price is None and cached is not None and cached[0].product_status == "active":
            reservation, info, version, raw_cart, written = self._reserve_first(
                variant_id, user, quantity, tier, now, cached)
            lines = {line.item_id: line for line in self._with_skus(
                [Line.loads(item, body) for item, body in raw_cart.items()], version)}
            if written is not None:
                # the line went in with the reserve: only the other lines' holds are left to read
                others = [l for l in lines.values() if l.item_id != item_id]
                lines[item_id] = written
                other_holds = self.engine.holds([(o.variant_id, o.item_id) for o in others]) if others else []
                return self._added(user, written, lines, others, other_holds, now)
            quote = self.pricing.price(info.product_id, variant_id, reservation.quantity, tier,
                                       catalog_version=version)
        else:
            reservation, info, version, lines, quote = self._check_then_reserve(
                variant_id, user, quantity, tier, shown_price, now)
        line = Line(item_id, variant_id, info.sku, reservation.quantity, quote.unit_price,
                    reservation.expires_ms, reservation.gen, tier)
        lines[item_id] = line

        others = [l for l in lines.values() if l.item_id != item_id]
        line, other_holds = self._store_line(user, line, info.product_id, version, others)
        lines[item_id] = line
        return self._added(user, line, lines, others, other_holds, now)

    @staticmethod
    def _added(user: str, line: Line, lines: dict[str, Line], others: list[Line], other_holds: list,
               now: int) -> dict:
        live = {line.item_id: True}
        for other, hold in zip(others, other_holds):
            live[other.item_id] = _line_is_live(other, hold, now)
        return {"item": item_json(line, True), "cart": cart_json(user, list(lines.values()), live)}

    def _reserve_first(self, variant_id: int, user: str, quantity: int, tier: str | None, now: int, cached):
        """The flash-sale path (no shown price, catalog cached): reserve, read the catalog version
        and the cart in one round trip, then check the cache was current. If the catalog changed
        and the product is no longer active, the units just taken go straight back.

        Unless the variant was short of stock a moment ago, the line is written in that same round
        trip too, priced from the cache for a fresh hold of `quantity` and only where the cart has
        no line for the item yet (HSETNX). It stands when the reserve did make exactly that fresh
        hold and the cache was current: then the line is the 5th value returned, and the add is one
        round trip. Otherwise it is treated as not written (the usual write and read-back follow),
        and on a refusal it is taken out again (only if still ours, by its generation), so a
        refused add leaves no line; a crash before that leaves one that shows as expired.
        """
        cached_info, cached_version = cached
        item_id = hold_id_for(variant_id, user)
        also = [("GET", catalog_cache.KEY), ("HGETALL", keys.cart(user))]
        guess = None
        if _SHORT_UNTIL.get(variant_id, 0.0) < time.monotonic():
            quote = self.pricing.price(cached_info.product_id, variant_id, quantity, tier,
                                       catalog_version=cached_version)
            guess = Line(item_id, variant_id, cached_info.sku, quantity, quote.unit_price,
                         now + self.engine.ttl_ms, new_gen(), tier)
            also.append(("HSETNX", keys.cart(user), item_id, guess.dumps()))
        try:
            reservation = self.engine.reserve(variant_id, user, quantity, mode="add", now=now,
                                              gen=guess.gen if guess else None, also=also)
        except Exception as exc:
            if isinstance(exc, InsufficientStock):
                _SHORT_UNTIL[variant_id] = time.monotonic() + _SHORT_SECONDS
            self._take_back(user, guess)
            raise
        raw_version, raw_cart, *wrote = reservation.also
        version = catalog_cache.parse(raw_version)
        info = cached_info
        if version != cached_version:
            try:
                info = self.pricing.variant_info(variant_id, catalog_version=version)
            except NotFound:
                self.engine.reserve(variant_id, user, quantity, mode="sub")
                self._take_back(user, guess)
                raise
            if info.product_status != "active":
                self.engine.reserve(variant_id, user, quantity, mode="sub")
                self._take_back(user, guess)
                _require_active(info)
        stands = (guess is not None and wrote == [1] and version == cached_version
                  and (reservation.gen, reservation.quantity, reservation.expires_ms)
                  == (guess.gen, guess.quantity, guess.expires_ms))
        return reservation, info, version, raw_cart, guess if stands else None

    def _take_back(self, user: str, line: Line | None) -> None:
        """Remove a line written ahead of a reserve that did not stand (only if it is still ours)."""
        if line is None:
            return
        try:
            self.engine.drop_cart_lines([(user, line.item_id, line.gen)])
        except Exception:  # noqa: BLE001 - the store is failing: the line shows as expired
            log.warning("could not take back the cart line %s written ahead of a refused add", line.item_id)

    def _check_then_reserve(self, variant_id: int, user: str, quantity: int, tier: str | None,
                            shown_price: Decimal | None, now: int):
        """Every check before anything is reserved: a shown price that differs reserves nothing."""
        item_id = hold_id_for(variant_id, user)
        (hold,), (raw_version, raw_cart) = self.engine.read_holds(
            [(variant_id, item_id)], also=[("GET", catalog_cache.KEY), ("HGETALL", keys.cart(user))])
        version = catalog_cache.parse(raw_version)

        info = self.pricing.variant_info(variant_id, catalog_version=version)
        _require_active(info)
        lines = {line.item_id: line for line in self._with_skus(
            [Line.loads(item, body) for item, body in raw_cart.items()], version)}
        existing = lines.get(item_id)
        current = hold.quantity if existing and hold and _line_is_live(existing, hold, now) else 0
        quote = self.pricing.price(info.product_id, variant_id, current + quantity, tier,
                                   catalog_version=version)
        if shown_price is not None and shown_price.quantize(CENTS) != quote.unit_price:
            raise PriceChanged(
                f"The price is now {money(quote.unit_price)}, not {money(shown_price)}",
                {"current_price": money(quote.unit_price), "price": money(shown_price),
                 "variant_id": variant_id},
            )
        reservation = self.engine.reserve(variant_id, user, quantity, mode="add", now=now)
        if reservation.quantity != current + quantity:
            # the hold changed under us (a concurrent add by the same customer): price what is held
            quote = self.pricing.price(info.product_id, variant_id, reservation.quantity, tier,
                                       catalog_version=version)
        return reservation, info, version, lines, quote

    def _store_line(self, user: str, line: Line, product_id: int, version: int | None,
                    others: list[Line] = ()) -> tuple[Line, list]:
        """Write a cart line until it shows what its hold holds; returns the line written and the
        holds of `others` (read in the same round trip as the first write, for the cart's statuses).

        Hold and line live in different hash slots, so they cannot change in one step: two adds of
        the same line can reserve in one order and write their lines in the other, leaving the line
        at an older quantity and price than the hold. Every writer reads the hold back after writing
        and writes again on a difference, so the last write always matches the hold.
        """
        other_holds: list = []
        for attempt in range(_STORE_ATTEMPTS):
            reads = [(line.variant_id, line.item_id)]
            if attempt == 0:
                reads += [(o.variant_id, o.item_id) for o in others]
            holds, _ = self.engine.read_holds(reads, also=[("HSET", keys.cart(user), line.item_id, line.dumps())])
            hold = holds[0]
            if attempt == 0:
                other_holds = holds[1:]
            if not _stale(line, hold):
                break
            quote = self.pricing.price(product_id, line.variant_id, hold.quantity, line.tier,
                                       catalog_version=version)
            line = Line(line.item_id, line.variant_id, line.sku, hold.quantity, quote.unit_price, hold.expires_ms,
                        hold.gen, line.tier)
        return line, other_holds

    # -- change / remove --------------------------------------------------------------------------

    def _find(self, item_id: str) -> tuple[str, Line]:
        parsed = parse_hold_id(item_id)
        if parsed is None:
            raise NotFound("cart item", item_id)
        variant_id, user = parsed
        if not USER_ID_RE.fullmatch(user):
            raise NotFound("cart item", item_id)
        raw = self.redis.hget(keys.cart(user), item_id)
        if raw is None:
            raise NotFound("cart item", item_id)
        return user, self._with_skus([Line.loads(item_id, raw)])[0]

    def change_quantity(self, item_id: str, quantity: int) -> dict:
        """Make a line `quantity` units: reserves or returns the difference, renews the hold, re-prices."""
        user, line = self._find(item_id)
        version = self.pricing.read_catalog_version()
        info = self.pricing.variant_info(line.variant_id, catalog_version=version)
        _require_active(info)
        quote = self.pricing.price(info.product_id, line.variant_id, quantity, line.tier, catalog_version=version)
        reservation = self.engine.reserve(line.variant_id, user, quantity, mode="set")
        line = Line(item_id, line.variant_id, line.sku, reservation.quantity, quote.unit_price,
                    reservation.expires_ms, reservation.gen, line.tier)
        line, _ = self._store_line(user, line, info.product_id, version)
        lines = self._lines(user)
        return {"item": item_json(line, True), "cart": cart_json(user, lines, self._liveness(lines))}

    def remove(self, item_id: str) -> None:
        """Remove a line and give its units back at once."""
        user, line = self._find(item_id)
        # release first: a crash before the line is deleted leaves a line shown as expired
        self.engine.release(line.variant_id, item_id, gen=line.gen)
        self.redis.hdel(keys.cart(user), item_id)
