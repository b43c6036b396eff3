"""Inventory endpoints (API.md, Inventory): durable on_hand with the live counters beside it."""
from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from app.api.auth import actor
from app.api.base import MAX_ID, Blueprint, PageArgs, Timestamp, list_schema, page_of
from app.api.context import container

blp = Blueprint("inventory", __name__, url_prefix="/api/inventory", description="Stock per variant")

MAX_STOCK = 1_000_000_000


class StockRowSchema(ma.Schema):
    variant_id = fields.Integer()
    sku = fields.String()
    on_hand = fields.Integer()
    available = fields.Integer()
    reserved = fields.Integer()
    active_holds = fields.Integer()
    updated_at = Timestamp()


StockListSchema = list_schema(StockRowSchema, "StockList")


class AdjustSchema(ma.Schema):
    delta = fields.Integer(required=True, strict=True,
                           validate=validate.Range(-MAX_STOCK, MAX_STOCK))
    reason = fields.String(required=True, validate=validate.Length(1, 500))


class SetOnHandSchema(ma.Schema):
    on_hand = fields.Integer(required=True, strict=True, validate=validate.Range(0, MAX_STOCK))
    reason = fields.String(required=True, validate=validate.Length(1, 500))


_SECURED = {"security": [{"bearer": []}]}


@blp.route("/")
@blp.arguments(PageArgs(), location="query")
@blp.response(200, StockListSchema)
@blp.doc(summary="Stock rows: on_hand from the database, available/reserved live", **_SECURED)
def list_stock(args):
    rows, total = container().inventory.list_stock(args["page"], args["per_page"])
    return page_of(rows, args["page"], args["per_page"], total)


@blp.route("/<int(max=%d):variant_id>/" % MAX_ID, methods=["GET"])
@blp.response(200, StockRowSchema)
@blp.doc(summary="One variant's stock row", **_SECURED)
def get_stock(variant_id):
    return container().inventory.get_stock(variant_id)


@blp.route("/<int(max=%d):variant_id>/" % MAX_ID, methods=["PUT"])
@blp.arguments(SetOnHandSchema())
@blp.response(200, StockRowSchema)
@blp.alt_response(409, description="stock_below_reserved")
@blp.doc(summary="Set on_hand (admin); written to the stock-movement ledger", **_SECURED)
def put_stock(body, variant_id):
    return container().inventory.set_on_hand(variant_id, body["on_hand"], body["reason"], actor())


@blp.route("/<int(max=%d):variant_id>/adjust/" % MAX_ID, methods=["POST"])
@blp.arguments(AdjustSchema())
@blp.response(200, StockRowSchema)
@blp.alt_response(409, description="stock_below_reserved")
@blp.doc(summary="Change on_hand by delta (admin); written to the stock-movement ledger", **_SECURED)
def adjust_stock(body, variant_id):
    return container().inventory.adjust(variant_id, body["delta"], body["reason"], actor())
