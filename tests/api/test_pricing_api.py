"""Pricing over HTTP (API.md, Pricing) against the real database and Redis."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from app import catalog_cache, keys
from app.composition import Container
from persistence.models import Category, PricingRule, Product, Variant

RULES = "/api/pricing/rules/"
BULK_5 = {"name": "Bulk 5+", "type": "BULK", "priority": 1, "percent": "10.00", "min_quantity": 5}
GOLD = {"name": "Gold tier", "type": "USER_TIER", "priority": 2, "percent": "5.00", "tier": "GOLD"}
API_EXAMPLE = {
    "product_id": 1, "variant_id": 3, "quantity": 10, "user_tier": "GOLD",
    "base_price": "500.00", "variant_adjustment": "50.00", "list_price": "550.00",
    "applied_rules": [{"id": 1, "name": "Bulk 5+", "type": "BULK", "percent": "10.00", "amount": "55.00"},
                      {"id": 2, "name": "Gold tier", "type": "USER_TIER", "percent": "5.00", "amount": "24.75"}],
    "stacking": "multiplicative", "unit_price": "470.25", "line_total": "4702.50", "currency": "USD",
}
EXAMPLE_QUERY = "quantity=10&user_tier=GOLD&variant_id=3&at=2026-12-01T10:00:00Z"


# --- seed data, written straight to the database -----------------------------------------

def add_product(sessions, base_price="500.00", category_id=None, adjustments=("0.00",), name="Television"):
    """A product with variants; returns (product_id, [variant ids])."""
    with sessions.begin() as session:
        product = Product(name=name, base_price=Decimal(base_price), category_id=category_id)
        session.add(product)
        session.flush()
        variants = [Variant(product_id=product.id, sku=f"{name[:8]}-{product.id}-{i}",
                            price_adjustment=Decimal(a)) for i, a in enumerate(adjustments)]
        session.add_all(variants)
        session.flush()
        return product.id, [v.id for v in variants]


def add_category(sessions, name, parent_id=None) -> int:
    with sessions.begin() as session:
        category = Category(name=name, parent_id=parent_id)
        session.add(category)
        session.flush()
        return category.id


@pytest.fixture
def seeded(client, sessions):
    """The data behind API.md's example: product 1 at 500.00, its variant 3 at +50.00, two rules."""
    product_id, variant_ids = add_product(sessions, "500.00", adjustments=("0.00", "10.00", "50.00"))
    assert (product_id, variant_ids[2]) == (1, 3)
    for body in (BULK_5, GOLD):
        assert client.post(RULES, json=body).status_code == 201
    return product_id, variant_ids


def price(client, product_id=1, query=""):
    return client.get(f"/api/pricing/{product_id}/price/?{query}")


def unit_price(client, product_id=1, query="quantity=10&user_tier=GOLD&variant_id=3"):
    response = price(client, product_id, query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["unit_price"]


def rule_count(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(PricingRule))


def rules_state(sessions):
    with sessions() as session:
        return [(r.id, r.name, r.type, r.priority, r.percent, r.min_quantity, r.tier, r.starts_at, r.ends_at,
                 r.product_id, r.category_id, r.active)
                for r in session.scalars(select(PricingRule).order_by(PricingRule.id))]


@pytest.fixture
def nothing_written(sessions, redis_client):
    """Assert, after a bad request, that no rule changed and the catalog version did not move."""
    def snapshot():
        return rules_state(sessions), redis_client.get(keys.catalog_version())

    class Guard:
        def __enter__(self):
            self.before = snapshot()
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                assert snapshot() == self.before, "a refused request changed something"

    return Guard


def assert_error(response, status, code, field=None):
    body = response.get_json()
    assert response.status_code == status, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if field is not None:
        assert field in body["error"]["details"], body
    return body


# --- the price endpoint --------------------------------------------------------------------

def test_price_reproduces_the_api_example_exactly(client, seeded):
    response = price(client, query=EXAMPLE_QUERY)
    assert response.status_code == 200
    assert response.get_json() == API_EXAMPLE
    assert list(json.loads(response.get_data(as_text=True))) == list(API_EXAMPLE)


@pytest.fixture
def additive_env(env):
    env["PRICING_STACKING"] = "additive"
    return env


def test_price_stacks_additively_when_configured(additive_env, client, seeded):
    body = price(client, query=EXAMPLE_QUERY).get_json()
    assert body["stacking"] == "additive"
    assert [r["amount"] for r in body["applied_rules"]] == ["55.00", "27.50"]
    assert (body["unit_price"], body["line_total"]) == ("467.50", "4675.00")


def test_price_defaults_to_one_unit_now_without_variant_or_tier(client, seeded):
    response = client.get("/api/pricing/1/price")
    assert response.status_code == 200
    body = response.get_json()
    assert body == {
        "product_id": 1, "variant_id": None, "quantity": 1, "user_tier": None,
        "base_price": "500.00", "variant_adjustment": "0.00", "list_price": "500.00",
        "applied_rules": [], "stacking": "multiplicative", "unit_price": "500.00", "line_total": "500.00",
        "currency": "USD",
    }


def test_price_takes_the_tier_in_any_case(client, seeded):
    body = price(client, query="quantity=1&user_tier=gold").get_json()
    assert body["user_tier"] == "GOLD"
    assert [r["name"] for r in body["applied_rules"]] == ["Gold tier"]
    assert body["unit_price"] == "475.00"


def test_price_of_an_unknown_product_is_not_found(client, seeded):
    assert_error(price(client, 999), 404, "not_found")
    assert_error(price(client, 2**40), 404, "not_found")


def test_price_of_an_unknown_variant_is_not_found(client, seeded):
    assert_error(price(client, query="variant_id=999"), 404, "not_found")


def test_price_refuses_a_variant_of_another_product(client, sessions, seeded):
    _, (other_variant,) = add_product(sessions, "20.00", name="Radio")
    body = assert_error(price(client, query=f"variant_id={other_variant}"), 400, "validation_error", "variant_id")
    assert body["error"]["details"].keys() == {"variant_id"}


@pytest.mark.parametrize("query, field", [
    ("quantity=0", "quantity"),
    ("quantity=-1", "quantity"),
    ("quantity=1000001", "quantity"),
    ("quantity=abc", "quantity"),
    ("quantity=2.5", "quantity"),
    ("user_tier=not%20a%20tier", "user_tier"),
    ("user_tier=" + "A" * 33, "user_tier"),
    ("user_tier=GOLD%0A", "user_tier"),
    ("variant_id=x", "variant_id"),
    ("variant_id=0", "variant_id"),
    ("at=tomorrow", "at"),
])
def test_price_refuses_bad_query_arguments(client, seeded, query, field):
    assert_error(price(client, query=query), 400, "validation_error", field)


def test_price_accepts_the_largest_quantity(client, seeded):
    body = price(client, query="quantity=1000000").get_json()
    assert body["quantity"] == 1000000
    assert body["line_total"] == "450000000.00"  # 500.00 less 10% bulk


def test_price_applies_a_seasonal_rule_only_inside_its_window(client, seeded):
    response = client.post(RULES, json={"name": "December", "type": "SEASONAL", "priority": 0, "percent": "20",
                                        "starts_at": "2026-12-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z"})
    assert response.status_code == 201
    names = lambda at: [r["name"] for r in price(client, query=f"at={at}").get_json()["applied_rules"]]  # noqa: E731
    assert names("2026-11-30T23:59:59Z") == []
    assert names("2026-12-01T00:00:00Z") == ["December"]
    assert names("2026-12-31T23:59:59Z") == ["December"]
    assert names("2027-01-01T00:00:00Z") == []
    assert names("2026-12-01T01:00:00%2B02:00") == []  # 2026-11-30T23:00Z


def test_price_applies_rules_of_the_product_and_of_its_ancestor_categories(client, sessions):
    root = add_category(sessions, "Electronics")
    child = add_category(sessions, "TVs", parent_id=root)
    elsewhere = add_category(sessions, "Garden")
    product_id, _ = add_product(sessions, "100.00", category_id=child)
    other_id, _ = add_product(sessions, "100.00", category_id=elsewhere, name="Shovel")
    for body in (
        {"name": "Electronics", "type": "BULK", "percent": "10", "min_quantity": 1, "category_id": root},
        {"name": "This TV", "type": "BULK", "percent": "5", "min_quantity": 1, "product_id": product_id},
        {"name": "Garden", "type": "BULK", "percent": "50", "min_quantity": 1, "category_id": elsewhere},
    ):
        assert client.post(RULES, json=body).status_code == 201
    body = price(client, product_id).get_json()
    assert [r["name"] for r in body["applied_rules"]] == ["Electronics", "This TV"]
    assert body["unit_price"] == "85.50"
    assert [r["name"] for r in price(client, other_id).get_json()["applied_rules"]] == ["Garden"]


def test_a_rule_change_is_visible_in_the_very_next_price(client, seeded):
    assert unit_price(client) == "470.25"
    assert client.patch(RULES + "1/", json={"percent": "20"}).status_code == 200
    assert unit_price(client) == "418.00"  # 550 * 0.8 * 0.95
    assert client.patch(RULES + "2/", json={"active": False}).status_code == 200
    assert unit_price(client) == "440.00"
    assert client.post(RULES, json={"name": "Flash", "type": "BULK", "percent": "50", "min_quantity": 1,
                                    "priority": 9}).status_code == 201
    assert unit_price(client) == "220.00"
    assert client.delete(RULES + "1/").status_code == 204
    assert unit_price(client) == "275.00"
    assert client.put(RULES + "3/", json={"name": "Flash", "type": "BULK", "percent": "0",
                                          "min_quantity": 1}).status_code == 200
    assert unit_price(client) == "550.00"


def test_a_rule_written_by_another_process_is_visible_in_the_next_price(client, settings, seeded):
    assert unit_price(client) == "470.25"  # warms this process's cache
    other = Container(settings)
    try:
        other.pricing.update_rule(1, {"percent": Decimal("0")})
    finally:
        other.close()
    assert unit_price(client) == "522.50"


def test_prices_come_from_the_cache_until_the_catalog_version_moves(client, sessions, redis_client, seeded):
    assert unit_price(client, query="") == "500.00"
    with sessions.begin() as session:
        session.get(Product, 1).base_price = Decimal("600.00")
    # Written behind the service's back without a bump: the cached product still answers...
    assert unit_price(client, query="") == "500.00"
    # ...and a bump, as every catalog write makes after its commit, drops it.
    catalog_cache.bump(redis_client)
    assert unit_price(client, query="") == "600.00"


def test_the_cart_can_price_a_line_by_its_variant_alone(client, container, seeded):
    quote = container.pricing.price_variant(3, quantity=10, user_tier="gold")
    assert (quote.product_id, quote.variant_id, str(quote.unit_price)) == (1, 3, "470.25")
    info = container.pricing.variant_info(3)
    assert (info.sku, info.product_id, info.product_status, str(info.price_adjustment)) == (
        "Televisi-1-2", 1, "active", "50.00")


def test_rule_writes_bump_the_catalog_version(client, redis_client, seeded):
    before = int(redis_client.get(keys.catalog_version()))
    assert client.patch(RULES + "1/", json={"priority": 5}).status_code == 200
    assert int(redis_client.get(keys.catalog_version())) == before + 1


# --- rules CRUD: happy paths ---------------------------------------------------------------

def test_create_rule_answers_201_with_the_rule(client):
    response = client.post(RULES, json=BULK_5)
    assert response.status_code == 201
    assert response.get_json() == {
        "id": 1, "name": "Bulk 5+", "type": "BULK", "priority": 1, "percent": "10.00", "min_quantity": 5,
        "tier": None, "starts_at": None, "ends_at": None, "product_id": None, "category_id": None, "active": True,
    }


def test_create_rule_defaults_priority_and_active_and_upper_cases_the_tier(client):
    body = client.post(RULES, json={"name": "Silver", "type": "USER_TIER", "percent": 2.5,
                                    "tier": "silver_plus-1"}).get_json()
    assert (body["priority"], body["active"], body["tier"], body["percent"]) == (0, True, "SILVER_PLUS-1", "2.50")


def test_create_seasonal_rule_round_trips_its_bounds_in_utc(client):
    response = client.post(RULES, json={"name": "Winter", "type": "SEASONAL", "percent": "15",
                                        "starts_at": "2026-12-01T02:00:00+02:00", "ends_at": "2027-01-01T00:00:00"})
    assert response.status_code == 201, response.get_json()
    body = client.get(RULES + f"{response.get_json()['id']}").get_json()
    assert (body["starts_at"], body["ends_at"]) == ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")


def test_create_rule_scoped_to_a_product_or_a_category(client, sessions):
    product_id, _ = add_product(sessions)
    category_id = add_category(sessions, "TVs")
    p = client.post(RULES, json={**BULK_5, "product_id": product_id}).get_json()
    c = client.post(RULES, json={**BULK_5, "category_id": category_id}).get_json()
    assert (p["product_id"], p["category_id"]) == (product_id, None)
    assert (c["product_id"], c["category_id"]) == (None, category_id)


def test_list_rules_is_paginated(client):
    for i in range(3):
        client.post(RULES, json={**BULK_5, "name": f"Bulk {i}"})
    body = client.get(RULES + "?page=2&per_page=2").get_json()
    assert (body["page"], body["per_page"], body["total"]) == (2, 2, 3)
    assert [r["name"] for r in body["items"]] == ["Bulk 2"]
    whole = client.get("/api/pricing/rules").get_json()
    assert (whole["page"], whole["per_page"], whole["total"], len(whole["items"])) == (1, 50, 3, 3)


def test_list_rules_refuses_bad_paging(client):
    assert_error(client.get(RULES + "?per_page=501"), 400, "validation_error", "per_page")
    assert_error(client.get(RULES + "?page=0"), 400, "validation_error", "page")


def test_get_rule_by_id(client, seeded):
    body = client.get(RULES + "2/").get_json()
    assert (body["id"], body["name"], body["tier"]) == (2, "Gold tier", "GOLD")


def test_put_replaces_every_field(client, seeded):
    response = client.put(RULES + "1/", json={"name": "Bulk 10+", "type": "BULK", "percent": "12.5",
                                              "min_quantity": 10})
    assert response.status_code == 200
    assert response.get_json() == {
        "id": 1, "name": "Bulk 10+", "type": "BULK", "priority": 0, "percent": "12.50", "min_quantity": 10,
        "tier": None, "starts_at": None, "ends_at": None, "product_id": None, "category_id": None, "active": True,
    }


def test_patch_changes_only_the_given_fields(client, seeded):
    body = client.patch(RULES + "2", json={"tier": "platinum", "priority": 7}).get_json()
    assert (body["name"], body["tier"], body["priority"], body["percent"]) == ("Gold tier", "PLATINUM", 7, "5.00")


def test_patch_can_change_the_type_with_its_condition(client, seeded):
    response = client.patch(RULES + "1/", json={"type": "USER_TIER", "min_quantity": None, "tier": "VIP"})
    assert response.status_code == 200, response.get_json()
    assert (response.get_json()["min_quantity"], response.get_json()["tier"]) == (None, "VIP")


def test_delete_rule_answers_204_and_the_rule_is_gone(client, seeded):
    response = client.delete(RULES + "1/")
    assert response.status_code == 204
    assert response.get_data() == b""
    assert_error(client.get(RULES + "1/"), 404, "not_found")


def test_rules_routes_are_not_taken_for_a_product_id(client, seeded):
    assert client.get("/api/pricing/rules/").status_code == 200
    assert_error(client.get("/api/pricing/rules/price/"), 404, "not_found")
    assert_error(client.get("/api/pricing/abc/price/"), 404, "not_found")


# --- rules CRUD: every refusal writes nothing ------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({"type": "BULK", "percent": "10", "min_quantity": 5}, "name"),
    ({**BULK_5, "name": ""}, "name"),
    ({**BULK_5, "name": "   "}, "name"),
    ({**BULK_5, "name": "x" * 201}, "name"),
    ({**BULK_5, "name": 5}, "name"),
    ({"name": "x", "percent": "10", "min_quantity": 5}, "type"),
    ({**BULK_5, "type": "COUPON"}, "type"),
    ({**BULK_5, "type": "bulk"}, "type"),
    ({"name": "x", "type": "BULK", "min_quantity": 5}, "percent"),
    ({**BULK_5, "percent": "100.01"}, "percent"),
    ({**BULK_5, "percent": "-1"}, "percent"),
    ({**BULK_5, "percent": "10.001"}, "percent"),
    ({**BULK_5, "percent": 10.001}, "percent"),
    ({**BULK_5, "percent": "ten"}, "percent"),
    ({**BULK_5, "percent": "NaN"}, "percent"),
    ({**BULK_5, "percent": True}, "percent"),
    ({**BULK_5, "percent": None}, "percent"),
    ({**BULK_5, "priority": "1"}, "priority"),
    ({**BULK_5, "priority": 1.5}, "priority"),
    ({**BULK_5, "active": "yes"}, "active"),
    ({**BULK_5, "active": 1}, "active"),
    ({**BULK_5, "min_quantity": None}, "min_quantity"),
    ({**BULK_5, "min_quantity": 0}, "min_quantity"),
    ({**BULK_5, "min_quantity": "5"}, "min_quantity"),
    ({**BULK_5, "min_quantity": 1_000_001}, "min_quantity"),
    ({"name": "Gold", "type": "BULK", "percent": "10"}, "min_quantity"),
    ({**BULK_5, "tier": "GOLD"}, "tier"),
    ({**GOLD, "tier": None}, "tier"),
    ({**GOLD, "tier": ""}, "tier"),
    ({**GOLD, "tier": "gold tier"}, "tier"),
    ({**GOLD, "tier": "G" * 33}, "tier"),
    ({**GOLD, "tier": "GOLD\n"}, "tier"),
    ({"name": "Season", "type": "SEASONAL", "percent": "10"}, "starts_at"),
    ({"name": "Season", "type": "SEASONAL", "percent": "10", "starts_at": "2026-12-01T00:00:00Z",
      "ends_at": "2026-12-01T00:00:00Z"}, "ends_at"),
    ({"name": "Season", "type": "SEASONAL", "percent": "10", "starts_at": "2027-01-01T00:00:00Z",
      "ends_at": "2026-12-01T00:00:00Z"}, "ends_at"),
    ({"name": "Season", "type": "SEASONAL", "percent": "10", "starts_at": "December"}, "starts_at"),
    ({**BULK_5, "starts_at": "2026-12-01T00:00:00Z"}, "starts_at"),
    ({**BULK_5, "product_id": 1, "category_id": 1}, "category_id"),
    ({**BULK_5, "product_id": "1"}, "product_id"),
    ({**BULK_5, "product_id": 0}, "product_id"),
    ({**BULK_5, "category_id": 2**31}, "category_id"),
    ({**BULK_5, "discount": "5"}, "discount"),
    ({**BULK_5, "id": 7}, "id"),
])
def test_create_rule_refuses_bad_fields(client, sessions, nothing_written, body, field):
    add_product(sessions)
    add_category(sessions, "TVs")
    with nothing_written():
        assert_error(client.post(RULES, json=body), 400, "validation_error", field)


@pytest.mark.parametrize("scope", ["product_id", "category_id"])
def test_create_rule_with_an_unknown_scope_is_not_found(client, nothing_written, scope):
    with nothing_written():
        body = assert_error(client.post(RULES, json={**BULK_5, scope: 42}), 404, "not_found")
    assert body["error"]["details"]["id"] == 42


def test_create_rule_refuses_malformed_json_and_other_bodies(client, nothing_written):
    with nothing_written():
        assert_error(client.post(RULES, data="{not json", content_type="application/json"), 400, "bad_json")
        assert_error(client.post(RULES, json=[BULK_5]), 400, "validation_error")
        assert_error(client.post(RULES, json="BULK"), 400, "validation_error")
        form = client.post(RULES, data="name=x", content_type="application/x-www-form-urlencoded")
        assert_error(form, 415, "unsupported_media_type")
        assert_error(client.post(RULES), 400, "validation_error", "name")


def test_put_refuses_bad_fields_and_leaves_the_rule(client, seeded, nothing_written):
    with nothing_written():
        no_type = {"name": "No type", "percent": "5"}
        assert_error(client.put(RULES + "1/", json=no_type), 400, "validation_error", "type")
        assert_error(client.put(RULES + "1/", json={**BULK_5, "min_quantity": None}), 400, "validation_error",
                     "min_quantity")
        assert_error(client.put(RULES + "1/", json={**BULK_5, "product_id": 99}), 404, "not_found")


def test_patch_refuses_a_change_that_leaves_an_unsound_rule(client, seeded, nothing_written):
    with nothing_written():
        # A BULK rule turned USER_TIER still has its min_quantity and lacks a tier.
        body = assert_error(client.patch(RULES + "1/", json={"type": "USER_TIER"}), 400, "validation_error")
        assert set(body["error"]["details"]) == {"min_quantity", "tier"}
        assert_error(client.patch(RULES + "1/", json={"percent": "101"}), 400, "validation_error", "percent")
        assert_error(client.patch(RULES + "1/", json={"name": None}), 400, "validation_error", "name")
        assert_error(client.patch(RULES + "1/", json={"category_id": 77}), 404, "not_found")
        assert_error(client.patch(RULES + "1/", json={"colour": "red"}), 400, "validation_error", "colour")


@pytest.mark.parametrize("rule_id", [99, 0, 2**31, 2**40])
def test_unknown_rule_ids_are_not_found(client, seeded, nothing_written, rule_id):
    with nothing_written():
        assert_error(client.get(RULES + f"{rule_id}/"), 404, "not_found")
        assert_error(client.put(RULES + f"{rule_id}/", json=BULK_5), 404, "not_found")
        assert_error(client.patch(RULES + f"{rule_id}/", json={"priority": 3}), 404, "not_found")
        assert_error(client.delete(RULES + f"{rule_id}/"), 404, "not_found")


def test_a_method_not_offered_is_405(client, seeded):
    assert_error(client.delete(RULES), 405, "method_not_allowed")
    assert_error(client.post("/api/pricing/1/price/", json={}), 405, "method_not_allowed")


# --- auth: public reads, admin writes ------------------------------------------------------

def test_reads_are_public_and_writes_need_the_admin_key(auth_env, client, sessions, nothing_written,
                                                        admin_headers, storefront_headers):
    add_product(sessions, "500.00", adjustments=("0.00", "10.00", "50.00"))
    assert client.post(RULES, json=BULK_5, headers=admin_headers).status_code == 201
    assert client.get(RULES).status_code == 200
    assert client.get(RULES + "1/").status_code == 200
    assert client.get("/api/pricing/1/price/?quantity=5").get_json()["unit_price"] == "450.00"
    writes = [
        ("post", RULES, BULK_5),
        ("put", RULES + "1/", BULK_5),
        ("patch", RULES + "1/", {"priority": 4}),
        ("delete", RULES + "1/", None),
    ]
    with nothing_written():
        for method, path, body in writes:
            call = getattr(client, method)
            assert_error(call(path, json=body), 401, "unauthorized")
            assert_error(call(path, json=body, headers={"Authorization": "Bearer wrong-key-123"}), 401, "unauthorized")
            assert_error(call(path, json=body, headers=storefront_headers), 403, "forbidden")
    assert client.patch(RULES + "1/", json={"priority": 4}, headers=admin_headers).status_code == 200
    assert client.delete(RULES + "1/", headers=admin_headers).status_code == 204


def test_openapi_documents_the_pricing_routes_and_their_security(client):
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    assert {"/api/pricing/{product_id}/price/", "/api/pricing/rules/", "/api/pricing/rules/{rule_id}/"} <= set(paths)
    assert paths["/api/pricing/rules/"]["post"]["security"] == [{"bearer": []}]
    for method in ("put", "patch", "delete"):
        assert paths["/api/pricing/rules/{rule_id}/"][method]["security"] == [{"bearer": []}]
    assert "security" not in paths["/api/pricing/rules/"]["get"]
    query = {p["name"] for p in paths["/api/pricing/{product_id}/price/"]["get"]["parameters"]}
    assert {"quantity", "user_tier", "variant_id", "at"} <= query


# --- what a rule refers to is deleted by another transaction after the check ---------------

@pytest.mark.parametrize("scope", ["product_id", "category_id"])
def test_a_rule_whose_scope_is_deleted_after_the_check_is_404_and_nothing_is_written(
        client, sessions, redis_client, database_url, monkeypatch, scope):
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): no other transaction can delete meanwhile")
    from sqlalchemy import delete

    from app.services import pricing as pricing_service

    model = {"product_id": Product, "category_id": Category}[scope]
    victim = add_product(sessions)[0] if scope == "product_id" else add_category(sessions, "Doomed")
    catalog_cache.start(redis_client)
    real_check, deleted = pricing_service._check_rule, []

    def check_then_lose_the_race(session, values):
        real_check(session, values)  # the product or category is there...
        if not deleted:
            # ...and another transaction deletes it and commits before this one writes.
            with sessions.begin() as other:
                other.execute(delete(model).where(model.id == victim))
            deleted.append(victim)

    monkeypatch.setattr(pricing_service, "_check_rule", check_then_lose_the_race)
    with nothing_written_guard(sessions, redis_client):
        response = client.post(RULES, json={**BULK_5, scope: victim})
    assert deleted == [victim], "the window between the check and the write was not opened"
    what = scope.removesuffix("_id")
    assert_error(response, 404, "not_found")
    assert response.get_json()["error"]["details"] == {"resource": what, "id": victim}


def test_a_rule_deleted_while_it_is_being_changed_is_404(client, sessions, redis_client, database_url, monkeypatch):
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): no other transaction can delete meanwhile")
    from sqlalchemy import delete

    from app.services import pricing as pricing_service

    rule_id = client.post(RULES, json=BULK_5).get_json()["id"]
    real_check, deleted = pricing_service._check_rule, []

    def check_then_lose_the_race(session, values):
        real_check(session, values)
        if not deleted:
            with sessions.begin() as other:
                other.execute(delete(PricingRule).where(PricingRule.id == rule_id))
            deleted.append(rule_id)

    monkeypatch.setattr(pricing_service, "_check_rule", check_then_lose_the_race)
    with nothing_written_guard(sessions, redis_client):
        response = client.patch(f"{RULES}{rule_id}/", json={"priority": 9})
    assert deleted == [rule_id]
    assert_error(response, 404, "not_found")
    assert response.get_json()["error"]["details"] == {"resource": "pricing rule", "id": rule_id}


class nothing_written_guard:
    """No rule changed (beyond the other transaction's delete) and the catalog version did not move."""

    def __init__(self, sessions, redis_client):
        self.sessions, self.redis = sessions, redis_client

    def __enter__(self):
        self.rules, self.version = rules_state(self.sessions), catalog_cache.read(self.redis)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            after = rules_state(self.sessions)
            assert set(after) <= set(self.rules), "a refused request wrote a rule"
            assert catalog_cache.read(self.redis) == self.version
