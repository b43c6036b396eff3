"""The cart service: every line is a hold, priced once when it is added (a price snapshot).

Add-to-cart is the hot path of a flash sale: one round trip to Redis for a new line (the reserve
script with the reads it needs and the line's write beside it, app/engine/carts.py), two when it
merges into a line, and none to the database once the catalog cache is warm.
"""
from __future__ import annotations

import logging
import re
import time
from decimal import Decimal
from typing import Any

from app import catalog_cache, clock
from app.engine.carts import Line
from app.engine.holdrec import hold_id_for, new_gen, parse_hold_id
from app.errors import InsufficientStock, NotFound, PriceChanged, ProductNotActive, ValidationFailed
from app.money import cents, money

log = logging.getLogger(__name__)

USER_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # fullmatch: "$" would let a final "\n" through
MAX_INT_USER = 10**18  # an integer user id is below this

_STORE_ATTEMPTS = 5
# After a refusal for stock, adds of that variant in this process skip the line written ahead of
# the reserve for a moment: a sold-out item would otherwise cost each refused add a second round trip.
_SHORT_SECONDS = 1.0
_SHORT_MAX_VARIANTS = 10_000


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


def _require_active(info) -> None:
    if info.product_status != "active":
        raise ProductNotActive(f"Product {info.product_id} is not active",
                               {"product_id": info.product_id, "status": info.product_status})


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
    """Carts for the storefront: add, read, change, remove."""

    def __init__(self, holds, store, pricing, settings):
        self.holds = holds  # app.engine.holds.Holds
        self.store = store  # app.engine.carts.CartStore
        self.pricing = pricing  # app.services.pricing.PricingService
        self.settings = settings
        self._short_until: dict[int, float] = {}

    # -- reads ------------------------------------------------------------------------------------

    def lines(self, user: str, version: int | None = None) -> list[Line]:
        """A customer's lines with their skus."""
        return self._with_skus(self.store.lines(user), version)

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
        holds = self.holds.holds([(line.variant_id, line.item_id) for line in lines])
        return {line.item_id: line.is_live(hold, now) for line, hold in zip(lines, holds)}

    def get_cart(self, user_id: Any) -> dict:
        user = canonical_user(user_id)
        lines = self.lines(user)
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
            reservation, info, version, read, written = self._reserve_first(
                variant_id, user, quantity, tier, now, cached)
            lines = {line.item_id: line for line in self._with_skus(read, version)}
            if written is not None:
                # the line went in with the reserve: only the other lines' holds are left to read
                others = [l for l in lines.values() if l.item_id != item_id]
                lines[item_id] = written
                other_holds = self.holds.holds([(o.variant_id, o.item_id) for o in others]) if others else []
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
            live[other.item_id] = other.is_live(hold, now)
        return {"item": item_json(line, True), "cart": cart_json(user, list(lines.values()), live)}

    def _reserve_first(self, variant_id: int, user: str, quantity: int, tier: str | None, now: int, cached):
        """The flash-sale path (no shown price, catalog cached): reserve, read the catalog version
        and the cart in one round trip, then check the cache was current. If the catalog changed
        and the product is no longer active, the units just taken go straight back.

        Unless the variant was short of stock a moment ago, the line is written in that same round
        trip too, priced from the cache for a fresh hold of `quantity` and only where the cart has
        no line for the item yet. It stands when the reserve did make exactly that fresh hold and
        the cache was current: then the add is one round trip. Otherwise it is treated as not
        written (the usual write and read-back follow), and on a refusal it is taken out again
        (only if still ours, by its generation), so a refused add leaves no line; a crash before
        that leaves one that shows as expired.
        """
        cached_info, cached_version = cached
        guess = None
        if self._short_until.get(variant_id, 0.0) < time.monotonic():
            quote = self.pricing.price(cached_info.product_id, variant_id, quantity, tier,
                                       catalog_version=cached_version)
            guess = Line(hold_id_for(variant_id, user), variant_id, cached_info.sku, quantity, quote.unit_price,
                         now + self.holds.ttl_ms, new_gen(), tier)
        try:
            reservation, raw_version, read, wrote = self.store.reserve_with_line(variant_id, user, quantity, now, guess)
        except Exception as exc:
            if isinstance(exc, InsufficientStock):
                self._mark_short(variant_id)
            self._take_back(user, guess)
            raise
        version = catalog_cache.parse(raw_version)
        info = cached_info
        if version != cached_version:
            try:
                info = self.pricing.variant_info(variant_id, catalog_version=version)
            except NotFound:
                self._undo(variant_id, user, quantity, guess)
                raise
            if info.product_status != "active":
                self._undo(variant_id, user, quantity, guess)
                _require_active(info)
        stands = (guess is not None and wrote and version == cached_version
                  and (reservation.gen, reservation.quantity, reservation.expires_ms)
                  == (guess.gen, guess.quantity, guess.expires_ms))
        return reservation, info, version, read, guess if stands else None

    def _mark_short(self, variant_id: int) -> None:
        if len(self._short_until) >= _SHORT_MAX_VARIANTS:
            self._short_until.clear()
        self._short_until[variant_id] = time.monotonic() + _SHORT_SECONDS

    def _undo(self, variant_id: int, user: str, quantity: int, guess: Line | None) -> None:
        """Give back the units of an add that must not stand, and its line written ahead."""
        self.holds.reserve(variant_id, user, quantity, mode="sub")
        self._take_back(user, guess)

    def _take_back(self, user: str, line: Line | None) -> None:
        """Remove a line written ahead of a reserve that did not stand (only if it is still ours)."""
        if line is None:
            return
        try:
            self.store.drop_lines([(user, line.item_id, line.gen)])
        except Exception:  # noqa: BLE001 - the store is failing: the line shows as expired
            log.warning("could not take back the cart line %s written ahead of a refused add", line.item_id)

    def _check_then_reserve(self, variant_id: int, user: str, quantity: int, tier: str | None,
                            shown_price: Decimal | None, now: int):
        """Every check before anything is reserved: a shown price that differs reserves nothing."""
        item_id = hold_id_for(variant_id, user)
        hold, raw_version, read = self.store.snapshot(user, variant_id, item_id)
        version = catalog_cache.parse(raw_version)

        info = self.pricing.variant_info(variant_id, catalog_version=version)
        _require_active(info)
        lines = {line.item_id: line for line in self._with_skus(read, version)}
        existing = lines.get(item_id)
        current = hold.quantity if existing and existing.is_live(hold, now) else 0
        quote = self.pricing.price(info.product_id, variant_id, current + quantity, tier,
                                   catalog_version=version)
        if shown_price is not None and cents(shown_price) != quote.unit_price:
            raise PriceChanged(
                f"The price is now {money(quote.unit_price)}, not {money(shown_price)}",
                {"current_price": money(quote.unit_price), "price": money(shown_price),
                 "variant_id": variant_id},
            )
        reservation = self.holds.reserve(variant_id, user, quantity, mode="add", now=now)
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
            pairs = [(line.variant_id, line.item_id)]
            if attempt == 0:
                pairs += [(o.variant_id, o.item_id) for o in others]
            holds = self.store.write(user, line, pairs)
            hold = holds[0]
            if attempt == 0:
                other_holds = holds[1:]
            if not line.is_behind(hold):
                break
            quote = self.pricing.price(product_id, line.variant_id, hold.quantity, line.tier,
                                       catalog_version=version)
            line = Line(line.item_id, line.variant_id, line.sku, hold.quantity, quote.unit_price, hold.expires_ms,
                        hold.gen, line.tier)
        return line, other_holds

    # -- change / remove --------------------------------------------------------------------------

    def _find(self, item_id: str) -> tuple[str, Line]:
        parsed = parse_hold_id(item_id)
        found = self.store.find(item_id) if parsed is not None and USER_ID_RE.fullmatch(parsed[1]) else None
        if found is None:
            raise NotFound("cart item", item_id)
        user, line = found
        return user, self._with_skus([line])[0]

    def change_quantity(self, item_id: str, quantity: int) -> dict:
        """Make a line `quantity` units: reserves or returns the difference, renews the hold, re-prices."""
        user, line = self._find(item_id)
        version = self.pricing.read_catalog_version()
        info = self.pricing.variant_info(line.variant_id, catalog_version=version)
        _require_active(info)
        quote = self.pricing.price(info.product_id, line.variant_id, quantity, line.tier, catalog_version=version)
        reservation = self.holds.reserve(line.variant_id, user, quantity, mode="set")
        line = Line(item_id, line.variant_id, line.sku, reservation.quantity, quote.unit_price,
                    reservation.expires_ms, reservation.gen, line.tier)
        line, _ = self._store_line(user, line, info.product_id, version)
        lines = self.lines(user)
        return {"item": item_json(line, True), "cart": cart_json(user, lines, self._liveness(lines))}

    def remove(self, item_id: str) -> None:
        """Remove a line and give its units back at once."""
        user, line = self._find(item_id)
        # release first: a crash before the line is deleted leaves a line shown as expired
        self.holds.release(line.variant_id, item_id, gen=line.gen)
        self.store.remove(user, item_id)
