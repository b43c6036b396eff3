"""Every catalog and pricing-rule write moves the catalog version (app.catalog_cache), so no process
keeps pricing or selling from a copy it cached before the write; a refused write leaves it alone."""
from __future__ import annotations

import pytest

from app import catalog_cache

# (resource, method, path, body) in an order where each write has what it refers to; "{category}",
# "{product}", "{variant}" and "{rule}" are the ids the creates answered.
WRITES = [
    ("category", "post", "/api/products/categories/", {"name": "Laptops"}),
    ("category", "put", "/api/products/categories/{category}/", {"name": "Notebooks"}),
    ("product", "post", "/api/products/", {"name": "Aero", "base_price": "500.00", "category_id": "{category}"}),
    ("product", "put", "/api/products/{product}/", {"name": "Aero 15", "base_price": "550.00"}),
    ("product", "patch", "/api/products/{product}/", {"status": "draft"}),
    ("variant", "post", "/api/products/variants/", {"product_id": "{product}", "sku": "AERO-8", "on_hand": 2}),
    ("variant", "put", "/api/products/variants/{variant}/", {"product_id": "{product}", "sku": "AERO-16"}),
    ("variant", "patch", "/api/products/variants/{variant}/", {"price_adjustment": "25.00"}),
    ("rule", "post", "/api/pricing/rules/", {"name": "Bulk", "type": "BULK", "percent": "10", "min_quantity": 5}),
    ("rule", "put", "/api/pricing/rules/{rule}/",
     {"name": "Gold", "type": "USER_TIER", "percent": "5", "tier": "GOLD"}),
    ("rule", "patch", "/api/pricing/rules/{rule}/", {"priority": 3}),
    ("rule", "delete", "/api/pricing/rules/{rule}/", None),
    ("variant", "delete", "/api/products/variants/{variant}/", None),
    ("product", "delete", "/api/products/{product}/", None),
    ("category", "delete", "/api/products/categories/{category}/", None),
]


def _fill(value, ids: dict):
    if isinstance(value, str):
        for name, ident in ids.items():
            if value == "{%s}" % name:
                return ident
            value = value.replace("{%s}" % name, str(ident))
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def test_every_catalog_and_pricing_rule_write_moves_the_catalog_version(client, redis_client):
    ids: dict[str, int] = {}
    seen = set()
    for resource, method, path, body in WRITES:
        before = catalog_cache.read(redis_client)
        kwargs = {} if body is None else {"json": _fill(body, ids)}
        response = getattr(client, method)(_fill(path, ids), **kwargs)
        assert response.status_code in (200, 201, 204), (method, path, response.get_json())
        after = catalog_cache.read(redis_client)
        assert after is not None and (before is None or after > before), (method, path, before, after)
        if method == "post":
            ids[resource] = response.get_json()["id"]
        seen.add((resource, method))
    # every kind of write of every resource was made
    assert seen == {(r, m) for r in ("category", "product", "variant", "rule")
                    for m in ("post", "put", "patch", "delete")} - {("category", "patch")}


@pytest.mark.parametrize("method, path, body", [
    ("post", "/api/products/", {"name": "Orphan", "base_price": "1.00", "category_id": 999}),
    ("post", "/api/products/variants/", {"product_id": 999, "sku": "NOPE"}),
    ("put", "/api/products/categories/999/", {"name": "Nobody"}),
    ("delete", "/api/products/999/", None),
    ("post", "/api/pricing/rules/", {"name": "Lost", "type": "BULK", "percent": "10", "min_quantity": 2,
                                     "product_id": 999}),
    ("patch", "/api/pricing/rules/999/", {"priority": 1}),
])
def test_a_refused_write_leaves_the_catalog_version_alone(client, redis_client, method, path, body):
    catalog_cache.start(redis_client)
    before = catalog_cache.read(redis_client)
    response = getattr(client, method)(path, **({} if body is None else {"json": body}))
    assert response.status_code == 404, response.get_json()
    assert catalog_cache.read(redis_client) == before
