"""Schemas of the pricing endpoints (API.md, Pricing): one per resource, module-level instances."""
from __future__ import annotations

import re
from datetime import timezone
from decimal import Decimal

import marshmallow as ma
from marshmallow import fields, validate

from app.api.base import MAX_ID, MAX_QUANTITY, Id, Money, Timestamp, WholeMatch, list_schema
from app.money import cents, money
from app.pricing import RULE_TYPES, STACKINGS

TIER_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
TIER_MESSAGE = "1-32 characters from A-Z, a-z, 0-9, _ and -."


class Percent(fields.Decimal):
    """A percent from 0 to 100 with at most two places: in as a string or number, out as "10.00"."""

    def __init__(self, **kw):
        # Documented as what it is on the way out, a decimal string (like Money); a number is accepted in.
        metadata = {"type": "string", "pattern": r"^\d{1,3}(\.\d{1,2})?$", "example": "10.00",
                    **kw.pop("metadata", {})}
        super().__init__(places=None, as_string=True, allow_nan=False, metadata=metadata, **kw)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, float):
            if value != round(value, 2):
                raise ma.ValidationError("A percent has at most two decimal places; send a string such as \"12.5\".")
            value = repr(value)
        result = super()._deserialize(value, attr, data, **kwargs)
        if not result.is_finite():
            raise self.make_error("special")
        if result.as_tuple().exponent < -2:
            raise ma.ValidationError("A percent has at most two decimal places.")
        if not Decimal(0) <= result <= Decimal(100):
            raise ma.ValidationError("Must be between 0 and 100.")
        return cents(abs(result))  # abs: "-0" is zero, never echoed signed

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        return money(value)


class UtcTimestamp(Timestamp):
    """ISO-8601 in; a time without a zone is taken as UTC. Always an aware UTC datetime."""

    def _deserialize(self, value, attr, data, **kwargs):
        result = super()._deserialize(value, attr, data, **kwargs)
        if result.tzinfo is None:
            return result.replace(tzinfo=timezone.utc)
        return result.astimezone(timezone.utc)


class StrictBoolean(fields.Boolean):
    """JSON true or false only (1 or "true" is a validation error)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Tier(fields.String):
    """A customer tier: 1-32 characters of [A-Za-z0-9_-], stored and compared upper-case."""

    def __init__(self, **kw):
        super().__init__(validate=WholeMatch(TIER_PATTERN, error=TIER_MESSAGE), **kw)

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).upper()


class RuleSchema(ma.Schema):
    """A pricing rule as the API shows it."""

    id = fields.Integer(metadata={"example": 1})
    name = fields.String(metadata={"example": "Bulk 5+"})
    type = fields.String(metadata={"enum": list(RULE_TYPES), "example": "BULK"})
    priority = fields.Integer(metadata={"example": 1})
    percent = Percent(metadata={"example": "10.00"})
    min_quantity = fields.Integer(allow_none=True, metadata={"example": 5})
    tier = fields.String(allow_none=True)
    starts_at = Timestamp(allow_none=True)
    ends_at = Timestamp(allow_none=True)
    product_id = fields.Integer(allow_none=True)
    category_id = fields.Integer(allow_none=True)
    active = fields.Boolean()


def _name_not_blank(value: str) -> None:
    if not value.strip():
        raise ma.ValidationError("Must not be blank.")


class RuleInSchema(ma.Schema):
    """A rule as a client writes it (POST, PUT; PATCH loads it partial).

    `priority` defaults to 0 and `active` to true; `min_quantity` is for BULK rules, `tier` for
    USER_TIER rules, `starts_at`/`ends_at` (inclusive start, exclusive end) for SEASONAL rules.
    A rule is global, or scoped to `product_id` or to `category_id` (and its sub-categories).
    """

    name = fields.String(required=True, validate=[validate.Length(1, 200), _name_not_blank])
    type = fields.String(required=True, validate=validate.OneOf(RULE_TYPES))
    priority = fields.Integer(strict=True, validate=validate.Range(-MAX_ID - 1, MAX_ID))
    percent = Percent(required=True, metadata={"description": "0 to 100, at most two places", "example": "10.00"})
    min_quantity = fields.Integer(strict=True, allow_none=True, validate=validate.Range(1, MAX_QUANTITY))
    tier = Tier(allow_none=True)
    starts_at = UtcTimestamp(allow_none=True)
    ends_at = UtcTimestamp(allow_none=True)
    product_id = Id(allow_none=True)
    category_id = Id(allow_none=True)
    active = StrictBoolean()

    @ma.post_load
    def _strip_name(self, data, **kwargs):
        if "name" in data:
            data["name"] = data["name"].strip()
        return data


class RulePatchSchema(RuleInSchema):
    """A PATCH body: any subset of a rule's fields; the rule they leave must still be sound."""

    def __init__(self, **kw):
        kw.setdefault("partial", True)
        super().__init__(**kw)


RuleListSchema = list_schema(RuleSchema, "PricingRuleList")


class PriceQuerySchema(ma.Schema):
    quantity = fields.Integer(load_default=1, validate=validate.Range(1, MAX_QUANTITY),
                              metadata={"description": "units on the line, 1 to 1,000,000"})
    user_tier = Tier(load_default=None, metadata={"description": "the customer's tier, e.g. GOLD"})
    variant_id = fields.Integer(load_default=None, validate=validate.Range(1, MAX_ID),
                                metadata={"description": "a variant of this product; its price_adjustment is added"})
    at = UtcTimestamp(load_default=None, metadata={"description": "ISO-8601 time to price at, default now"})


class AppliedRuleSchema(ma.Schema):
    id = fields.Integer()
    name = fields.String()
    type = fields.String(metadata={"enum": list(RULE_TYPES)})
    percent = Percent()
    amount = Money(metadata={"description": "discount this rule took per unit"})


class QuoteSchema(ma.Schema):
    """The price of a line (API.md, Pricing)."""

    product_id = fields.Integer()
    variant_id = fields.Integer(allow_none=True)
    quantity = fields.Integer()
    user_tier = fields.String(allow_none=True)
    base_price = Money()
    variant_adjustment = Money()
    list_price = Money()
    applied_rules = fields.List(fields.Nested(AppliedRuleSchema))
    stacking = fields.String(metadata={"enum": list(STACKINGS)})
    unit_price = Money()
    line_total = Money()
    currency = fields.String(metadata={"example": "USD"})
