"""Catalog API refusals: bad input, unknown ids and missing rights are 4xx and never write anything."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
from sqlalchemy import select

from app import keys
from persistence.models import Category, Product, Stock, StockMovement, Variant

TABLES = (Category, Product, Variant, Stock, StockMovement)
JSON = "application/json"


def snapshot(sessions) -> dict:
    """Every catalog row, column by column: equal snapshots mean nothing was written."""
    with sessions() as s:
        return {
            model.__tablename__: sorted(
                tuple(repr(getattr(row, column.key)) for column in model.__table__.columns)
                for row in s.scalars(select(model))
            )
            for model in TABLES
        }


@pytest.fixture
def nothing_written(sessions, redis_client):
    @contextmanager
    def check():
        before = snapshot(sessions), redis_client.get(keys.catalog_version())
        yield
        assert (snapshot(sessions), redis_client.get(keys.catalog_version())) == before

    return check


@pytest.fixture
def rows(client):
    """A category, a product in it and a variant with stock, so refused writes have something to spoil."""
    def create(path, body):
        response = client.post(path, json=body)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    category = create("/api/products/categories/", {"name": "Laptops"})
    product = create("/api/products/", {"name": "Aero", "base_price": "500.00", "description": "d",
                                        "category_id": category["id"]})
    variant = create("/api/products/variants/", {"product_id": product["id"], "sku": "AERO-8GB",
                                                 "attributes": {"memory": "8GB"}, "on_hand": 5})
    return {"category": category, "product": product, "variant": variant}


def assert_validation_error(response, field: str | None = None) -> dict:
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"]
    if field is not None:
        assert field in error["details"], error["details"]
    return error


# --- field validation -------------------------------------------------------------------------

VALID_PRODUCT = {"name": "Aero 15", "base_price": "10.00"}
LEFT_OUT = "<left out>"

BAD_PRODUCTS = [
    ({"name": LEFT_OUT}, "name"),
    ({"base_price": LEFT_OUT}, "base_price"),
    ({"name": 123}, "name"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": None}, "name"),
    ({"name": "P", "base_price": None}, "base_price"),
    ({"name": "P", "base_price": "-1.00"}, "base_price"),
    ({"name": "P", "base_price": -1}, "base_price"),
    ({"name": "P", "base_price": "1.234"}, "base_price"),
    ({"name": "P", "base_price": 1.234}, "base_price"),
    ({"name": "P", "base_price": "NaN"}, "base_price"),
    ({"name": "P", "base_price": "Infinity"}, "base_price"),
    ({"name": "P", "base_price": "ten"}, "base_price"),
    ({"name": "P", "base_price": True}, "base_price"),
    ({"name": "P", "base_price": "10000000000.00"}, "base_price"),
    ({"description": 5}, "description"),
    ({"description": "x" * 10_001}, "description"),
    ({"status": "deleted"}, "status"),
    ({"status": 1}, "status"),
    ({"category_id": "2"}, "category_id"),
    ({"category_id": 2.0}, "category_id"),
    ({"category_id": True}, "category_id"),
    ({"category_id": 0}, "category_id"),
    ({"category_id": 2**31}, "category_id"),
    ({"colour": "red"}, "colour"),
    ({"id": 7}, "id"),
    ({"variants": []}, "variants"),
    ({"created_at": "2026-01-01T00:00:00Z"}, "created_at"),
]


def _product_body(change: dict) -> dict:
    return {k: v for k, v in {**VALID_PRODUCT, **change}.items() if v != LEFT_OUT}


@pytest.mark.parametrize("change, field", BAD_PRODUCTS, ids=[f"{f}={str(c)[:30]}" for c, f in BAD_PRODUCTS])
def test_creating_a_product_with_a_bad_field_is_a_validation_error(client, rows, nothing_written,
                                                                   change, field):
    body = _product_body(change)
    with nothing_written():
        response = client.post("/api/products/", json=body)
    assert_validation_error(response, field)


def test_a_product_without_a_price_is_a_validation_error_naming_it(client, rows, nothing_written):
    with nothing_written():
        response = client.post("/api/products/", json={"name": "P"})
    error = assert_validation_error(response, "base_price")
    assert list(error["details"]) == ["base_price"]


def test_every_bad_field_is_named_at_once(client, rows, nothing_written):
    with nothing_written():
        response = client.post("/api/products/", json={"name": 1, "base_price": "-1", "extra": True})
    assert set(assert_validation_error(response)["details"]) == {"name", "base_price", "extra"}


@pytest.mark.parametrize("method", ["put", "patch"])
@pytest.mark.parametrize("change, field", [
    ({"base_price": "1.005"}, "base_price"),
    ({"status": "gone"}, "status"),
    ({"category_id": "1"}, "category_id"),
    ({"id": 1}, "id"),
    ({"variants": [{"sku": "X"}]}, "variants"),
])
def test_updating_a_product_with_a_bad_field_is_a_validation_error(client, rows, nothing_written,
                                                                   method, change, field):
    path = f"/api/products/{rows['product']['id']}/"
    with nothing_written():
        response = getattr(client, method)(path, json={**VALID_PRODUCT, **change})
    assert_validation_error(response, field)


def test_putting_a_product_needs_every_required_field(client, rows, nothing_written):
    with nothing_written():
        response = client.put(f"/api/products/{rows['product']['id']}/", json={"name": "Only a name"})
    assert_validation_error(response, "base_price")


BAD_VARIANTS = [
    ({"product_id": "1"}, "product_id"),
    ({"product_id": None}, "product_id"),
    ({"product_id": -1}, "product_id"),
    ({"sku": ""}, "sku"),
    ({"sku": "has space"}, "sku"),
    ({"sku": "x" * 65}, "sku"),
    ({"sku": "ünïcode"}, "sku"),
    ({"sku": "a/b"}, "sku"),
    ({"sku": "ABC\n"}, "sku"),
    ({"sku": 12}, "sku"),
    ({"attributes": ["memory"]}, "attributes"),
    ({"attributes": "memory=8GB"}, "attributes"),
    ({"attributes": {"nested": {"a": 1}}}, "attributes"),
    ({"attributes": {"list": [1, 2]}}, "attributes"),
    ({"attributes": {f"k{i}": i for i in range(33)}}, "attributes"),
    ({"attributes": {"k" * 65: "v"}}, "attributes"),
    ({"attributes": {"": "v"}}, "attributes"),
    ({"attributes": {"long": "v" * 501}}, "attributes"),
    ({"attributes": {"big": 2**60}}, "attributes"),
    ({"price_adjustment": "1.001"}, "price_adjustment"),
    ({"price_adjustment": "-10000000000.00"}, "price_adjustment"),
    ({"price_adjustment": "NaN"}, "price_adjustment"),
    ({"on_hand": -1}, "on_hand"),
    ({"on_hand": "5"}, "on_hand"),
    ({"on_hand": 1.5}, "on_hand"),
    ({"on_hand": 5.0}, "on_hand"),
    ({"on_hand": True}, "on_hand"),
    ({"on_hand": 10**10}, "on_hand"),
    ({"stock": 5}, "stock"),
]


@pytest.mark.parametrize("change, field", BAD_VARIANTS, ids=[f"{f}={str(c)[:30]}" for c, f in BAD_VARIANTS])
def test_creating_a_variant_with_a_bad_field_is_a_validation_error(client, rows, nothing_written,
                                                                   change, field):
    body = {"product_id": rows["product"]["id"], "sku": "NEW-1", **change}
    with nothing_written():
        response = client.post("/api/products/variants/", json=body)
    assert_validation_error(response, field)


@pytest.mark.parametrize("missing", ["product_id", "sku"])
def test_creating_a_variant_without_a_required_field_is_a_validation_error(client, rows, nothing_written,
                                                                           missing):
    body = {"product_id": rows["product"]["id"], "sku": "NEW-1"}
    body.pop(missing)
    with nothing_written():
        response = client.post("/api/products/variants/", json=body)
    assert_validation_error(response, missing)


@pytest.mark.parametrize("method", ["put", "patch"])
def test_a_variant_update_may_not_touch_on_hand(client, rows, nothing_written, method):
    variant = rows["variant"]
    body = {"product_id": variant["product_id"], "sku": "AERO-8GB", "on_hand": 50}
    with nothing_written():
        response = getattr(client, method)(f"/api/products/variants/{variant['id']}/", json=body)
    assert_validation_error(response, "on_hand")


@pytest.mark.parametrize("method", ["put", "patch"])
@pytest.mark.parametrize("change, field", [({"sku": "bad sku"}, "sku"), ({"product_id": "1"}, "product_id"),
                                           ({"attributes": {"a": {}}}, "attributes"), ({"id": 1}, "id")])
def test_updating_a_variant_with_a_bad_field_is_a_validation_error(client, rows, nothing_written,
                                                                   method, change, field):
    variant = rows["variant"]
    body = {"product_id": variant["product_id"], "sku": "AERO-8GB", **change}
    with nothing_written():
        response = getattr(client, method)(f"/api/products/variants/{variant['id']}/", json=body)
    assert_validation_error(response, field)


@pytest.mark.parametrize("body, field", [
    ({}, "name"),
    ({"name": 5}, "name"),
    ({"name": ""}, "name"),
    ({"name": "C", "parent_id": "1"}, "parent_id"),
    ({"name": "C", "parent_id": -1}, "parent_id"),
    ({"name": "C", "slug": "c"}, "slug"),
])
def test_a_bad_category_is_a_validation_error(client, rows, nothing_written, body, field):
    with nothing_written():
        created = client.post("/api/products/categories/", json=body)
        replaced = client.put(f"/api/products/categories/{rows['category']['id']}/", json=body)
    assert_validation_error(created, field)
    assert_validation_error(replaced, field)


# --- the body as a whole ----------------------------------------------------------------------

WRITES_WITH_A_BODY = [
    ("post", "/api/products/"),
    ("put", "/api/products/{product}/"),
    ("patch", "/api/products/{product}/"),
    ("post", "/api/products/categories/"),
    ("put", "/api/products/categories/{category}/"),
    ("post", "/api/products/variants/"),
    ("put", "/api/products/variants/{variant}/"),
    ("patch", "/api/products/variants/{variant}/"),
]


def _path(template: str, rows: dict) -> str:
    return template.format(**{kind: row["id"] for kind, row in rows.items()})


@pytest.mark.parametrize("method, template", WRITES_WITH_A_BODY)
@pytest.mark.parametrize("payload", ['{"name": "P", ', "{'name': 'P'}", '{"name": "P", "base_price": NaN}',
                                     '{"name": "P"} trailing', "\xff\xfe"])
def test_malformed_json_is_bad_json(client, rows, nothing_written, method, template, payload):
    with nothing_written():
        response = getattr(client, method)(_path(template, rows), data=payload, content_type=JSON)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "bad_json"


@pytest.mark.parametrize("method, template", WRITES_WITH_A_BODY)
def test_a_body_that_is_not_json_is_415(client, rows, nothing_written, method, template):
    with nothing_written():
        response = getattr(client, method)(_path(template, rows), data="name=P&base_price=1",
                                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("method, template", WRITES_WITH_A_BODY)
@pytest.mark.parametrize("payload", ["[]", '"P"', "5", "null", "true"])
def test_a_json_body_that_is_not_an_object_is_a_validation_error(client, rows, nothing_written,
                                                                 method, template, payload):
    with nothing_written():
        response = getattr(client, method)(_path(template, rows), data=payload, content_type=JSON)
    assert_validation_error(response)


@pytest.mark.parametrize("path", ["/api/products/", "/api/products/categories/", "/api/products/variants/"])
def test_creating_with_no_body_is_a_validation_error(client, rows, nothing_written, path):
    with nothing_written():
        response = client.post(path)
    assert_validation_error(response)


def test_an_oversize_body_is_413(client, rows, nothing_written):
    with nothing_written():
        response = client.post("/api/products/",
                               json={"name": "P", "base_price": "1", "description": "x" * 200_000})
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"


# --- unknown ids in the body ------------------------------------------------------------------

@pytest.mark.parametrize("method, template, body, resource", [
    ("post", "/api/products/", {"name": "P", "base_price": "1", "category_id": 999}, "category"),
    ("put", "/api/products/{product}/", {"name": "P", "base_price": "1", "category_id": 999}, "category"),
    ("patch", "/api/products/{product}/", {"category_id": 999}, "category"),
    ("post", "/api/products/categories/", {"name": "C", "parent_id": 999}, "category"),
    ("put", "/api/products/categories/{category}/", {"name": "C", "parent_id": 999}, "category"),
    ("post", "/api/products/variants/", {"product_id": 999, "sku": "NEW", "on_hand": 3}, "product"),
    ("put", "/api/products/variants/{variant}/", {"product_id": 999, "sku": "NEW"}, "product"),
    ("patch", "/api/products/variants/{variant}/", {"product_id": 999}, "product"),
])
def test_an_unknown_id_in_the_body_is_not_found(client, rows, nothing_written,
                                                method, template, body, resource):
    with nothing_written():
        response = getattr(client, method)(_path(template, rows), json=body)
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["code"] == "not_found"
    assert error["details"] == {"resource": resource, "id": 999}


def test_a_taken_sku_on_a_new_variant_writes_nothing(client, rows, nothing_written):
    with nothing_written():
        response = client.post("/api/products/variants/", json={"product_id": rows["product"]["id"],
                                                                "sku": "AERO-8GB", "on_hand": 10})
    assert response.status_code == 409
    assert response.get_json()["error"]["details"] == {"sku": "AERO-8GB"}


# --- query strings ----------------------------------------------------------------------------

@pytest.mark.parametrize("path, field", [
    ("/api/products/?per_page=501", "per_page"),
    ("/api/products/?per_page=0", "per_page"),
    ("/api/products/?page=0", "page"),
    ("/api/products/?page=abc", "page"),
    ("/api/products/?page=99999999999", "page"),
    ("/api/products/?status=deleted", "status"),
    ("/api/products/?category_id=abc", "category_id"),
    ("/api/products/?category_id=0", "category_id"),
    ("/api/products/categories/?per_page=1000", "per_page"),
    ("/api/products/variants/?product_id=x", "product_id"),
    ("/api/products/variants/?product_id=-3", "product_id"),
])
def test_a_bad_query_parameter_is_a_validation_error(client, rows, path, field):
    assert_validation_error(client.get(path), field)


# --- auth -------------------------------------------------------------------------------------

@pytest.fixture
def secured(auth_env, client):
    """The client of an app with API keys configured (auth_env is applied before the settings exist)."""
    return client


@pytest.fixture
def secured_rows(secured, admin_headers):
    category = secured.post("/api/products/categories/", json={"name": "Laptops"}, headers=admin_headers)
    product = secured.post("/api/products/", json={"name": "Aero", "base_price": "1"}, headers=admin_headers)
    assert product.status_code == 201
    variant = secured.post("/api/products/variants/", headers=admin_headers,
                           json={"product_id": product.get_json()["id"], "sku": "A-1"})
    return {"category": category.get_json(), "product": product.get_json(), "variant": variant.get_json()}


ALL_WRITES = [
    ("post", "/api/products/", {"name": "P", "base_price": "1"}),
    ("put", "/api/products/{product}/", {"name": "P", "base_price": "1"}),
    ("patch", "/api/products/{product}/", {"name": "P"}),
    ("delete", "/api/products/{product}/", None),
    ("post", "/api/products/categories/", {"name": "C"}),
    ("put", "/api/products/categories/{category}/", {"name": "C"}),
    ("delete", "/api/products/categories/{category}/", None),
    ("post", "/api/products/variants/", {"product_id": 1, "sku": "NEW"}),
    ("put", "/api/products/variants/{variant}/", {"product_id": 1, "sku": "NEW"}),
    ("patch", "/api/products/variants/{variant}/", {"sku": "NEW"}),
    ("delete", "/api/products/variants/{variant}/", None),
]


def _send(client, method, path, body, headers):
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return getattr(client, method)(path, **kwargs)


@pytest.mark.parametrize("method, template, body", ALL_WRITES)
def test_a_catalog_write_without_a_key_is_unauthorized(secured, secured_rows, nothing_written,
                                                       method, template, body):
    with nothing_written():
        response = _send(secured, method, _path(template, secured_rows), body, {})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("method, template, body", ALL_WRITES)
def test_a_catalog_write_with_an_unknown_key_is_unauthorized(secured, secured_rows, nothing_written, method,
                                                             template, body):
    with nothing_written():
        response = _send(secured, method, _path(template, secured_rows), body,
                         {"Authorization": "Bearer not-a-real-key-123"})
    assert response.status_code == 401


@pytest.mark.parametrize("method, template, body", ALL_WRITES)
def test_a_catalog_write_with_the_storefront_key_is_forbidden(secured, secured_rows, nothing_written,
                                                              storefront_headers, method, template, body):
    with nothing_written():
        response = _send(secured, method, _path(template, secured_rows), body, storefront_headers)
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("method, template, body", ALL_WRITES)
def test_a_catalog_write_with_the_admin_key_is_allowed(secured, secured_rows, admin_headers,
                                                       method, template, body):
    if body and "product_id" in body:
        body = {**body, "product_id": secured_rows["product"]["id"]}
    response = _send(secured, method, _path(template, secured_rows), body, admin_headers)
    assert response.status_code in (200, 201, 204), response.get_json()


@pytest.mark.parametrize("template", [
    "/api/products/", "/api/products/{product}/",
    "/api/products/categories/", "/api/products/categories/{category}/",
    "/api/products/variants/", "/api/products/variants/{variant}/",
])
def test_catalog_reads_need_no_key(secured, secured_rows, template):
    response = secured.get(_path(template, secured_rows))
    assert response.status_code == 200
    assert response.get_json()


def test_the_admin_is_recorded_as_the_actor_of_initial_stock(secured, secured_rows, admin_headers, sessions):
    body = {"product_id": secured_rows["product"]["id"], "sku": "STOCKED", "on_hand": 3}
    response = secured.post("/api/products/variants/", headers=admin_headers, json=body)
    variant_id = response.get_json()["id"]
    with sessions() as s:
        movement = s.scalars(select(StockMovement).where(StockMovement.variant_id == variant_id)).one()
    assert (movement.actor, movement.kind, movement.delta) == ("admin", "initial", 3)


# --- a row referred to is deleted by another transaction after the check --------------------

def _rows_by_key(sessions) -> dict:
    """Every catalog row by table and primary key, column by column."""
    with sessions() as s:
        return {
            model.__tablename__: {
                tuple(getattr(row, c.key) for c in model.__table__.primary_key.columns):
                    tuple(repr(getattr(row, c.key)) for c in model.__table__.columns)
                for row in s.scalars(select(model))
            }
            for model in TABLES
        }


# (what the request refers to, how the test builds the request from `rows` and two fresh rows)
CONCURRENT_DELETES = {
    "product created in a category": (
        "category", lambda f: ("post", "/api/products/",
                               {"name": "Racer", "base_price": "1.00", "category_id": f["category"]})),
    "variant created for a product": (
        "product", lambda f: ("post", "/api/products/variants/",
                              {"product_id": f["product"], "sku": "RACE-NEW", "on_hand": 3})),
    "category created under a parent": (
        "category", lambda f: ("post", "/api/products/categories/",
                               {"name": "Child", "parent_id": f["category"]})),
    "product moved to a category": (
        "category", lambda f: ("patch", f"/api/products/{f['rows']['product']['id']}/",
                               {"category_id": f["category"]})),
    "variant moved to a product": (
        "product", lambda f: ("patch", f"/api/products/variants/{f['rows']['variant']['id']}/",
                              {"product_id": f["product"]})),
    "category moved under a parent": (
        "category", lambda f: ("put", f"/api/products/categories/{f['rows']['category']['id']}/",
                               {"name": "Laptops", "parent_id": f["category"]})),
}


@pytest.mark.parametrize("case", list(CONCURRENT_DELETES))
def test_a_row_deleted_between_the_check_and_the_write_is_404_and_nothing_is_written(
        client, rows, sessions, redis_client, database_url, monkeypatch, case):
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): no other transaction can delete meanwhile")
    from sqlalchemy import delete

    from app.services import catalog

    victim_kind, build = CONCURRENT_DELETES[case]
    fresh = {
        "category": client.post("/api/products/categories/", json={"name": "Doomed"}).get_json()["id"],
        "product": client.post("/api/products/", json={"name": "Doomed", "base_price": "2.00"}).get_json()["id"],
        "rows": rows,
    }
    model = {"category": Category, "product": Product}[victim_kind]
    victim = fresh[victim_kind]
    method, path, body = build(fresh)

    real_require, deleted = catalog._require, []

    def require_then_lose_the_race(session, checked_model, ident, what):
        real_require(session, checked_model, ident, what)  # the row is there...
        if checked_model is model and ident == victim and not deleted:
            # ...and another transaction deletes it and commits before this one writes.
            with sessions.begin() as other:
                other.execute(delete(model).where(model.id == victim))
            deleted.append(victim)

    monkeypatch.setattr(catalog, "_require", require_then_lose_the_race)
    before, version = _rows_by_key(sessions), redis_client.get(keys.catalog_version())

    response = getattr(client, method)(path, json=body)

    assert deleted == [victim], "the window between the check and the write was not opened"
    assert response.status_code == 404, response.get_json()
    assert response.get_json() == {"error": {
        "code": "not_found", "message": f"{victim_kind} {victim} not found",
        "details": {"resource": victim_kind, "id": victim}}}
    expected = before
    del expected[model.__tablename__][(victim,)]
    assert _rows_by_key(sessions) == expected  # only the other transaction's delete happened
    assert redis_client.get(keys.catalog_version()) == version
