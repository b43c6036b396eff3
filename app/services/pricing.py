"""Pricing rules (CRUD) and the price of a line, from the database through a per-process cache.

The module-level functions take a session and leave the transaction to their caller;
`PricingService` owns the transactions (every rule write runs in `with self._write(fields) as session:`,
which commits and then bumps the catalog version), and caches what pricing reads (active rules,
products, variants, quotes) keyed by that version, so a price is never computed from a stale rule
once a change has been acknowledged. Every cache is bounded by CACHE_MAX_ENTRIES.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Iterator, Optional

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from app import catalog_cache, pricing
from app.clock import utcnow
from app.errors import NotFound, ValidationFailed
from persistence.models import Category, PricingRule, Product, Variant

log = logging.getLogger(__name__)

MAX_ID = 2**31 - 1
# Every field a client sets on a rule, with the value PUT gives one it leaves out.
RULE_DEFAULTS: dict[str, Any] = {
    "priority": 0,
    "min_quantity": None,
    "tier": None,
    "starts_at": None,
    "ends_at": None,
    "product_id": None,
    "category_id": None,
    "active": True,
}
RULE_FIELDS = ("name", "type", "percent", *RULE_DEFAULTS)
MAX_CATEGORY_DEPTH = 64
# A backstop only: the version check is what keeps prices fresh. It bounds how long a cache could
# survive a Redis that lost the version key and counted back up to the same number.
CACHE_MAX_AGE_SECONDS = 60.0
# At most this many products and variants together, and at most this many quotes, per process.
CACHE_MAX_ENTRIES = 50_000


def _valid_id(ident: Any) -> bool:
    return isinstance(ident, int) and not isinstance(ident, bool) and 1 <= ident <= MAX_ID


# --- rules CRUD: functions taking a session -------------------------------------------------

def list_rules(session: Session, page: int, per_page: int) -> tuple[list[PricingRule], int]:
    """One page of rules in id order, and how many there are in all."""
    total = session.scalar(select(func.count()).select_from(PricingRule)) or 0
    rows = session.scalars(
        select(PricingRule).order_by(PricingRule.id).limit(per_page).offset((page - 1) * per_page)
    ).all()
    return list(rows), int(total)


def get_rule(session: Session, rule_id: int) -> PricingRule:
    """The rule with this id; raises NotFound."""
    rule = session.get(PricingRule, rule_id) if _valid_id(rule_id) else None
    if rule is None:
        raise NotFound("pricing rule", rule_id)
    return rule


def _check_rule(session: Session, values: dict[str, Any]) -> None:
    """Raise ValidationFailed for a bad combination of fields, NotFound for an unknown scope id."""
    problems = pricing.rule_problems(**{k: values[k] for k in (
        "type", "min_quantity", "tier", "starts_at", "ends_at", "product_id", "category_id")})
    if problems:
        raise ValidationFailed("Pricing rule is not valid", problems)
    product_id, category_id = values["product_id"], values["category_id"]
    if product_id is not None and (not _valid_id(product_id) or session.get(Product, product_id) is None):
        raise NotFound("product", product_id)
    if category_id is not None and (not _valid_id(category_id) or session.get(Category, category_id) is None):
        raise NotFound("category", category_id)


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    if values.get("tier") is not None:
        values["tier"] = values["tier"].upper()
    return values


def create_rule(session: Session, fields: dict[str, Any]) -> PricingRule:
    """Add a rule; fields left out take RULE_DEFAULTS."""
    values = _normalise({**RULE_DEFAULTS, **fields})
    _check_rule(session, values)
    rule = PricingRule(**{k: values[k] for k in RULE_FIELDS})
    session.add(rule)
    session.flush()
    return rule


def replace_rule(session: Session, rule_id: int, fields: dict[str, Any]) -> PricingRule:
    """PUT: every field is set; those left out take RULE_DEFAULTS."""
    rule = get_rule(session, rule_id)
    values = _normalise({**RULE_DEFAULTS, **fields})
    _check_rule(session, values)
    for name in RULE_FIELDS:
        setattr(rule, name, values[name])
    session.flush()
    return rule


def update_rule(session: Session, rule_id: int, changes: dict[str, Any]) -> PricingRule:
    """PATCH: the given fields change; the rule they leave must still be sound."""
    rule = get_rule(session, rule_id)
    values = _normalise({**{name: getattr(rule, name) for name in RULE_FIELDS}, **changes})
    _check_rule(session, values)
    for name in RULE_FIELDS:
        setattr(rule, name, values[name])
    session.flush()
    return rule


def delete_rule(session: Session, rule_id: int) -> None:
    """Remove a rule; raises NotFound."""
    session.delete(get_rule(session, rule_id))
    session.flush()


def to_domain(row: PricingRule) -> pricing.Rule:
    """The pure rule the engine works with."""
    return pricing.Rule(
        id=row.id, name=row.name, type=row.type, priority=row.priority, percent=Decimal(row.percent),
        min_quantity=row.min_quantity, tier=row.tier, starts_at=row.starts_at, ends_at=row.ends_at,
        product_id=row.product_id, category_id=row.category_id, active=row.active,
    )


def load_active_rules(session: Session) -> tuple[pricing.Rule, ...]:
    """Every active rule; scope and condition are checked per line by the engine."""
    rules = []
    for row in session.scalars(select(PricingRule).where(PricingRule.active.is_(True))):
        try:
            rules.append(to_domain(row))
        except ValueError as exc:  # only a row written behind the API's back can get here
            log.warning("pricing rule %s skipped: %s", row.id, exc)
    return tuple(rules)


def category_chain(session: Session, category_id: Optional[int]) -> tuple[int, ...]:
    """A category and its ancestors, nearest first; stops on a cycle."""
    chain: list[int] = []
    while category_id is not None and category_id not in chain and len(chain) < MAX_CATEGORY_DEPTH:
        chain.append(category_id)
        category_id = session.scalar(select(Category.parent_id).where(Category.id == category_id))
    return tuple(chain)


# --- the service ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProductInfo:
    """What pricing (and the cart) need of a product: category_ids is its category and ancestors."""

    id: int
    base_price: Decimal
    status: str
    category_ids: tuple[int, ...]


@dataclass(frozen=True)
class VariantInfo:
    """What pricing and add-to-cart need of a variant (and of its product's status)."""

    id: int
    product_id: int
    sku: str
    price_adjustment: Decimal
    product_status: str


@dataclass
class _Snapshot:
    """What pricing read from the database, valid for one catalog version."""

    version: Optional[int]
    born: float = field(default_factory=time.monotonic)
    rules: Optional[tuple[pricing.Rule, ...]] = None
    products: dict[int, ProductInfo] = field(default_factory=dict)
    variants: dict[int, VariantInfo] = field(default_factory=dict)
    # quotes for "now": (product, variant, quantity, tier) -> (quote, valid until); see _quote_now
    quotes: dict[tuple, tuple[pricing.Quote, datetime]] = field(default_factory=dict)
    next_boundary: Optional[datetime] = None

    def has_room(self) -> bool:
        """Whether one more product or variant may be cached (ids come from clients: bounded)."""
        return len(self.products) + len(self.variants) < CACHE_MAX_ENTRIES

    def fresh_for(self, version: Optional[int]) -> bool:
        # A full snapshot is replaced by an empty one for the same version.
        return (version is not None and self.version == version
                and time.monotonic() - self.born < CACHE_MAX_AGE_SECONDS
                and self.has_room())


class PricingService:
    """Rules CRUD for the API and the price of a line for the API and the cart."""

    def __init__(self, sessions: sessionmaker[Session], redis, settings):
        self.sessions, self.redis, self.settings = sessions, redis, settings
        self._lock = threading.Lock()
        self._snapshot = _Snapshot(version=None)

    # -- rules ---------------------------------------------------------------------------

    def list_rules(self, page: int = 1, per_page: int = 50) -> tuple[list[PricingRule], int]:
        with self.sessions() as session:
            return list_rules(session, page, per_page)

    def get_rule(self, rule_id: int) -> PricingRule:
        with self.sessions() as session:
            return get_rule(session, rule_id)

    def create_rule(self, fields: dict[str, Any]) -> PricingRule:
        with self._write(fields) as session:
            return create_rule(session, fields)

    def replace_rule(self, rule_id: int, fields: dict[str, Any]) -> PricingRule:
        with self._write(fields, rule_id) as session:
            return replace_rule(session, rule_id, fields)

    def update_rule(self, rule_id: int, changes: dict[str, Any]) -> PricingRule:
        with self._write(changes, rule_id) as session:
            return update_rule(session, rule_id, changes)

    def delete_rule(self, rule_id: int) -> None:
        with self._write({}, rule_id) as session:
            delete_rule(session, rule_id)

    @contextmanager
    def _write(self, fields: dict[str, Any], rule_id: Optional[int] = None) -> Iterator[Session]:
        """The transaction of every rule write: catalog_cache.write pings Redis first (a rule
        committed while its bump is lost would be priced stale by other processes), commits, then
        bumps the catalog version. A refusal by the database that a concurrent writer caused (the
        rule, or the product or category it is scoped to, deleted after our checks) is the 404 the
        checks give."""
        try:
            with catalog_cache.write(self.sessions, self.redis) as session:
                yield session
        except (IntegrityError, StaleDataError) as exc:
            raise self._explain(fields, rule_id, exc) from exc

    def _explain(self, fields: dict[str, Any], rule_id: Optional[int], exc: Exception) -> Exception:
        with self.sessions() as session:
            if rule_id is not None and session.get(PricingRule, rule_id) is None:
                return NotFound("pricing rule", rule_id)
            for name, model, what in (("product_id", Product, "product"), ("category_id", Category, "category")):
                ident = fields.get(name)
                if ident is not None and session.get(model, ident) is None:
                    return NotFound(what, ident)
        return exc

    # -- prices --------------------------------------------------------------------------

    def price(self, product_id: int, variant_id: Optional[int] = None, quantity: int = 1,
              user_tier: Optional[str] = None, at: Optional[datetime] = None, *,
              catalog_version: Optional[int] = None) -> pricing.Quote:
        """The price of `quantity` units of a product (and variant) for a tier at a time.

        Args:
            at: aware datetime, default now.
            catalog_version: the value of `keys.catalog_version()` if the caller already read it
                (in a pipeline); otherwise it is read here with one GET.
        Raises:
            NotFound: unknown product or variant.
            ValidationFailed: the variant belongs to another product.
        """
        snapshot = self._current_snapshot(catalog_version)
        product = self._product(snapshot, product_id)
        adjustment = Decimal("0.00")
        if variant_id is not None:
            variant = self._variant(snapshot, variant_id)
            if variant.product_id != product_id:
                raise ValidationFailed(
                    "variant_id does not belong to this product",
                    {"variant_id": [f"Variant {variant_id} belongs to product {variant.product_id}, "
                                    f"not product {product_id}."]},
                )
            adjustment = variant.price_adjustment
        tier = user_tier.upper() if user_tier else None
        if at is None:
            return self._quote_now(snapshot, product, product_id, variant_id, adjustment, quantity, tier)
        return pricing.quote(
            base_price=product.base_price,
            variant_adjustment=adjustment,
            quantity=quantity,
            user_tier=user_tier.upper() if user_tier else None,
            at=at or utcnow(),
            rules=self._rules(snapshot),
            stacking=self.settings.pricing_stacking,
            product_id=product_id,
            variant_id=variant_id,
            category_ids=product.category_ids,
            currency=self.settings.currency,
        )

    def _quote_now(self, snapshot: _Snapshot, product: ProductInfo, product_id: int, variant_id: Optional[int],
                   adjustment: Decimal, quantity: int, tier: Optional[str]) -> pricing.Quote:
        """A price for now, from the snapshot's quote cache while no seasonal rule starts or ends:
        the same inputs under the same rules give the same quote (add-to-cart asks for the same
        few prices over and over in a flash sale)."""
        now = utcnow()
        rules = self._rules(snapshot)
        if snapshot.next_boundary is None or now >= snapshot.next_boundary:
            # a quote made now stays right until the next seasonal start or end after now
            upcoming = [b for r in rules for b in (r.starts_at, r.ends_at) if b is not None and b > now]
            snapshot.quotes = {}
            snapshot.next_boundary = min(upcoming) if upcoming else datetime.max.replace(tzinfo=now.tzinfo)
        key = (product_id, variant_id, quantity, tier)
        cached = snapshot.quotes.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        quote = pricing.quote(
            base_price=product.base_price, variant_adjustment=adjustment, quantity=quantity, user_tier=tier,
            at=now, rules=rules, stacking=self.settings.pricing_stacking, product_id=product_id,
            variant_id=variant_id, category_ids=product.category_ids, currency=self.settings.currency)
        if len(snapshot.quotes) >= CACHE_MAX_ENTRIES:
            snapshot.quotes.clear()
        snapshot.quotes[key] = (quote, snapshot.next_boundary)
        return quote

    def price_variant(self, variant_id: int, quantity: int = 1, user_tier: Optional[str] = None,
                      at: Optional[datetime] = None, *, catalog_version: Optional[int] = None) -> pricing.Quote:
        """The price of a line when only the variant is known (the cart); raises NotFound."""
        snapshot = self._current_snapshot(catalog_version)
        variant = self._variant(snapshot, variant_id)
        return self.price(variant.product_id, variant_id, quantity, user_tier, at,
                          catalog_version=snapshot.version)

    def variant_info(self, variant_id: int, *, catalog_version: Optional[int] = None) -> VariantInfo:
        """A variant's sku, product and product status, from the same cache as prices; raises NotFound."""
        return self._variant(self._current_snapshot(catalog_version), variant_id)

    def cached_variant_info(self, variant_id: int) -> Optional[tuple[VariantInfo, int]]:
        """What the cache holds for a variant and the catalog version it was read at, without
        asking Redis; None when not cached. The caller must check the version afterwards."""
        snapshot = self._snapshot
        info = snapshot.variants.get(variant_id)
        if info is None or snapshot.version is None or not snapshot.fresh_for(snapshot.version):
            return None
        return info, snapshot.version

    def read_catalog_version(self) -> Optional[int]:
        """The catalog version in Redis (one GET); None when the key does not exist."""
        return catalog_cache.read(self.redis)

    def _current_snapshot(self, version: Optional[int]) -> _Snapshot:
        if version is None:
            version = catalog_cache.read(self.redis)
        if version is None:
            version = catalog_cache.start(self.redis)
        with self._lock:
            snapshot = self._snapshot
            if snapshot.fresh_for(version):
                return snapshot
            # Everything loaded into the new snapshot is read after `version` was, so it is at
            # least as new as every change acknowledged before it.
            snapshot = _Snapshot(version=version)
            # No version key (a fresh or emptied Redis): price uncached until the next bump.
            self._snapshot = snapshot if version is not None else _Snapshot(version=None)
            return snapshot

    def _rules(self, snapshot: _Snapshot) -> tuple[pricing.Rule, ...]:
        if snapshot.rules is None:
            with self.sessions() as session:
                snapshot.rules = load_active_rules(session)
        return snapshot.rules

    def _product(self, snapshot: _Snapshot, product_id: int) -> ProductInfo:
        info = snapshot.products.get(product_id)
        if info is None:
            with self.sessions() as session:
                row = session.get(Product, product_id) if _valid_id(product_id) else None
                if row is None:
                    raise NotFound("product", product_id)
                info = ProductInfo(row.id, Decimal(row.base_price), row.status,
                                   category_chain(session, row.category_id))
            if snapshot.has_room():
                snapshot.products[product_id] = info
        return info

    def _variant(self, snapshot: _Snapshot, variant_id: int) -> VariantInfo:
        info = snapshot.variants.get(variant_id)
        if info is None:
            with self.sessions() as session:
                row = session.execute(
                    select(Variant.id, Variant.product_id, Variant.sku, Variant.price_adjustment, Product.status)
                    .join(Product, Product.id == Variant.product_id)
                    .where(Variant.id == variant_id)
                ).first() if _valid_id(variant_id) else None
                if row is None:
                    raise NotFound("variant", variant_id)
                info = VariantInfo(row.id, row.product_id, row.sku, Decimal(row.price_adjustment), row.status)
            if snapshot.has_room():
                snapshot.variants[variant_id] = info
        return info
