"""Pricing endpoints (API.md, Pricing): the price of a line, and the pricing-rules CRUD."""
from __future__ import annotations

from flask.views import MethodView

from app.api.base import Blueprint, PageArgs, page_of
from app.api.context import container
from app.api.pricing_schemas import (
    PriceQuerySchema,
    QuoteSchema,
    RuleInSchema,
    RuleListSchema,
    RulePatchSchema,
    RuleSchema,
)

blp = Blueprint("pricing", __name__, url_prefix="/api/pricing", description="Dynamic pricing and pricing rules")

ADMIN = [{"bearer": []}]


# `rules` never matches `<int:product_id>`, so the two route families cannot capture each other.
@blp.route("/<int:product_id>/price/")
@blp.arguments(PriceQuerySchema(), location="query", as_kwargs=True)
@blp.response(200, QuoteSchema)
@blp.alt_response(400, description="validation_error (also when variant_id belongs to another product)")
@blp.alt_response(404, description="not_found: unknown product or variant")
@blp.doc(summary="Price a line: list price, the rules that applied, unit price and line total")
def price(product_id, quantity, user_tier, variant_id, at):
    return container().pricing.price(product_id, variant_id, quantity, user_tier, at)


@blp.route("/rules/")
class Rules(MethodView):
    @blp.arguments(PageArgs(), location="query", as_kwargs=True)
    @blp.response(200, RuleListSchema)
    @blp.doc(summary="List pricing rules in id order")
    def get(self, page, per_page):
        items, total = container().pricing.list_rules(page, per_page)
        return page_of(items, page, per_page, total)

    @blp.arguments(RuleInSchema())
    @blp.response(201, RuleSchema)
    @blp.alt_response(404, description="not_found: unknown product_id or category_id")
    @blp.doc(summary="Create a pricing rule", security=ADMIN)
    def post(self, fields):
        return container().pricing.create_rule(fields)


@blp.route("/rules/<int:rule_id>/")
class RuleById(MethodView):
    @blp.response(200, RuleSchema)
    @blp.alt_response(404, description="not_found")
    @blp.doc(summary="One pricing rule")
    def get(self, rule_id):
        return container().pricing.get_rule(rule_id)

    @blp.arguments(RuleInSchema())
    @blp.response(200, RuleSchema)
    @blp.alt_response(404, description="not_found: unknown rule, product_id or category_id")
    @blp.doc(summary="Replace a pricing rule (fields left out take their defaults)", security=ADMIN)
    def put(self, fields, rule_id):
        return container().pricing.replace_rule(rule_id, fields)

    @blp.arguments(RulePatchSchema())
    @blp.response(200, RuleSchema)
    @blp.alt_response(404, description="not_found: unknown rule, product_id or category_id")
    @blp.doc(summary="Change some fields of a pricing rule", security=ADMIN)
    def patch(self, changes, rule_id):
        return container().pricing.update_rule(rule_id, changes)

    @blp.response(204)
    @blp.alt_response(404, description="not_found")
    @blp.doc(summary="Delete a pricing rule", security=ADMIN)
    def delete(self, rule_id):
        container().pricing.delete_rule(rule_id)
