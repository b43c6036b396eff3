"""The per-process quote cache never outlives a seasonal rule's start or end."""
from datetime import timedelta
from decimal import Decimal

from app.clock import utcnow
from persistence.models import PricingRule
from tests.conftest import wait_for
from tests.factories import make_variant


def test_a_cached_price_changes_when_a_seasonal_rule_starts_and_ends(container, sessions):
    vid = make_variant(sessions, on_hand=5, base_price="100.00")
    start = utcnow() + timedelta(milliseconds=600)
    with sessions.begin() as s:
        s.add(PricingRule(name="Flash", type="SEASONAL", priority=1, percent=Decimal("10.00"),
                          starts_at=start, ends_at=start + timedelta(milliseconds=600), active=True))
    pricing = container.pricing
    assert pricing.price_variant(vid).unit_price == Decimal("100.00")
    assert pricing.price_variant(vid).unit_price == Decimal("100.00")  # served from the cache
    wait_for(lambda: pricing.price_variant(vid).unit_price == Decimal("90.00"), timeout=3,
             message="the sale to start")
    assert utcnow() >= start
    wait_for(lambda: pricing.price_variant(vid).unit_price == Decimal("100.00"), timeout=3,
             message="the sale to end")
