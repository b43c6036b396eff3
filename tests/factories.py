"""Rows for tests, written straight through the models."""
from __future__ import annotations

import itertools
from decimal import Decimal

from persistence.models import Category, Product, Stock, StockMovement, Variant

_seq = itertools.count(1)


def make_product(sessions, *, name="Widget", base_price="500.00", status="active", category_id=None) -> int:
    with sessions.begin() as s:
        product = Product(name=name, description="", base_price=Decimal(base_price), status=status,
                          category_id=category_id)
        s.add(product)
        s.flush()
        return product.id


def make_category(sessions, name="Things", parent_id=None) -> int:
    with sessions.begin() as s:
        category = Category(name=name, parent_id=parent_id)
        s.add(category)
        s.flush()
        return category.id


def make_variant(sessions, *, on_hand=5, product_id=None, sku=None, price_adjustment="0.00",
                 base_price="500.00", status="active") -> int:
    if product_id is None:
        product_id = make_product(sessions, base_price=base_price, status=status)
    with sessions.begin() as s:
        variant = Variant(product_id=product_id, sku=sku or f"SKU-{next(_seq)}", attributes={},
                          price_adjustment=Decimal(price_adjustment))
        s.add(variant)
        s.flush()
        s.add(Stock(variant_id=variant.id, on_hand=on_hand, version=0))
        if on_hand:
            s.add(StockMovement(variant_id=variant.id, delta=on_hand, on_hand_after=on_hand, kind="initial",
                                reason="test", actor="test"))
        return variant.id


def make_variants(sessions, count: int, *, on_hand=5) -> list[int]:
    """Many variants under one product, in one transaction."""
    product_id = make_product(sessions)
    ids = []
    with sessions.begin() as s:
        for _ in range(count):
            variant = Variant(product_id=product_id, sku=f"BULK-{next(_seq)}", attributes={},
                              price_adjustment=Decimal("0.00"))
            s.add(variant)
            s.flush()
            s.add(Stock(variant_id=variant.id, on_hand=on_hand, version=0))
            ids.append(variant.id)
    return ids


def on_hand(sessions, variant_id: int) -> int:
    with sessions() as s:
        return s.get(Stock, variant_id).on_hand
