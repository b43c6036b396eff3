"""Orders (API.md, Orders)."""
from __future__ import annotations


from app.api.base import MAX_ID, Blueprint, PageArgs, list_schema, page_of, reply
from app.api.cart import OrderSchema, UserIdField
from app.api.context import container

blp = Blueprint("orders", __name__, url_prefix="/api/orders", description="Confirmed orders")


class OrderListArgs(PageArgs):
    user_id = UserIdField(load_default=None)


OrderListSchema = list_schema(OrderSchema, "OrderList")


@blp.route("/")
@blp.arguments(OrderListArgs(), location="query")
@blp.response(200, OrderListSchema)
@blp.doc(summary="Orders, newest first; ?user_id= for one customer's", security=[{"bearer": []}])
def list_orders(args):
    items, total = container().checkout.list_orders(args.get("user_id"), args["page"], args["per_page"])
    return reply(200, page_of(items, args["page"], args["per_page"], total))


@blp.route("/<int(max=%d):order_id>/" % MAX_ID)
@blp.response(200, OrderSchema)
@blp.doc(summary="One order", security=[{"bearer": []}])
def get_order(order_id):
    return reply(200, container().checkout.get_order(order_id))
