"""Schemas of the catalog resources (API.md, Catalog): one per resource, module-level instances.

Loading is strict: unknown fields (including read-only ones such as `id`) are a validation error,
a JSON string is never an integer, and every number and string has bounds.
"""
from __future__ import annotations

from decimal import Decimal

import marshmallow as ma
from marshmallow import fields, validate

from app.api.base import MAX_ID, MAX_MONEY, Id, Money, PageArgs, Timestamp, WholeMatch, list_schema

PRODUCT_STATUSES = ("active", "draft", "archived")
SKU_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
SKU_ERROR = "1-64 characters from A-Z a-z 0-9 _ . -"
MAX_ON_HAND = 1_000_000_000
MAX_NAME = 200
MAX_DESCRIPTION = 10_000
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_TEXT = 500
# Attribute numbers stay within what every JSON reader represents exactly.
MAX_ATTRIBUTE_INT = 2**53 - 1


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ma.ValidationError("Must not be blank.")


def _not_below_negative_max_money(value: Decimal) -> None:
    # A plain function rather than validate.Range: a Decimal bound would render as a string in the spec.
    if value < -Decimal(MAX_MONEY):
        raise ma.ValidationError(f"Must be at least -{MAX_MONEY}.")


def Name(**kw) -> fields.String:
    return fields.String(validate=[validate.Length(1, MAX_NAME), _not_blank], **kw)


class Attributes(fields.Dict):
    """Free-form variant attributes: string keys to scalar values (string, number, boolean or null)."""

    def __init__(self, **kw):
        super().__init__(keys=fields.String(validate=validate.Length(1, MAX_ATTRIBUTE_KEY)), **kw)

    def _deserialize(self, value, attr, data, **kwargs):
        result = super()._deserialize(value, attr, data, **kwargs)
        if len(result) > MAX_ATTRIBUTES:
            raise ma.ValidationError(f"At most {MAX_ATTRIBUTES} attributes.")
        errors = {}
        for key, item in result.items():
            problem = _attribute_problem(item)
            if problem:
                errors[key] = [problem]
        if errors:
            raise ma.ValidationError(errors)
        return result


def _attribute_problem(value) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_ATTRIBUTE_TEXT else f"At most {MAX_ATTRIBUTE_TEXT} characters."
    if isinstance(value, int):
        if abs(value) > MAX_ATTRIBUTE_INT:
            return f"Must be between -{MAX_ATTRIBUTE_INT} and {MAX_ATTRIBUTE_INT}."
        return None
    if isinstance(value, float):
        # NaN and infinities never get this far: the parser rejects them as bad JSON.
        return None if abs(value) <= MAX_ATTRIBUTE_INT else "Number is out of range."
    return "Must be a string, number, boolean or null."


# --- categories -----------------------------------------------------------------------------

class CategorySchema(ma.Schema):
    id = Id(dump_only=True)
    name = Name(required=True)
    parent_id = Id(allow_none=True, load_default=None,
                   metadata={"description": "The parent category; null for a top-level one. "
                                            "A category cannot be its own ancestor."})
    created_at = Timestamp(dump_only=True)
    updated_at = Timestamp(dump_only=True)


CategoryPage = list_schema(CategorySchema, "CategoryPage")


# --- variants -------------------------------------------------------------------------------

class VariantSchema(ma.Schema):
    """A variant; also the body of PUT/PATCH, which may not change stock (use the inventory API)."""

    id = Id(dump_only=True)
    product_id = Id(required=True)
    sku = fields.String(required=True, validate=WholeMatch(SKU_PATTERN, error=SKU_ERROR))
    attributes = Attributes(load_default=dict, metadata={
        "description": f"String keys to scalar values (string, number, boolean, null); "
                       f"at most {MAX_ATTRIBUTES}."})
    price_adjustment = Money(
        load_default=Decimal("0.00"),
        validate=_not_below_negative_max_money,
        metadata={"description": "Added to the product's base price; may be negative "
                                 "(a unit price never goes below 0.00)."},
    )
    created_at = Timestamp(dump_only=True)
    updated_at = Timestamp(dump_only=True)


class VariantCreateSchema(VariantSchema):
    on_hand = fields.Integer(
        strict=True, load_only=True, load_default=0, validate=validate.Range(0, MAX_ON_HAND),
        metadata={"description": "Initial stock, written to the stock ledger as `initial`."})


class VariantListArgs(PageArgs):
    product_id = fields.Integer(validate=validate.Range(1, MAX_ID))


VariantPage = list_schema(VariantSchema, "VariantPage")


# --- products -------------------------------------------------------------------------------

class ProductSchema(ma.Schema):
    id = Id(dump_only=True)
    name = Name(required=True)
    description = fields.String(load_default="", validate=validate.Length(0, MAX_DESCRIPTION))
    base_price = Money(required=True)
    status = fields.String(load_default="active", validate=validate.OneOf(PRODUCT_STATUSES),
                           metadata={"description": "Only active products can be added to carts."})
    category_id = Id(allow_none=True, load_default=None)
    created_at = Timestamp(dump_only=True)
    updated_at = Timestamp(dump_only=True)


class ProductDetailSchema(ProductSchema):
    variants = fields.List(fields.Nested(VariantSchema), dump_only=True)


class ProductListArgs(PageArgs):
    category_id = fields.Integer(validate=validate.Range(1, MAX_ID),
                                 metadata={"description": "Only products directly in this category."})
    status = fields.String(validate=validate.OneOf(PRODUCT_STATUSES))


ProductPage = list_schema(ProductSchema, "ProductPage")


class _Partial:
    """PATCH bodies: every field optional, nothing defaulted."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("partial", True)
        super().__init__(*args, **kwargs)


class ProductPatchSchema(_Partial, ProductSchema):
    pass


class VariantPatchSchema(_Partial, VariantSchema):
    pass


product_schema = ProductSchema()
product_detail_schema = ProductDetailSchema()
product_patch_schema = ProductPatchSchema()
product_list_args = ProductListArgs()
product_page = ProductPage()
category_schema = CategorySchema()
category_page = CategoryPage()
variant_schema = VariantSchema()
variant_create_schema = VariantCreateSchema()
variant_patch_schema = VariantPatchSchema()
variant_list_args = VariantListArgs()
variant_page = VariantPage()
page_args = PageArgs()
