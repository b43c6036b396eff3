"""Catalog API (API.md, Catalog): products, categories and variants through the HTTP client."""
from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, update

from app import keys
from persistence.models import Category, Product, Stock, StockMovement, Variant

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
PRODUCT_KEYS = {"id", "name", "description", "base_price", "status", "category_id",
                "created_at", "updated_at"}
VARIANT_KEYS = {"id", "product_id", "sku", "attributes", "price_adjustment", "created_at", "updated_at"}
CATEGORY_KEYS = {"id", "name", "parent_id", "created_at", "updated_at"}


# --- helpers ----------------------------------------------------------------------------------

def created(response) -> dict:
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def make_category(client, name="Electronics", **fields) -> dict:
    return created(client.post("/api/products/categories/", json={"name": name, **fields}))


def make_product(client, name="Aero 14", base_price="500.00", **fields) -> dict:
    return created(client.post("/api/products/", json={"name": name, "base_price": base_price, **fields}))


def make_variant(client, product_id: int, sku="AERO-8GB", **fields) -> dict:
    body = {"product_id": product_id, "sku": sku, **fields}
    return created(client.post("/api/products/variants/", json=body))


def catalog_version(redis_client) -> int:
    return int(redis_client.get(keys.catalog_version()) or 0)


class FakeStock:
    """Stands in for the reservation engine: holds are whatever the test says."""

    def __init__(self):
        self.holds: dict[int, int] = {}
        self.forgotten: list[int] = []

    def active_holds(self, variant_ids):
        return {vid: self.holds.get(vid, 0) for vid in variant_ids}

    def forget(self, variant_id):
        self.forgotten.append(variant_id)

    def close(self):
        pass


@pytest.fixture
def stock(container):
    fake = FakeStock()
    container.__dict__["holds"] = fake  # replaces the cached hold engine the catalog asks for
    return fake


# --- products ---------------------------------------------------------------------------------

def test_creating_a_product_answers_201_with_the_product_and_no_variants(client):
    category = make_category(client)
    response = client.post("/api/products/", json={
        "name": "Aero 14", "description": "ultralight", "base_price": "500", "status": "draft",
        "category_id": category["id"]})
    body = created(response)
    assert set(body) == PRODUCT_KEYS | {"variants"}
    assert body["name"] == "Aero 14"
    assert body["description"] == "ultralight"
    assert body["base_price"] == "500.00"
    assert body["status"] == "draft"
    assert body["category_id"] == category["id"]
    assert body["variants"] == []
    assert ISO_Z.match(body["created_at"]) and ISO_Z.match(body["updated_at"])


def test_a_new_product_defaults_to_active_with_no_description_or_category(client):
    body = make_product(client)
    assert (body["status"], body["description"], body["category_id"]) == ("active", "", None)


def test_a_product_is_stored_durably(client, sessions):
    body = make_product(client, base_price="19.99")
    with sessions() as s:
        product = s.get(Product, body["id"])
        assert product.name == "Aero 14"
        assert str(product.base_price) == "19.99"


def test_money_sent_as_a_json_number_comes_back_as_a_two_place_string(client):
    assert make_product(client, base_price=19.9)["base_price"] == "19.90"
    assert make_product(client, name="Whole", base_price=7)["base_price"] == "7.00"


def test_getting_a_product_includes_its_variants_in_id_order(client):
    product = make_product(client)
    first = make_variant(client, product["id"], sku="A-1")
    second = make_variant(client, product["id"], sku="A-2")
    response = client.get(f"/api/products/{product['id']}/")
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == PRODUCT_KEYS | {"variants"}
    assert [v["id"] for v in body["variants"]] == [first["id"], second["id"]]
    assert set(body["variants"][0]) == VARIANT_KEYS


def test_listing_products_uses_the_page_envelope_without_variants(client):
    make_product(client, name="One")
    make_product(client, name="Two")
    response = client.get("/api/products/")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["page"], body["per_page"], body["total"]) == (1, 50, 2)
    assert [p["name"] for p in body["items"]] == ["One", "Two"]
    assert set(body["items"][0]) == PRODUCT_KEYS


def test_listing_products_pages_through_all_of_them(client):
    ids = [make_product(client, name=f"P{i}")["id"] for i in range(5)]
    pages = [client.get(f"/api/products/?page={n}&per_page=2").get_json() for n in (1, 2, 3, 4)]
    assert [[p["id"] for p in page["items"]] for page in pages] == [ids[0:2], ids[2:4], ids[4:], []]
    assert {page["total"] for page in pages} == {5}
    assert pages[2]["page"] == 3 and pages[2]["per_page"] == 2


def test_per_page_may_be_as_large_as_500(client):
    make_product(client)
    body = client.get("/api/products/?per_page=500").get_json()
    assert body["per_page"] == 500 and body["total"] == 1


def test_listing_products_filters_by_category_and_status(client):
    laptops = make_category(client, "Laptops")
    phones = make_category(client, "Phones")
    make_product(client, name="L-active", category_id=laptops["id"])
    make_product(client, name="L-draft", category_id=laptops["id"], status="draft")
    make_product(client, name="P-draft", category_id=phones["id"], status="draft")
    make_product(client, name="loose", status="archived")

    def names(query):
        response = client.get(f"/api/products/?{query}")
        assert response.status_code == 200
        return [p["name"] for p in response.get_json()["items"]]

    assert names(f"category_id={laptops['id']}") == ["L-active", "L-draft"]
    assert names("status=draft") == ["L-draft", "P-draft"]
    assert names(f"category_id={laptops['id']}&status=draft") == ["L-draft"]
    assert names("status=archived") == ["loose"]
    assert client.get(f"/api/products/?category_id={phones['id']}").get_json()["total"] == 1


def test_filtering_by_a_category_nobody_uses_gives_an_empty_list(client):
    make_product(client)
    body = client.get("/api/products/?category_id=999").get_json()
    assert body["items"] == [] and body["total"] == 0


def test_putting_a_product_replaces_every_field(client):
    category = make_category(client)
    product = make_product(client, description="old", status="draft", category_id=category["id"])
    response = client.put(f"/api/products/{product['id']}/", json={"name": "Aero 15", "base_price": "650.50"})
    assert response.status_code == 200
    body = response.get_json()
    # A full replacement: fields left out take their defaults.
    assert (body["name"], body["base_price"], body["description"], body["status"], body["category_id"]) == (
        "Aero 15", "650.50", "", "active", None)
    assert client.get(f"/api/products/{product['id']}/").get_json()["name"] == "Aero 15"


def test_patching_a_product_changes_only_the_fields_sent(client):
    category = make_category(client)
    product = make_product(client, description="keep me", category_id=category["id"])
    response = client.patch(f"/api/products/{product['id']}/", json={"status": "archived"})
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "archived"
    assert body["description"] == "keep me"
    assert (body["category_id"], body["base_price"]) == (category["id"], "500.00")


def test_patching_a_product_may_clear_its_category(client):
    category = make_category(client)
    product = make_product(client, category_id=category["id"])
    response = client.patch(f"/api/products/{product['id']}/", json={"category_id": None})
    assert response.status_code == 200
    assert response.get_json()["category_id"] is None


def test_an_update_moves_updated_at_but_not_created_at(client, sessions):
    product = make_product(client)
    long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)
    with sessions.begin() as s:
        s.execute(update(Product).where(Product.id == product["id"])
                  .values(created_at=long_ago, updated_at=long_ago))
    body = client.patch(f"/api/products/{product['id']}/", json={"name": "Renamed"}).get_json()
    assert body["created_at"] == "2020-01-01T00:00:00Z"
    assert body["updated_at"] > "2021"


def test_deleting_a_product_removes_its_variants_and_stock_but_keeps_the_ledger(client, sessions, stock):
    product = make_product(client)
    v1 = make_variant(client, product["id"], sku="A-1", on_hand=5)
    v2 = make_variant(client, product["id"], sku="A-2")
    other = make_variant(client, make_product(client, name="Other")["id"], sku="B-1")

    response = client.delete(f"/api/products/{product['id']}/")

    assert response.status_code == 204
    assert response.data == b""
    assert client.get(f"/api/products/{product['id']}/").status_code == 404
    assert client.get(f"/api/products/variants/{v1['id']}/").status_code == 404
    with sessions() as s:
        assert s.scalars(select(Variant.id)).all() == [other["id"]]
        assert s.scalars(select(Stock.variant_id)).all() == [other["id"]]
        assert s.scalars(select(StockMovement.variant_id)).all() == [v1["id"]]
    assert sorted(stock.forgotten) == sorted([v1["id"], v2["id"]])


def test_deleting_a_product_with_an_active_hold_is_a_conflict(client, sessions, stock, redis_client):
    product = make_product(client)
    free = make_variant(client, product["id"], sku="A-1")
    held = make_variant(client, product["id"], sku="A-2")
    stock.holds[held["id"]] = 2
    version = catalog_version(redis_client)

    response = client.delete(f"/api/products/{product['id']}/")

    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "product_has_active_holds"
    assert error["details"] == {"active_holds": {str(held["id"]): 2}}
    with sessions() as s:
        assert s.get(Product, product["id"]) is not None
        assert sorted(s.scalars(select(Variant.id))) == sorted([free["id"], held["id"]])
    assert stock.forgotten == []
    assert catalog_version(redis_client) == version


def test_a_product_can_be_deleted_once_its_holds_are_gone(client, stock):
    product = make_product(client)
    variant = make_variant(client, product["id"])
    stock.holds[variant["id"]] = 1
    assert client.delete(f"/api/products/{product['id']}/").status_code == 409
    stock.holds.clear()
    assert client.delete(f"/api/products/{product['id']}/").status_code == 204


def test_a_product_held_through_the_real_engine_cannot_be_deleted_until_released(client, container,
                                                                                 redis_client):
    product = make_product(client)
    variant = make_variant(client, product["id"], on_hand=5)
    reservation = container.holds.reserve(variant["id"], "101", 2)

    response = client.delete(f"/api/products/{product['id']}/")
    assert response.status_code == 409
    assert response.get_json()["error"]["details"] == {"active_holds": {str(variant["id"]): 1}}

    container.holds.release(variant["id"], reservation.hold_id)
    assert redis_client.exists(keys.stock(variant["id"]))
    assert client.delete(f"/api/products/{product['id']}/").status_code == 204
    assert client.get("/api/products/").get_json()["total"] == 0
    assert not redis_client.exists(keys.stock(variant["id"]))  # forgotten after the commit


# --- categories -------------------------------------------------------------------------------

def test_creating_a_category_answers_201_with_the_category(client):
    body = make_category(client, "Electronics")
    assert set(body) == CATEGORY_KEYS
    assert (body["name"], body["parent_id"]) == ("Electronics", None)
    assert ISO_Z.match(body["created_at"])


def test_a_category_can_have_a_parent(client):
    parent = make_category(client, "Electronics")
    child = make_category(client, "Laptops", parent_id=parent["id"])
    assert child["parent_id"] == parent["id"]


def test_listing_categories_uses_the_page_envelope(client):
    ids = [make_category(client, f"C{i}")["id"] for i in range(3)]
    body = client.get("/api/products/categories/?per_page=2").get_json()
    assert [c["id"] for c in body["items"]] == ids[:2]
    assert (body["page"], body["per_page"], body["total"]) == (1, 2, 3)
    assert client.get("/api/products/categories/?page=2&per_page=2").get_json()["items"][0]["id"] == ids[2]


def test_getting_a_category_by_id(client):
    category = make_category(client, "Home")
    response = client.get(f"/api/products/categories/{category['id']}/")
    assert response.status_code == 200
    assert response.get_json() == category


def test_putting_a_category_renames_and_moves_it(client):
    a = make_category(client, "A")
    b = make_category(client, "B")
    response = client.put(f"/api/products/categories/{b['id']}/", json={"name": "B2", "parent_id": a["id"]})
    assert response.status_code == 200
    assert (response.get_json()["name"], response.get_json()["parent_id"]) == ("B2", a["id"])
    # PUT is a full replacement: leaving parent_id out makes it top-level again.
    again = client.put(f"/api/products/categories/{b['id']}/", json={"name": "B3"}).get_json()
    assert again["parent_id"] is None


def test_a_category_cannot_be_its_own_parent(client, sessions):
    category = make_category(client)
    response = client.put(f"/api/products/categories/{category['id']}/",
                          json={"name": "Loop", "parent_id": category["id"]})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "validation_error"
    assert "parent_id" in response.get_json()["error"]["details"]
    with sessions() as s:
        assert s.get(Category, category["id"]).parent_id is None


def test_a_category_cannot_become_a_descendant_of_its_own_child(client, sessions):
    top = make_category(client, "Top")
    middle = make_category(client, "Middle", parent_id=top["id"])
    bottom = make_category(client, "Bottom", parent_id=middle["id"])
    response = client.put(f"/api/products/categories/{top['id']}/",
                          json={"name": "Top", "parent_id": bottom["id"]})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "validation_error"
    with sessions() as s:
        assert s.get(Category, top["id"]).parent_id is None


def test_deleting_a_category_leaves_its_children_and_products_in_place(client, sessions):
    parent = make_category(client, "Parent")
    child = make_category(client, "Child", parent_id=parent["id"])
    product = make_product(client, category_id=parent["id"])

    response = client.delete(f"/api/products/categories/{parent['id']}/")

    assert response.status_code == 204
    assert client.get(f"/api/products/categories/{parent['id']}/").status_code == 404
    assert client.get(f"/api/products/categories/{child['id']}/").get_json()["parent_id"] is None
    assert client.get(f"/api/products/{product['id']}/").get_json()["category_id"] is None
    with sessions() as s:
        assert s.scalars(select(Category.id)).all() == [child["id"]]


# --- variants ---------------------------------------------------------------------------------

def test_creating_a_variant_answers_201_with_the_variant(client):
    product = make_product(client)
    response = client.post("/api/products/variants/", json={
        "product_id": product["id"], "sku": "AERO14-32GB",
        "attributes": {"memory": "32GB", "ssd": 512, "touch": False},
        "price_adjustment": "50", "on_hand": 25})
    body = created(response)
    assert set(body) == VARIANT_KEYS  # on_hand belongs to the inventory API
    assert body["product_id"] == product["id"]
    assert body["sku"] == "AERO14-32GB"
    assert body["attributes"] == {"memory": "32GB", "ssd": 512, "touch": False}
    assert body["price_adjustment"] == "50.00"
    assert ISO_Z.match(body["updated_at"])


def test_a_variant_is_created_with_its_stock_row_and_an_initial_ledger_entry(client, sessions):
    product = make_product(client)
    variant = make_variant(client, product["id"], on_hand=25)
    with sessions() as s:
        row = s.get(Stock, variant["id"])
        assert (row.on_hand, row.version) == (25, 0)
        movements = s.scalars(select(StockMovement)).all()
        assert [(m.variant_id, m.kind, m.delta, m.on_hand_after, m.reason, m.actor) for m in movements] == [
            (variant["id"], "initial", 25, 25, "initial stock", "admin")]


def test_a_variant_without_stock_gets_an_empty_stock_row_and_no_ledger_entry(client, sessions):
    variant = make_variant(client, make_product(client)["id"])
    assert variant["attributes"] == {} and variant["price_adjustment"] == "0.00"
    with sessions() as s:
        assert s.get(Stock, variant["id"]).on_hand == 0
        assert s.scalars(select(StockMovement)).all() == []


def test_a_variant_price_adjustment_may_be_negative(client):
    variant = make_variant(client, make_product(client)["id"], price_adjustment="-5.5")
    assert variant["price_adjustment"] == "-5.50"


def test_creating_a_variant_with_a_taken_sku_is_a_conflict(client, sessions):
    product = make_product(client)
    make_variant(client, product["id"], sku="AERO-8GB", on_hand=3)
    response = client.post("/api/products/variants/", json={"product_id": product["id"], "sku": "AERO-8GB",
                                                            "on_hand": 9})
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "duplicate_sku"
    with sessions() as s:
        assert len(s.scalars(select(Variant)).all()) == 1
        assert [m.delta for m in s.scalars(select(StockMovement))] == [3]


def test_a_sku_taken_by_a_concurrent_writer_is_still_a_conflict(client, sessions, monkeypatch):
    # The explicit check ran before the other writer committed; the unique index catches it.
    from app.services import catalog

    product = make_product(client)
    make_variant(client, product["id"], sku="RACE-1")
    real_check, calls = catalog._check_sku_free, []

    def check_that_runs_too_early(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            real_check(*args, **kwargs)

    monkeypatch.setattr(catalog, "_check_sku_free", check_that_runs_too_early)
    response = client.post("/api/products/variants/", json={"product_id": product["id"], "sku": "RACE-1"})
    assert response.status_code == 409
    assert len(calls) == 2  # the second call explained the IntegrityError
    assert response.get_json()["error"]["code"] == "duplicate_sku"
    with sessions() as s:
        assert len(s.scalars(select(Stock)).all()) == 1


def test_skus_are_case_sensitive(client):
    product = make_product(client)
    make_variant(client, product["id"], sku="abc")
    assert make_variant(client, product["id"], sku="ABC")["sku"] == "ABC"


def test_listing_variants_filters_by_product_and_pages(client):
    one = make_product(client, name="One")
    two = make_product(client, name="Two")
    a = make_variant(client, one["id"], sku="A")
    b = make_variant(client, two["id"], sku="B")
    c = make_variant(client, one["id"], sku="C")

    everything = client.get("/api/products/variants/").get_json()
    assert [v["id"] for v in everything["items"]] == [a["id"], b["id"], c["id"]]
    assert everything["total"] == 3 and set(everything["items"][0]) == VARIANT_KEYS

    of_one = client.get(f"/api/products/variants/?product_id={one['id']}").get_json()
    assert [v["sku"] for v in of_one["items"]] == ["A", "C"] and of_one["total"] == 2

    second_page = client.get(f"/api/products/variants/?product_id={one['id']}&per_page=1&page=2").get_json()
    assert [v["sku"] for v in second_page["items"]] == ["C"]
    assert (second_page["page"], second_page["per_page"], second_page["total"]) == (2, 1, 2)


def test_getting_a_variant_by_id(client):
    variant = make_variant(client, make_product(client)["id"], attributes={"size": "M"})
    response = client.get(f"/api/products/variants/{variant['id']}/")
    assert response.status_code == 200
    assert response.get_json() == variant


def test_putting_a_variant_replaces_its_fields_but_not_its_stock(client, sessions):
    first = make_product(client, name="First")
    second = make_product(client, name="Second")
    variant = make_variant(client, first["id"], sku="OLD", attributes={"size": "M"}, price_adjustment="2.00",
                           on_hand=4)
    response = client.put(f"/api/products/variants/{variant['id']}/",
                          json={"product_id": second["id"], "sku": "NEW"})
    assert response.status_code == 200
    body = response.get_json()
    assert (body["product_id"], body["sku"], body["attributes"], body["price_adjustment"]) == (
        second["id"], "NEW", {}, "0.00")
    with sessions() as s:
        assert s.get(Stock, variant["id"]).on_hand == 4


def test_putting_a_variant_may_keep_its_own_sku(client):
    product = make_product(client)
    variant = make_variant(client, product["id"], sku="SAME")
    response = client.put(f"/api/products/variants/{variant['id']}/",
                          json={"product_id": product["id"], "sku": "SAME", "price_adjustment": "1.00"})
    assert response.status_code == 200
    assert response.get_json()["price_adjustment"] == "1.00"


def test_patching_a_variant_changes_only_the_fields_sent(client):
    product = make_product(client)
    variant = make_variant(client, product["id"], sku="KEEP", price_adjustment="3.00")
    response = client.patch(f"/api/products/variants/{variant['id']}/", json={"attributes": {"color": "red"}})
    assert response.status_code == 200
    body = response.get_json()
    assert (body["sku"], body["price_adjustment"], body["attributes"]) == ("KEEP", "3.00", {"color": "red"})


def test_changing_a_variant_to_a_taken_sku_is_a_conflict(client, sessions):
    product = make_product(client)
    make_variant(client, product["id"], sku="TAKEN")
    mine = make_variant(client, product["id"], sku="MINE")
    for method in (client.patch, client.put):
        response = method(f"/api/products/variants/{mine['id']}/",
                          json={"product_id": product["id"], "sku": "TAKEN"})
        assert response.status_code == 409
        assert response.get_json()["error"]["code"] == "duplicate_sku"
    with sessions() as s:
        assert s.get(Variant, mine["id"]).sku == "MINE"


def test_deleting_a_variant_removes_it_and_its_stock_row(client, sessions, stock):
    product = make_product(client)
    variant = make_variant(client, product["id"], on_hand=2)
    response = client.delete(f"/api/products/variants/{variant['id']}/")
    assert response.status_code == 204
    assert client.get(f"/api/products/variants/{variant['id']}/").status_code == 404
    assert client.get(f"/api/products/{product['id']}/").get_json()["variants"] == []
    with sessions() as s:
        assert s.get(Stock, variant["id"]) is None
        assert len(s.scalars(select(StockMovement)).all()) == 1
    assert stock.forgotten == [variant["id"]]


def test_deleting_a_variant_with_an_active_hold_is_a_conflict(client, sessions, stock):
    variant = make_variant(client, make_product(client)["id"])
    stock.holds[variant["id"]] = 1
    response = client.delete(f"/api/products/variants/{variant['id']}/")
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "variant_has_active_holds"
    with sessions() as s:
        assert s.get(Variant, variant["id"]) is not None
    assert stock.forgotten == []


# --- the catalog version ----------------------------------------------------------------------

def test_every_catalog_write_bumps_the_catalog_version_once(client, redis_client):
    def write(method, path, body=None):
        before = catalog_version(redis_client)
        response = getattr(client, method)(path, **({} if body is None else {"json": body}))
        assert response.status_code in (200, 201, 204), response.get_json()
        assert catalog_version(redis_client) == before + 1, f"{method} {path}"
        return response.get_json(silent=True)

    category = write("post", "/api/products/categories/", {"name": "X"})
    write("put", f"/api/products/categories/{category['id']}/", {"name": "Y"})
    product = write("post", "/api/products/", {"name": "P", "base_price": "1"})
    write("patch", f"/api/products/{product['id']}/", {"name": "Q"})
    write("put", f"/api/products/{product['id']}/", {"name": "R", "base_price": "2"})
    variant = write("post", "/api/products/variants/", {"product_id": product["id"], "sku": "S"})
    write("patch", f"/api/products/variants/{variant['id']}/", {"sku": "T"})
    write("put", f"/api/products/variants/{variant['id']}/", {"product_id": product["id"], "sku": "U"})
    write("delete", f"/api/products/variants/{variant['id']}/")
    write("delete", f"/api/products/{product['id']}/")
    write("delete", f"/api/products/categories/{category['id']}/")


def test_reads_leave_the_catalog_version_alone(client, redis_client):
    product = make_product(client)
    before = catalog_version(redis_client)
    for path in ("/api/products/", f"/api/products/{product['id']}/", "/api/products/categories/",
                 "/api/products/variants/"):
        assert client.get(path).status_code == 200
    assert catalog_version(redis_client) == before


# --- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/api/products", "/api/products/", "/api/products/categories", "/api/products/categories/",
    "/api/products/variants", "/api/products/variants/",
])
def test_list_paths_work_with_and_without_the_trailing_slash(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.get_json()["total"] == 0


def test_item_paths_work_with_and_without_the_trailing_slash(client):
    product = make_product(client)
    variant = make_variant(client, product["id"])
    category = make_category(client)
    for path in (f"/api/products/{product['id']}", f"/api/products/variants/{variant['id']}",
                 f"/api/products/categories/{category['id']}"):
        assert client.get(path).status_code == 200
        assert client.get(path + "/").status_code == 200


def test_writes_work_without_the_trailing_slash(client):
    product = created(client.post("/api/products", json={"name": "P", "base_price": "1"}))
    assert client.patch(f"/api/products/{product['id']}", json={"name": "Q"}).status_code == 200
    variant = created(client.post("/api/products/variants", json={"product_id": product["id"], "sku": "S"}))
    assert client.delete(f"/api/products/variants/{variant['id']}").status_code == 204
    category = created(client.post("/api/products/categories", json={"name": "C"}))
    assert client.put(f"/api/products/categories/{category['id']}", json={"name": "D"}).status_code == 200
    assert client.delete(f"/api/products/{product['id']}").status_code == 204


@pytest.mark.parametrize("kind, method", [
    (kind, method)
    for kind in ("product", "category", "variant")
    for method in ("get", "put", "patch", "delete")
    if (kind, method) != ("category", "patch")  # categories have no PATCH (see the 405 test)
])
def test_an_unknown_id_in_the_path_is_not_found(client, kind, method):
    prefix = {"product": "/api/products", "category": "/api/products/categories",
              "variant": "/api/products/variants"}[kind]
    bodies = {"product": {"name": "P", "base_price": "1"}, "category": {"name": "C"},
              "variant": {"product_id": 1, "sku": "S"}}
    if kind == "variant":
        make_product(client)  # product 1 exists, so only the path id is unknown
    kwargs = {"json": bodies[kind]} if method in ("put", "patch") else {}
    response = getattr(client, method)(f"{prefix}/424242/", **kwargs)
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["code"] == "not_found"
    assert error["details"] == {"resource": kind, "id": 424242}


@pytest.mark.parametrize("path", ["/api/products/0/", "/api/products/99999999999999999999/",
                                  "/api/products/-1/", "/api/products/abc/", "/api/products/variants/0/",
                                  "/api/products/categories/2147483648/"])
def test_ids_out_of_range_in_the_path_are_not_found(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("method, path", [
    ("delete", "/api/products/"),
    ("put", "/api/products/"),
    ("post", "/api/products/1/"),
    ("patch", "/api/products/categories/1/"),
    ("post", "/api/products/categories/1/"),
    ("delete", "/api/products/categories/"),
    ("put", "/api/products/variants/"),
    ("post", "/api/products/variants/1/"),
])
def test_a_wrong_method_is_405_with_the_error_body(client, method, path):
    response = getattr(client, method)(path, json={})
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


def test_the_openapi_document_describes_the_catalog_with_bearer_security_on_writes(client):
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    for path in ("/api/products/", "/api/products/{product_id}/", "/api/products/categories/",
                 "/api/products/categories/{category_id}/", "/api/products/variants/",
                 "/api/products/variants/{variant_id}/"):
        assert path in paths
    assert paths["/api/products/"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/api/products/"]["get"]
    assert set(paths["/api/products/variants/{variant_id}/"]) >= {"get", "put", "patch", "delete"}


@pytest.mark.parametrize("kind", ["product", "variant"])
def test_an_empty_patch_answers_the_unchanged_resource_and_keeps_caches(client, redis_client, kind):
    product = make_product(client)
    resource = product if kind == "product" else make_variant(client, product["id"])
    path = {"product": f"/api/products/{product['id']}/",
            "variant": f"/api/products/variants/{resource['id']}/"}[kind]
    before = catalog_version(redis_client)
    response = client.patch(path, json={})
    assert response.status_code == 200
    assert {k: v for k, v in response.get_json().items() if k != "variants"} == {
        k: v for k, v in resource.items() if k != "variants"}
    assert catalog_version(redis_client) == before
