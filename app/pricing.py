"""Dynamic pricing: which rules apply to a line, and the unit price they leave (API.md, Pricing).

Pure domain logic: no Flask, no Redis, no database. Money is `Decimal` end to end; the unit price
is quantised once, half-up, to cents (`app.money.cents`), and written as `app.money.money` writes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Iterable, Optional

from app.money import cents, money

BULK, USER_TIER, SEASONAL = "BULK", "USER_TIER", "SEASONAL"
RULE_TYPES = (BULK, USER_TIER, SEASONAL)
MULTIPLICATIVE, ADDITIVE = "multiplicative", "additive"
STACKINGS = (MULTIPLICATIVE, ADDITIVE)

ZERO = Decimal("0")
HUNDRED = Decimal("100")


@dataclass(frozen=True)
class Rule:
    """A pricing rule: a percent off the list price when its scope and condition hold."""

    id: int
    name: str
    type: str
    priority: int
    percent: Decimal
    min_quantity: Optional[int] = None
    tier: Optional[str] = None
    starts_at: Optional[datetime] = None
    ends_at: Optional[datetime] = None
    product_id: Optional[int] = None
    category_id: Optional[int] = None
    active: bool = True

    def __post_init__(self):
        if self.type not in RULE_TYPES:
            raise ValueError(f"unknown rule type {self.type!r}")
        if not ZERO <= self.percent <= HUNDRED:
            raise ValueError(f"rule percent must be between 0 and 100, got {self.percent}")

    def in_scope(self, product_id: int, category_ids: Iterable[int]) -> bool:
        """Global, or scoped to this product, or to its category or one of its ancestors."""
        if self.product_id is not None:
            return self.product_id == product_id
        if self.category_id is not None:
            return self.category_id in set(category_ids)
        return True

    def condition_holds(self, quantity: int, user_tier: Optional[str], at: datetime) -> bool:
        if self.type == BULK:
            return self.min_quantity is not None and quantity >= self.min_quantity
        if self.type == USER_TIER:
            return bool(user_tier) and self.tier is not None and self.tier.upper() == user_tier.upper()
        # SEASONAL: inclusive start, exclusive end; an open bound is unbounded.
        if self.starts_at is not None and at < self.starts_at:
            return False
        if self.ends_at is not None and at >= self.ends_at:
            return False
        return True

    def applies(self, *, product_id: int, category_ids: Iterable[int], quantity: int,
                user_tier: Optional[str], at: datetime) -> bool:
        return (self.active and self.in_scope(product_id, category_ids)
                and self.condition_holds(quantity, user_tier, at))


def rule_problems(*, type: str, min_quantity: Optional[int], tier: Optional[str],
                  starts_at: Optional[datetime], ends_at: Optional[datetime],
                  product_id: Optional[int], category_id: Optional[int]) -> dict[str, list[str]]:
    """What is wrong with a rule's combination of fields, by field name (empty when it is sound)."""
    problems: dict[str, list[str]] = {}

    def add(name: str, message: str) -> None:
        problems.setdefault(name, []).append(message)

    if type not in RULE_TYPES:
        add("type", f"Must be one of: {', '.join(RULE_TYPES)}.")
        return problems
    if type == BULK:
        if min_quantity is None:
            add("min_quantity", "A BULK rule needs a min_quantity of at least 1.")
    elif min_quantity is not None:
        add("min_quantity", "Only a BULK rule has a min_quantity; send null.")
    if type == USER_TIER:
        if not tier:
            add("tier", "A USER_TIER rule needs a tier.")
    elif tier is not None:
        add("tier", "Only a USER_TIER rule has a tier; send null.")
    if type == SEASONAL:
        if starts_at is None and ends_at is None:
            add("starts_at", "A SEASONAL rule needs starts_at, ends_at or both.")
        elif starts_at is not None and ends_at is not None and not starts_at < ends_at:
            add("ends_at", "ends_at must be after starts_at.")
    else:
        for name, value in (("starts_at", starts_at), ("ends_at", ends_at)):
            if value is not None:
                add(name, f"Only a SEASONAL rule has {name}; send null.")
    if product_id is not None and category_id is not None:
        add("category_id", "A rule is scoped to a product or to a category, not both.")
    return problems


@dataclass(frozen=True)
class AppliedRule:
    """A rule that applied, and the discount it took per unit (rounded half-up to cents)."""

    id: int
    name: str
    type: str
    percent: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Quote:
    """The price of one line: list price, the rules that applied, unit price and line total."""

    product_id: int
    variant_id: Optional[int]
    quantity: int
    user_tier: Optional[str]
    base_price: Decimal
    variant_adjustment: Decimal
    list_price: Decimal
    applied_rules: tuple[AppliedRule, ...]
    stacking: str
    unit_price: Decimal
    line_total: Decimal
    currency: str


def quote(*, base_price: Decimal, variant_adjustment: Decimal, quantity: int, user_tier: Optional[str],
          at: datetime, rules: Iterable[Rule], stacking: str, product_id: int, variant_id: Optional[int],
          category_ids: Iterable[int], currency: str) -> Quote:
    """Price `quantity` units of a product (variant) at time `at` for a customer of `user_tier`.

    Args:
        category_ids: the product's category and all its ancestors (empty when it has none).
        at: an aware datetime; compared with the seasonal rules' bounds.
    Raises:
        ValueError: unknown `stacking` or a quantity below 1.
    """
    if stacking not in STACKINGS:
        raise ValueError(f"stacking must be one of {STACKINGS}, got {stacking!r}")
    if quantity < 1:
        raise ValueError(f"quantity must be at least 1, got {quantity}")
    categories = frozenset(category_ids)
    base_price, variant_adjustment = Decimal(base_price), Decimal(variant_adjustment)
    list_price = base_price + variant_adjustment
    applicable = sorted(
        (r for r in rules if r.applies(product_id=product_id, category_ids=categories, quantity=quantity,
                                       user_tier=user_tier, at=at)),
        key=lambda r: (r.priority, r.id),
    )

    # Discounts are kept in full precision; only the unit price is rounded, once.
    basis = max(list_price, ZERO)  # a negative list price (odd adjustment) gets no discount
    remaining = basis
    applied = []
    for rule in applicable:
        base_of_rule = remaining if stacking == MULTIPLICATIVE else basis
        discount = base_of_rule * rule.percent / HUNDRED
        # Additive stacking can ask for more than is left; a rule takes at most what remains,
        # so the amounts add up to the discount actually given.
        discount = min(discount, remaining)
        remaining -= discount
        applied.append(AppliedRule(rule.id, rule.name, rule.type, rule.percent, cents(discount)))

    unit_price = cents(remaining)
    if unit_price <= ZERO:  # never below zero, and never "-0.00"
        unit_price = cents(ZERO)
    return Quote(
        product_id=product_id,
        variant_id=variant_id,
        quantity=quantity,
        user_tier=user_tier,
        base_price=base_price,
        variant_adjustment=variant_adjustment,
        list_price=list_price,
        applied_rules=tuple(applied),
        stacking=stacking,
        unit_price=unit_price,
        line_total=cents(unit_price * quantity),
        currency=currency,
    )


def applied_rule_to_json(rule: AppliedRule) -> dict:
    return {"id": rule.id, "name": rule.name, "type": rule.type,
            "percent": money(rule.percent), "amount": money(rule.amount)}


def quote_to_json(q: Quote) -> dict:
    """The price JSON of API.md, keys in its order, money as strings with two places."""
    return {
        "product_id": q.product_id,
        "variant_id": q.variant_id,
        "quantity": q.quantity,
        "user_tier": q.user_tier,
        "base_price": money(q.base_price),
        "variant_adjustment": money(q.variant_adjustment),
        "list_price": money(q.list_price),
        "applied_rules": [applied_rule_to_json(r) for r in q.applied_rules],
        "stacking": q.stacking,
        "unit_price": money(q.unit_price),
        "line_total": money(q.line_total),
        "currency": q.currency,
    }
