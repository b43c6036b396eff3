"""Cart endpoints (API.md, Cart): add, bundle add, get, change, remove, checkout."""
from __future__ import annotations

import re

import marshmallow as ma
from flask import request
from marshmallow import fields, validate
from webargs import core

from app.api.base import (MAX_ID, MAX_QUANTITY, Blueprint, Id, Money, Quantity, WholeMatch, decode_json,
                          flatten_messages, reply, require_clean_text)
from app.api.context import container
from app.api.pricing_schemas import TIER_MESSAGE, TIER_PATTERN
from app.errors import ValidationFailed
from app.services.bundle import MAX_LINES as MAX_BUNDLE_LINES
from app.services.bundle import check_lines
from app.services.cart import MAX_INT_USER, USER_ID_RE, canonical_user

blp = Blueprint("cart", __name__, url_prefix="/api/cart", description="Carts: every line is a hold")

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # fullmatch, as the user id
_SECURED = {"security": [{"bearer": []}],
            "parameters": [{"in": "header", "name": "Idempotency-Key", "required": False,
                            "schema": {"type": "string", "maxLength": 255},
                            "description": "A retry with the same key returns the first result"}]}


class UserIdField(fields.Field):
    """An integer, or 1-64 characters of [A-Za-z0-9_.-]."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return canonical_user(value)
        except ValidationFailed:
            raise ma.ValidationError("An integer, or 1-64 characters of [A-Za-z0-9_.-].") from None

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class AddSchema(ma.Schema):
    user_id = UserIdField(required=True, metadata={"oneOf": [{"type": "integer"}, {"type": "string"}]})
    variant_id = Id(required=True)
    quantity = Quantity(required=True)
    user_tier = fields.String(validate=WholeMatch(TIER_PATTERN, error=TIER_MESSAGE), allow_none=True)
    price = Money(allow_none=True)


class BundleItemSchema(ma.Schema):
    variant_id = Id(required=True)
    quantity = Quantity(required=True)
    price = Money(allow_none=True)


class BundleSchema(ma.Schema):
    user_id = UserIdField(required=True, metadata={"oneOf": [{"type": "integer"}, {"type": "string"}]})
    user_tier = fields.String(validate=WholeMatch(TIER_PATTERN, error=TIER_MESSAGE), allow_none=True)
    items = fields.List(fields.Nested(BundleItemSchema), required=True,
                        validate=validate.Length(1, MAX_BUNDLE_LINES))

    @ma.validates_schema(skip_on_field_errors=True)  # only once every line loaded
    def _each_variant_once(self, data, **_kw):
        try:
            check_lines(data["items"])
        except ValidationFailed as exc:
            raise ma.ValidationError(exc.details["items"], "items") from None


class ChangeSchema(ma.Schema):
    quantity = Quantity(required=True)


class CheckoutSchema(ma.Schema):
    pass


class ItemSchema(ma.Schema):
    id = fields.String()
    variant_id = fields.Integer()
    sku = fields.String()
    quantity = fields.Integer()
    unit_price = fields.String(metadata={"example": "470.25"})
    line_total = fields.String()
    status = fields.String(validate=validate.OneOf(["held", "expired"]))
    reserved_until = fields.String(metadata={"format": "date-time"})


class CartSchema(ma.Schema):
    user_id = fields.Raw(metadata={"oneOf": [{"type": "integer"}, {"type": "string"}]})
    items = fields.List(fields.Nested(ItemSchema))
    subtotal = fields.String()
    expires_at = fields.String(allow_none=True, metadata={"format": "date-time"})


class ItemAndCartSchema(ma.Schema):
    item = fields.Nested(ItemSchema)
    cart = fields.Nested(CartSchema)


class ItemsAndCartSchema(ma.Schema):
    items = fields.List(fields.Nested(ItemSchema))
    cart = fields.Nested(CartSchema)


class OrderItemSchema(ma.Schema):
    variant_id = fields.Integer()
    sku = fields.String()
    quantity = fields.Integer()
    unit_price = fields.String()
    line_total = fields.String()


class OrderSchema(ma.Schema):
    id = fields.Integer()
    user_id = fields.Raw(metadata={"oneOf": [{"type": "integer"}, {"type": "string"}]})
    status = fields.String()
    items = fields.List(fields.Nested(OrderItemSchema))
    total = fields.String()
    created_at = fields.String(metadata={"format": "date-time"})


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed("Request has invalid fields",
                               {"Idempotency-Key": ["1-255 printable characters without spaces."]})
    return key




# The views return finished responses: the services build the JSON of API.md, and the schemas
# above document it (and validate it in tests) without a second serialisation on the hot path.

_ADD_SCHEMA = AddSchema()
_ADD_FIELDS = frozenset(_ADD_SCHEMA.fields)


def _plain_add(data) -> dict | None:
    """What AddSchema loads from the common add body (no shown price, every field plainly valid),
    checked directly; None for anything else, which the schema then judges and words the errors of.
    Every string it lets through matched a pattern, so none can hold a NUL or a lone surrogate."""
    if type(data) is not dict or not _ADD_FIELDS.issuperset(data):
        return None
    variant_id, quantity, user = data.get("variant_id"), data.get("quantity"), data.get("user_id")
    if type(variant_id) is not int or not 1 <= variant_id <= MAX_ID:
        return None
    if type(quantity) is not int or not 1 <= quantity <= MAX_QUANTITY:
        return None
    if type(user) is int:
        if not 0 <= user < MAX_INT_USER:
            return None
        user = str(user)
    elif type(user) is not str or not USER_ID_RE.fullmatch(user):
        return None
    body = {"user_id": user, "variant_id": variant_id, "quantity": quantity}
    if "user_tier" in data:
        tier = data["user_tier"]
        if tier is not None and (type(tier) is not str or not TIER_PATTERN.fullmatch(tier)):
            return None
        body["user_tier"] = tier
    if "price" in data:
        if data["price"] is not None:
            return None  # money: the schema's Money field parses it
        body["price"] = None
    return body


def _load_add() -> dict:
    """The add body, loaded as flask-smorest's arguments would (same parser, same errors), without
    webargs' per-request machinery: add-to-cart is the flash-sale path."""
    data = decode_json(request)
    plain = _plain_add(data)
    if plain is not None:
        return plain
    if data is core.missing:
        data = {}
    require_clean_text(data)
    try:
        return _ADD_SCHEMA.load(data)
    except ma.ValidationError as exc:
        raise ValidationFailed("Request has invalid fields", flatten_messages(exc.messages)) from None


@blp.route("/add/", methods=["POST"])
@blp.response(201, ItemAndCartSchema)
@blp.alt_response(400, description="insufficient_stock, limit_exceeded, product_not_active, validation_error")
@blp.alt_response(409, description="price_changed, request_in_progress (Retry-After)")
@blp.alt_response(422, description="idempotency_key_reused")
@blp.doc(summary="Reserve units and add them to the cart (merging into an existing line)",
         requestBody={"required": True, "content": {"application/json": {"schema": AddSchema}}}, **_SECURED)
def add():
    body = _load_add()
    c = container()
    service = c.cart

    def do():
        return 201, service.add(body["user_id"], body["variant_id"], body["quantity"], body.get("user_tier"),
                                body.get("price"))

    return reply(*c.idempotency.run_once("add", body["user_id"], _idempotency_key(), body, do))


@blp.route("/bundle/", methods=["POST"])
@blp.arguments(BundleSchema())
@blp.response(201, ItemsAndCartSchema)
@blp.alt_response(400, description="insufficient_stock, limit_exceeded, product_not_active (details.variant_id "
                                   "names the line), validation_error")
@blp.alt_response(404, description="not_found: a line's variant (details.variant_id)")
@blp.alt_response(409, description="price_changed (details.variant_id), request_in_progress (Retry-After)")
@blp.alt_response(422, description="idempotency_key_reused")
@blp.doc(summary="Reserve and add several lines, all or nothing (each merging into its existing line)",
         **_SECURED)
def bundle(body):
    c = container()
    key = _idempotency_key()

    def do():
        return 201, c.bundle.add(body["user_id"], body["items"], body.get("user_tier"), key)

    return reply(*c.idempotency.run_once("bundle", body["user_id"], key, body, do))


# GET /api/cart/{user_id}/ and PATCH/DELETE /api/cart/{item_id}/ are one templated path to OpenAPI
# (and to a router): one path parameter, `ref`, read as a user id by GET and an item id by the others.
_REF = "/<string(maxlength=200):ref>/"
_REF_PARAMETER = [{"in": "path", "name": "ref", "required": True,
                   "description": "user id (GET) or cart item id (PATCH, DELETE)"}]


@blp.route(_REF, methods=["GET"], parameters=_REF_PARAMETER)
@blp.response(200, CartSchema)
@blp.alt_response(400, description="validation_error: not a valid user id")
@blp.doc(summary="A customer's cart (`ref` is the user id); lapsed lines show as expired",
         security=[{"bearer": []}])
def get_cart(ref):
    return reply(200, container().cart.get_cart(ref))


@blp.route(_REF, methods=["PATCH"], parameters=_REF_PARAMETER)
@blp.arguments(ChangeSchema())
@blp.response(200, ItemAndCartSchema)
@blp.alt_response(400, description="insufficient_stock, limit_exceeded, product_not_active, validation_error")
@blp.alt_response(404, description="not_found: no such cart item")
@blp.doc(summary="Change a line's quantity (`ref` is the item id; re-reserves, re-prices, renews the hold)",
         security=[{"bearer": []}])
def change(body, ref):
    return reply(200, container().cart.change_quantity(ref, body["quantity"]))


@blp.route(_REF, methods=["DELETE"], parameters=_REF_PARAMETER)
@blp.response(204)
@blp.alt_response(404, description="not_found: no such cart item")
@blp.doc(summary="Remove a line (`ref` is the item id); its units go back to stock at once",
         security=[{"bearer": []}])
def remove(ref):
    container().cart.remove(ref)
    return "", 204


@blp.route("/<string(maxlength=200):user_id>/checkout/", methods=["POST"])
@blp.arguments(CheckoutSchema(), required=False)
@blp.response(201, OrderSchema)
@blp.alt_response(400, description="empty_cart")
@blp.alt_response(409, description="checkout_in_progress, cart_changed, request_in_progress (Retry-After)")
@blp.alt_response(410, description="reservation_expired")
@blp.alt_response(422, description="idempotency_key_reused")
@blp.doc(summary="Commit every held line as one order, all-or-nothing", **_SECURED)
def checkout(_body, user_id):
    c = container()
    user = canonical_user(user_id)
    key = _idempotency_key()

    def do():
        return 201, c.checkout.checkout(user, key)

    def durable():
        found = c.checkout.recorded_checkout(user, key)
        return (201, found) if found is not None else None

    return reply(*c.idempotency.run_once("checkout", user, key, {}, do, durable))
