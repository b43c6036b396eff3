"""Every in-process cache keyed by what clients send has a bound: filled past it, it stays within."""
from __future__ import annotations

from decimal import Decimal

import pytest

from app import metrics, money
from app.services import pricing as pricing_service
from tests.factories import make_product, make_variant

BOUND = 4


@pytest.fixture
def small_pricing_cache(monkeypatch, container):
    monkeypatch.setattr(pricing_service, "CACHE_MAX_ENTRIES", BOUND)
    return container.pricing


def test_the_pricing_cache_holds_at_most_the_bound_of_products_and_variants(small_pricing_cache, sessions):
    service = small_pricing_cache
    variants = [make_variant(sessions, base_price=f"{10 + i}.00") for i in range(3 * BOUND)]
    products = [make_product(sessions, base_price="7.00") for _ in range(2 * BOUND)]
    sizes = []
    for i, vid in enumerate(variants):
        assert service.price_variant(vid).unit_price == Decimal(f"{10 + i}.00")
        sizes.append(len(service._snapshot.products) + len(service._snapshot.variants))
    for pid in products:
        assert service.price(pid).unit_price == Decimal("7.00")
        sizes.append(len(service._snapshot.products) + len(service._snapshot.variants))
    assert max(sizes) == BOUND  # filled up to the bound, never past it


def test_the_quote_cache_holds_at_most_the_bound_of_quotes(small_pricing_cache, sessions):
    service = small_pricing_cache
    product_id = make_product(sessions, base_price="3.00")
    sizes = []
    for quantity in range(1, 5 * BOUND):
        for tier in ("GOLD", "SILVER", None):
            quote = service.price(product_id, quantity=quantity, user_tier=tier)
            assert quote.line_total == Decimal("3.00") * quantity
            sizes.append(len(service._snapshot.quotes))
    assert max(sizes) == BOUND


def test_made_up_http_methods_do_not_become_metric_series(client):
    made_up = [f"FOO{i}" for i in range(20)]
    for method in made_up:
        assert client.open("/healthz", method=method).status_code == 405
    methods = {sample.labels["method"] for family in metrics.REQUEST_LATENCY.collect() for sample in family.samples
               if "method" in sample.labels}
    assert "other" in methods
    assert methods <= metrics.METHOD_LABELS | {"other"}


@pytest.mark.parametrize("method, label", [("GET", "GET"), ("PATCH", "PATCH"), ("get", "other"), ("FOO", "other"),
                                           ("", "other")])
def test_a_method_label_is_a_known_method_or_other(method, label):
    assert metrics.method_label(method) == label


def test_the_money_formatter_cache_is_bounded():
    maxsize = money.money.cache_info().maxsize
    assert maxsize is not None and maxsize > 0
    for i in range(maxsize + 500):
        assert money.money(Decimal(i) / 100) == f"{i // 100}.{i % 100:02d}"
    assert money.money.cache_info().currsize <= maxsize
