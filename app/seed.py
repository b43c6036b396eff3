"""Demo data for a newcomer's first `make run`: a small catalog with stock and three pricing rules.

The first product and its third variant reproduce the pricing example of API.md (500.00 + 50.00),
and the first two rules are that example's "Bulk 5+" and "Gold tier".
"""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from persistence.models import Category, PricingRule, Product, Stock, StockMovement, Variant

# (category key, name, parent key)
CATEGORIES = [
    ("electronics", "Electronics", None),
    ("laptops", "Laptops", "electronics"),
    ("apparel", "Apparel", None),
    ("home", "Home & kitchen", None),
]

# (name, description, base_price, category key, [(sku, attributes, price_adjustment, on_hand)])
PRODUCTS = [
    ("Aero 14 laptop", "14-inch ultralight laptop", "500.00", "laptops", [
        ("AERO14-8GB", {"memory": "8GB"}, "0.00", 40),
        ("AERO14-16GB", {"memory": "16GB"}, "25.00", 60),
        ("AERO14-32GB", {"memory": "32GB"}, "50.00", 25),
    ]),
    ("Quiet One headphones", "Over-ear noise-cancelling headphones", "129.00", "electronics", [
        ("QUIET1-BLK", {"color": "black"}, "0.00", 120),
        ("QUIET1-SLV", {"color": "silver"}, "0.00", 80),
        ("QUIET1-RED", {"color": "red"}, "10.00", 30),
    ]),
    ("Merino T-shirt", "Lightweight merino wool tee", "45.00", "apparel", [
        ("MERINO-TEE-S", {"size": "S"}, "0.00", 50),
        ("MERINO-TEE-M", {"size": "M"}, "0.00", 200),
        ("MERINO-TEE-L", {"size": "L"}, "0.00", 150),
        ("MERINO-TEE-XL", {"size": "XL"}, "2.00", 20),
    ]),
    ("Storm rain jacket", "Packable waterproof jacket", "120.00", "apparel", [
        ("STORM-JKT-M", {"size": "M"}, "0.00", 35),
        ("STORM-JKT-L", {"size": "L"}, "0.00", 45),
    ]),
    ("Chef's knife", "Forged steel chef's knife", "79.90", "home", [
        ("KNIFE-8IN", {"length": "8in"}, "0.00", 70),
        ("KNIFE-10IN", {"length": "10in"}, "15.00", 24),
    ]),
    ("Espresso cups, set of 4", "Porcelain espresso cups", "24.50", "home", [
        ("CUPS4-WHITE", {"color": "white"}, "0.00", 180),
        ("CUPS4-BLACK", {"color": "black"}, "0.00", 90),
        ("CUPS4-TERRA", {"color": "terracotta"}, "3.50", 22),
    ]),
]

SEASONAL_CATEGORY = "apparel"


def _utc(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=timezone.utc)


def is_empty(session: Session) -> bool:
    """True when the catalog has no categories, products, variants or pricing rules."""
    for model in (Category, Product, Variant, PricingRule):
        if session.scalar(select(func.count()).select_from(model)):
            return False
    return True


def _add_demo_data(session: Session) -> dict[str, int]:
    categories: dict[str, Category] = {}
    for key, name, parent in CATEGORIES:
        category = Category(name=name, parent_id=categories[parent].id if parent else None)
        session.add(category)
        session.flush()  # the nested category needs its parent's id
        categories[key] = category

    variants = 0
    for name, description, base_price, category_key, variant_rows in PRODUCTS:
        product = Product(name=name, description=description, base_price=Decimal(base_price),
                          status="active", category_id=categories[category_key].id)
        session.add(product)
        for sku, attributes, adjustment, on_hand in variant_rows:
            variant = Variant(sku=sku, attributes=attributes, price_adjustment=Decimal(adjustment))
            variant.stock = Stock(on_hand=on_hand, version=0)
            product.variants.append(variant)
            variants += 1
        session.flush()  # ledger rows carry the variant ids
        for variant in product.variants:
            session.add(StockMovement(variant_id=variant.id, delta=variant.stock.on_hand,
                                      on_hand_after=variant.stock.on_hand, kind="initial",
                                      reason="demo seed", actor="seed"))

    session.add_all([
        PricingRule(name="Bulk 5+", type="BULK", priority=1, percent=Decimal("10.00"), min_quantity=5),
        PricingRule(name="Gold tier", type="USER_TIER", priority=2, percent=Decimal("5.00"), tier="GOLD"),
        PricingRule(name="December sale", type="SEASONAL", priority=3, percent=Decimal("15.00"),
                    starts_at=_utc(2026, 12, 1), ends_at=_utc(2027, 1, 1),
                    category_id=categories[SEASONAL_CATEGORY].id),
    ])
    session.flush()
    return {"categories": len(categories), "products": len(PRODUCTS), "variants": variants,
            "pricing_rules": 3}


def seed_if_empty(sessions: sessionmaker[Session]) -> bool:
    """Load the demo data in one transaction if the catalog is empty; True when it did."""
    return seed_summary(sessions) is not None


def seed_summary(sessions: sessionmaker[Session]) -> dict[str, int] | None:
    """Like seed_if_empty, but returns how many rows of each kind were created (None: nothing)."""
    # The emptiness check and the inserts share one transaction; on SQLite it starts with
    # BEGIN IMMEDIATE, so two seeders started at once cannot both see an empty catalog.
    with sessions.begin() as session:
        if not is_empty(session):
            return None
        return _add_demo_data(session)


def seed_command(settings) -> int:
    """`inventory seed`: migrate, then seed if the catalog is empty; prints what it did."""
    from persistence.db import make_engine, make_session_factory, migrate

    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        summary = seed_summary(make_session_factory(engine))
    finally:
        engine.dispose()
    if summary is None:
        print("database not empty, nothing seeded")
    else:
        print("seeded {categories} categories, {products} products, {variants} variants with stock, "
              "{pricing_rules} pricing rules".format(**summary) + f" into {settings.redacted_database_url()}")
    return 0
