"""The demo data that `make run` and `inventory seed` load into an empty database."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import func, select

from app.seed import seed_command, seed_if_empty
from app.settings import load_settings
from persistence.models import Category, PricingRule, Product, Stock, StockMovement, Variant


def _count(sessions, model) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_seeding_an_empty_database_creates_the_demo_catalog_with_stock(container):
    sessions = container.sessions

    assert seed_if_empty(sessions) is True

    with sessions() as session:
        categories = session.scalars(select(Category)).all()
        assert 3 <= len(categories) <= 4
        assert any(c.parent_id is not None for c in categories), "one category is nested"
        products = session.scalars(select(Product)).all()
        assert len(products) >= 5
        variants = session.scalars(select(Variant)).all()
        for product in products:
            assert 2 <= len(product.variants) <= 4, product.name
            assert product.status == "active"
        stock = {s.variant_id: s for s in session.scalars(select(Stock))}
        movements = {m.variant_id: m for m in session.scalars(select(StockMovement))}
        assert set(stock) == set(movements) == {v.id for v in variants}
        for variant_id, row in stock.items():
            assert 20 <= row.on_hand <= 200
            assert row.version == 0
            movement = movements[variant_id]
            assert (movement.kind, movement.delta, movement.on_hand_after) == \
                ("initial", row.on_hand, row.on_hand)
            assert (movement.reason, movement.actor) == ("demo seed", "seed")
        # The pricing example of API.md: 500.00 + 50.00.
        example = [v for v in variants
                   if v.product.base_price == Decimal("500.00") and v.price_adjustment == Decimal("50.00")]
        assert example, "a 500.00 product with a +50.00 variant"


def test_seeding_creates_the_three_pricing_rules(container):
    seed_if_empty(container.sessions)

    with container.sessions() as session:
        rules = {r.name: r for r in session.scalars(select(PricingRule))}
        nested = session.scalars(select(Category)).all()

    assert set(rules) == {"Bulk 5+", "Gold tier", "December sale"}
    bulk, gold, season = rules["Bulk 5+"], rules["Gold tier"], rules["December sale"]
    assert (bulk.type, bulk.min_quantity, bulk.percent, bulk.priority) == ("BULK", 5, Decimal("10.00"), 1)
    assert (gold.type, gold.tier, gold.percent, gold.priority) == ("USER_TIER", "GOLD", Decimal("5.00"), 2)
    for rule in (bulk, gold):
        assert rule.product_id is None and rule.category_id is None and rule.active
    assert (season.type, season.percent, season.priority) == ("SEASONAL", Decimal("15.00"), 3)
    assert season.starts_at == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert season.ends_at == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert season.category_id in {c.id for c in nested} and season.product_id is None


def test_seeding_twice_creates_nothing_the_second_time(container):
    sessions = container.sessions
    assert seed_if_empty(sessions) is True
    before = {model: _count(sessions, model)
              for model in (Category, Product, Variant, Stock, StockMovement, PricingRule)}

    assert seed_if_empty(sessions) is False

    assert {model: _count(sessions, model) for model in before} == before


def test_seeding_leaves_a_database_with_a_catalog_alone(container):
    with container.sessions.begin() as session:
        session.add(Category(name="Mine"))

    assert seed_if_empty(container.sessions) is False
    assert _count(container.sessions, Product) == 0


def test_seed_command_migrates_a_new_database_then_seeds_it_once(tmp_path, capsys):
    settings = load_settings({"APP_ENV": "test", "DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"})

    assert seed_command(settings) == 0
    first = capsys.readouterr().out
    assert seed_command(settings) == 0
    second = capsys.readouterr().out

    assert first.startswith("seeded ") and "pricing rules" in first
    assert second.strip() == "database not empty, nothing seeded"
