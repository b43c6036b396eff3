"""Catalog endpoints (API.md, Catalog): products, categories and variants.

Reads are public, writes need the admin key (enforced once, in app.api.auth). Each route loads with
a schema, calls one service function and dumps with a schema; errors become HTTP in app.api.errors.
"""
from __future__ import annotations

from flask.views import MethodView

from app.api import catalog_schemas as sch
from app.api.auth import actor
from app.api.base import MAX_ID, Blueprint
from app.api.context import container

blp = Blueprint("catalog", __name__, url_prefix="/api/products",
                description="Products, categories and variants. Reads are public; writes need the admin key.")

WRITE = {"security": [{"bearer": []}]}
ID = f"int(min=1, max={MAX_ID})"


def _not_found(what: str):
    return blp.alt_response(404, description=f"Unknown {what} (`not_found`)")


# --- categories (registered first; the literal paths never match the integer converter anyway) ---

@blp.route("/categories/")
class Categories(MethodView):
    @blp.arguments(sch.page_args, location="query")
    @blp.response(200, sch.category_page)
    def get(self, args):
        """List categories"""
        return container().catalog.list_categories(**args)

    @blp.doc(**WRITE)
    @blp.arguments(sch.category_schema)
    @blp.response(201, sch.category_schema)
    @_not_found("parent category")
    def post(self, data):
        """Create a category"""
        return container().catalog.create_category(data)


@blp.route(f"/categories/<{ID}:category_id>/")
class CategoryById(MethodView):
    @blp.response(200, sch.category_schema)
    @_not_found("category")
    def get(self, category_id):
        """Get a category"""
        return container().catalog.get_category(category_id)

    @blp.doc(**WRITE)
    @blp.arguments(sch.category_schema)
    @blp.response(200, sch.category_schema)
    @_not_found("category or parent category")
    def put(self, data, category_id):
        """Replace a category (a category cannot be its own ancestor)"""
        return container().catalog.update_category(category_id, data)

    @blp.doc(**WRITE)
    @blp.response(204)
    @_not_found("category")
    def delete(self, category_id):
        """Delete a category; its children become top-level and its products uncategorised"""
        container().catalog.delete_category(category_id)


# --- variants --------------------------------------------------------------------------------

@blp.route("/variants/")
class Variants(MethodView):
    @blp.arguments(sch.variant_list_args, location="query")
    @blp.response(200, sch.variant_page)
    def get(self, args):
        """List variants, optionally of one product"""
        return container().catalog.list_variants(**args)

    @blp.doc(**WRITE)
    @blp.arguments(sch.variant_create_schema)
    @blp.response(201, sch.variant_schema)
    @_not_found("product")
    @blp.alt_response(409, description="The SKU is taken (`duplicate_sku`)")
    def post(self, data):
        """Create a variant with its initial stock"""
        return container().catalog.create_variant(data, actor=actor())


@blp.route(f"/variants/<{ID}:variant_id>/")
class VariantById(MethodView):
    @blp.response(200, sch.variant_schema)
    @_not_found("variant")
    def get(self, variant_id):
        """Get a variant"""
        return container().catalog.get_variant(variant_id)

    @blp.doc(**WRITE)
    @blp.arguments(sch.variant_schema)
    @blp.response(200, sch.variant_schema)
    @_not_found("variant or product")
    @blp.alt_response(409, description="The SKU is taken (`duplicate_sku`)")
    def put(self, data, variant_id):
        """Replace a variant; stock is changed only through the inventory API"""
        return container().catalog.update_variant(variant_id, data)

    @blp.doc(**WRITE)
    @blp.arguments(sch.variant_patch_schema)
    @blp.response(200, sch.variant_schema)
    @_not_found("variant or product")
    @blp.alt_response(409, description="The SKU is taken (`duplicate_sku`)")
    def patch(self, data, variant_id):
        """Change some fields of a variant; stock is changed only through the inventory API"""
        return container().catalog.update_variant(variant_id, data)

    @blp.doc(**WRITE)
    @blp.response(204)
    @_not_found("variant")
    @blp.alt_response(409, description="The variant is held in a cart (`variant_has_active_holds`)")
    def delete(self, variant_id):
        """Delete a variant and its stock row"""
        container().catalog.delete_variant(variant_id)


# --- products --------------------------------------------------------------------------------

@blp.route("/")
class Products(MethodView):
    @blp.arguments(sch.product_list_args, location="query")
    @blp.response(200, sch.product_page)
    def get(self, args):
        """List products, optionally by category and status"""
        return container().catalog.list_products(**args)

    @blp.doc(**WRITE)
    @blp.arguments(sch.product_schema)
    @blp.response(201, sch.product_detail_schema)
    @_not_found("category")
    def post(self, data):
        """Create a product"""
        return container().catalog.create_product(data)


@blp.route(f"/<{ID}:product_id>/")
class ProductById(MethodView):
    @blp.response(200, sch.product_detail_schema)
    @_not_found("product")
    def get(self, product_id):
        """Get a product with its variants"""
        return container().catalog.get_product(product_id)

    @blp.doc(**WRITE)
    @blp.arguments(sch.product_schema)
    @blp.response(200, sch.product_detail_schema)
    @_not_found("product or category")
    def put(self, data, product_id):
        """Replace a product (fields left out take their defaults)"""
        return container().catalog.update_product(product_id, data)

    @blp.doc(**WRITE)
    @blp.arguments(sch.product_patch_schema)
    @blp.response(200, sch.product_detail_schema)
    @_not_found("product or category")
    def patch(self, data, product_id):
        """Change some fields of a product"""
        return container().catalog.update_product(product_id, data)

    @blp.doc(**WRITE)
    @blp.response(204)
    @_not_found("product")
    @blp.alt_response(409, description="A variant is held in a cart (`product_has_active_holds`)")
    def delete(self, product_id):
        """Delete a product with its variants and their stock rows"""
        container().catalog.delete_product(product_id)
