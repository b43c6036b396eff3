"""Bundle add: several lines put into a cart all or nothing (API.md, Bundle add).

Every line is checked, reserved, priced and written as a single add (app/services/cart.py) would
check, reserve, price and write it, merging into the customer's line of that variant where there is
one; or nothing is reserved. In order:

1. every check that needs no reserve, for every line, before anything is reserved: the variant
   exists, its product is active, the shown price is the unit price at the line's quantity after
   merging (one round trip reads the catalog version, the cart and the lines' holds);
2. the reserve, all or nothing (app/engine/bundles.py: one script per hash slot on a cluster, in
   slot order, the slots already taken given back when a later one refuses; one script on a
   single Redis);
3. the cart lines, after the holds (a crash in between leaves holds without lines, which lapse),
   all in one round trip with the holds read back, and written again where a hold moved meanwhile.

A refused line answers with its own error, `details.variant_id` naming it. With an Idempotency-Key
the bundle id is derived from the key, so a retry of a bundle that died half-way first gives back
exactly what that attempt reserved (its journal, app/engine/bundles.py) and then runs again.
"""
from __future__ import annotations

import hashlib
import secrets
from decimal import Decimal
from typing import Any, Sequence

from app import catalog_cache, clock
from app.engine.carts import Line
from app.engine.holdrec import hold_id_for
from app.errors import DomainError, NotFound, PriceChanged, ProductNotActive, ValidationFailed
from app.money import cents, money
from app.services.cart import canonical_user, cart_json, item_json

MAX_LINES = 50
_STORE_ATTEMPTS = 5  # as the single add's


def bundle_id(user: str, idempotency_key: str | None) -> str:
    """The id a bundle's holds are journaled under: the same for every retry of one Idempotency-Key,
    random without one."""
    if idempotency_key is None:
        return secrets.token_hex(12)
    return hashlib.sha256(f"bundle\n{user}\n{idempotency_key}".encode()).hexdigest()[:24]


def check_lines(items: Sequence[dict]) -> None:
    """1 to MAX_LINES lines, each variant at most once (the schema checks the same; services are
    called from elsewhere too)."""
    if not 1 <= len(items) <= MAX_LINES:
        raise ValidationFailed("Request has invalid fields", {"items": [f"Length must be between 1 and {MAX_LINES}."]})
    first: dict[int, int] = {}
    for i, item in enumerate(items):
        vid = item["variant_id"]
        if vid in first:
            raise ValidationFailed("Request has invalid fields", {"items": {i: {"variant_id": [
                f"Variant {vid} is already line {first[vid]} of this bundle; each variant_id at most once."]}}})
        first[vid] = i


class BundleService:
    """Bundle add."""

    def __init__(self, bundles, store, pricing, settings):
        self.bundles = bundles  # app.engine.bundles.Bundles
        self.store = store  # app.engine.carts.CartStore
        self.pricing = pricing  # app.services.pricing.PricingService
        self.settings = settings

    def add(self, user_id: Any, items: Sequence[dict], user_tier: str | None = None,
            idempotency_key: str | None = None) -> dict:
        """Reserve and add every line of `items` ({variant_id, quantity, price?}), or none.

        Raises:
            ValidationFailed; and for the line refused (details.variant_id): NotFound,
            ProductNotActive, PriceChanged, InsufficientStock, LimitExceeded, CheckoutInProgress.
        """
        user = canonical_user(user_id)
        tier = user_tier.upper() if user_tier else None
        check_lines(items)
        wanted = [(int(item["variant_id"]), int(item["quantity"])) for item in items]
        bid = bundle_id(user, idempotency_key)
        if idempotency_key is not None:
            # a retry: what an attempt under this key left held when it died goes back first
            self.bundles.undo(bid, user, wanted)

        now = clock.now_ms()
        item_ids = [hold_id_for(vid, user) for vid, _ in wanted]
        pairs = [(vid, item_id) for (vid, _), item_id in zip(wanted, item_ids)]
        holds, raw_version, read = self.store.snapshot_many(user, pairs)
        version = catalog_cache.parse(raw_version)
        cart = {line.item_id: line for line in read}

        checked = []  # (info, quantity held before, quote) per line: every check before any reserve
        for item, item_id, hold in zip(items, item_ids, holds):
            vid, qty = int(item["variant_id"]), int(item["quantity"])
            try:
                checked.append(self._check(vid, qty, item.get("price"), tier, version, cart.get(item_id), hold, now))
            except DomainError as exc:
                exc.details["variant_id"] = vid
                raise

        reservations = self.bundles.reserve(bid, user, wanted, now=now)
        new_lines = []
        for (vid, qty), item_id, (info, current, quote), r in zip(wanted, item_ids, checked, reservations):
            if r.quantity != current + qty:
                # the hold changed under us (a concurrent add by the same customer): price what is held
                quote = self.pricing.price(info.product_id, vid, r.quantity, tier, catalog_version=version)
            new_lines.append(Line(item_id, vid, info.sku, r.quantity, quote.unit_price, r.expires_ms, r.gen, tier))

        mine = set(item_ids)
        others = self._with_skus([line for line in cart.values() if line.item_id not in mine], version)
        written, other_holds = self._store_lines(user, new_lines, [c[0].product_id for c in checked], version,
                                                 others)
        live = {line.item_id: True for line in written}
        for other, hold in zip(others, other_holds):
            live[other.item_id] = other.is_live(hold, now)
        every = {**cart, **{line.item_id: line for line in written}}
        return {"items": [item_json(line, True) for line in written],
                "cart": cart_json(user, list(every.values()), live)}

    def _check(self, vid: int, qty: int, shown: Decimal | None, tier: str | None, version: int | None,
               existing: Line | None, hold, now: int):
        """A line's checks, as the single add's: returns (variant info, units held before, quote)."""
        info = self.pricing.variant_info(vid, catalog_version=version)
        if info.product_status != "active":
            raise ProductNotActive(f"Product {info.product_id} is not active",
                                   {"product_id": info.product_id, "status": info.product_status})
        current = hold.quantity if existing and existing.is_live(hold, now) else 0
        quote = self.pricing.price(info.product_id, vid, current + qty, tier, catalog_version=version)
        if shown is not None and cents(shown) != quote.unit_price:
            raise PriceChanged(f"The price is now {money(quote.unit_price)}, not {money(shown)}",
                               {"current_price": money(quote.unit_price), "price": money(shown)})
        return info, current, quote

    def _with_skus(self, lines: list[Line], version: int | None) -> list[Line]:
        for line in lines:
            if not line.sku:
                try:
                    line.sku = self.pricing.variant_info(line.variant_id, catalog_version=version).sku
                except NotFound:
                    line.sku = ""
        return lines

    def _store_lines(self, user: str, lines: list[Line], product_ids: list[int], version: int | None,
                     others: list[Line]) -> tuple[list[Line], list]:
        """Write the lines until each shows what its hold holds (CartService._store_line, for many
        lines at once); returns them and the holds of `others`, read beside the first write."""
        pending = list(range(len(lines)))
        other_holds: list = []
        for attempt in range(_STORE_ATTEMPTS):
            pairs = [(lines[i].variant_id, lines[i].item_id) for i in pending]
            if attempt == 0:
                pairs += [(o.variant_id, o.item_id) for o in others]
            holds = self.store.write_many(user, [lines[i] for i in pending], pairs)
            if attempt == 0:
                other_holds = holds[len(pending):]
            behind = []
            for i, hold in zip(pending, holds):
                line = lines[i]
                if line.is_behind(hold):
                    quote = self.pricing.price(product_ids[i], line.variant_id, hold.quantity, line.tier,
                                               catalog_version=version)
                    lines[i] = Line(line.item_id, line.variant_id, line.sku, hold.quantity, quote.unit_price,
                                    hold.expires_ms, hold.gen, line.tier)
                    behind.append(i)
            if not behind:
                break
            pending = behind
        return lines, other_holds
