"""The pricing engine (app.pricing): pure logic, no stores."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from app.pricing import (
    ADDITIVE,
    BULK,
    MULTIPLICATIVE,
    SEASONAL,
    USER_TIER,
    AppliedRule,
    Rule,
    quote,
    quote_to_json,
    rule_problems,
)

D = Decimal
NOW = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
BULK_5 = Rule(id=1, name="Bulk 5+", type=BULK, priority=1, percent=D("10"), min_quantity=5)
GOLD = Rule(id=2, name="Gold tier", type=USER_TIER, priority=2, percent=D("5"), tier="GOLD")


def price(rules, *, base="500.00", adjustment="50.00", quantity=10, tier="GOLD", at=NOW,
          stacking=MULTIPLICATIVE, product_id=1, category_ids=()):
    return quote(base_price=D(base), variant_adjustment=D(adjustment), quantity=quantity, user_tier=tier,
                 at=at, rules=rules, stacking=stacking, product_id=product_id, variant_id=3,
                 category_ids=category_ids, currency="USD")


def ids(q):
    return [r.id for r in q.applied_rules]


# --- the example of API.md ------------------------------------------------------------------

def test_seed_example_multiplicative_gives_470_25():
    q = price([BULK_5, GOLD])
    assert q.list_price == D("550.00")
    assert [r.amount for r in q.applied_rules] == [D("55.00"), D("24.75")]
    assert q.unit_price == D("470.25")
    assert q.line_total == D("4702.50")


def test_seed_example_additive_gives_467_50():
    q = price([BULK_5, GOLD], stacking=ADDITIVE)
    assert [r.amount for r in q.applied_rules] == [D("55.00"), D("27.50")]
    assert q.unit_price == D("467.50")
    assert q.line_total == D("4675.00")


def test_quote_to_json_is_the_api_example_exactly():
    assert quote_to_json(price([BULK_5, GOLD])) == {
        "product_id": 1, "variant_id": 3, "quantity": 10, "user_tier": "GOLD",
        "base_price": "500.00", "variant_adjustment": "50.00", "list_price": "550.00",
        "applied_rules": [{"id": 1, "name": "Bulk 5+", "type": "BULK", "percent": "10.00", "amount": "55.00"},
                          {"id": 2, "name": "Gold tier", "type": "USER_TIER", "percent": "5.00", "amount": "24.75"}],
        "stacking": "multiplicative", "unit_price": "470.25", "line_total": "4702.50", "currency": "USD",
    }


def test_quote_to_json_keeps_the_key_order_of_the_api():
    assert list(quote_to_json(price([]))) == [
        "product_id", "variant_id", "quantity", "user_tier", "base_price", "variant_adjustment", "list_price",
        "applied_rules", "stacking", "unit_price", "line_total", "currency"]


def test_no_rule_leaves_the_list_price():
    q = price([], quantity=1, tier=None)
    assert q.applied_rules == ()
    assert q.unit_price == D("550.00") and q.line_total == D("550.00")


# --- conditions -----------------------------------------------------------------------------

def test_bulk_applies_from_its_min_quantity():
    assert ids(price([BULK_5], quantity=4)) == []
    assert ids(price([BULK_5], quantity=5)) == [1]


def test_user_tier_compares_case_insensitively_and_needs_a_tier():
    assert ids(price([GOLD], tier="gold")) == [2]
    assert ids(price([GOLD], tier="SILVER")) == []
    assert ids(price([GOLD], tier=None)) == []


def test_seasonal_start_is_inclusive_and_end_exclusive():
    rule = Rule(id=9, name="Winter", type=SEASONAL, priority=0, percent=D("20"),
                starts_at=NOW, ends_at=NOW + timedelta(days=1))
    assert ids(price([rule], at=NOW - timedelta(microseconds=1))) == []
    assert ids(price([rule], at=NOW)) == [9]
    assert ids(price([rule], at=NOW + timedelta(days=1) - timedelta(microseconds=1))) == [9]
    assert ids(price([rule], at=NOW + timedelta(days=1))) == []


def test_seasonal_bounds_may_be_open():
    from_now = Rule(id=1, name="From", type=SEASONAL, priority=0, percent=D("10"), starts_at=NOW)
    until_now = Rule(id=2, name="Until", type=SEASONAL, priority=0, percent=D("10"), ends_at=NOW)
    assert ids(price([from_now, until_now], at=NOW + timedelta(days=365))) == [1]
    assert ids(price([from_now, until_now], at=NOW - timedelta(days=365))) == [2]


def test_an_inactive_rule_never_applies():
    off = Rule(id=1, name="Off", type=BULK, priority=0, percent=D("50"), min_quantity=1, active=False)
    assert ids(price([off])) == []


# --- scopes ---------------------------------------------------------------------------------

def test_a_product_rule_applies_to_that_product_only():
    rule = Rule(id=1, name="P7", type=BULK, priority=0, percent=D("10"), min_quantity=1, product_id=7)
    assert ids(price([rule], product_id=7)) == [1]
    assert ids(price([rule], product_id=8)) == []


def test_a_category_rule_applies_to_the_category_and_its_descendants():
    rule = Rule(id=1, name="Cat 2", type=BULK, priority=0, percent=D("10"), min_quantity=1, category_id=2)
    assert ids(price([rule], category_ids=(2,))) == [1]
    assert ids(price([rule], category_ids=(5, 2))) == [1]  # product in sub-category 5 of 2
    assert ids(price([rule], category_ids=(5,))) == []
    assert ids(price([rule], category_ids=())) == []


def test_a_global_rule_applies_everywhere():
    rule = Rule(id=1, name="All", type=BULK, priority=0, percent=D("10"), min_quantity=1)
    assert ids(price([rule], product_id=99, category_ids=(4,))) == [1]


# --- order, stacking, rounding --------------------------------------------------------------

def test_rules_apply_in_ascending_priority_then_id():
    a = Rule(id=5, name="a", type=BULK, priority=2, percent=D("10"), min_quantity=1)
    b = Rule(id=6, name="b", type=BULK, priority=1, percent=D("10"), min_quantity=1)
    c = Rule(id=4, name="c", type=BULK, priority=2, percent=D("10"), min_quantity=1)
    assert ids(price([a, b, c])) == [6, 4, 5]


def test_priority_decides_which_rule_takes_the_larger_amount_when_multiplicative():
    big = Rule(id=1, name="big", type=BULK, priority=2, percent=D("50"), min_quantity=1)
    small = Rule(id=2, name="small", type=BULK, priority=1, percent=D("10"), min_quantity=1)
    q = price([big, small], base="100.00", adjustment="0")
    assert [(r.id, r.amount) for r in q.applied_rules] == [(2, D("10.00")), (1, D("45.00"))]
    assert q.unit_price == D("45.00")


def test_additive_unit_price_is_clamped_at_zero():
    rules = [Rule(id=i, name=f"r{i}", type=BULK, priority=i, percent=D("60"), min_quantity=1) for i in (1, 2)]
    q = price(rules, base="100.00", adjustment="0", stacking=ADDITIVE)
    assert q.unit_price == D("0.00") and q.line_total == D("0.00")
    assert str(q.unit_price) == "0.00"
    # The second rule could only take what was left.
    assert [r.amount for r in q.applied_rules] == [D("60.00"), D("40.00")]


def test_a_hundred_percent_gives_zero_not_negative():
    rule = Rule(id=1, name="free", type=BULK, priority=0, percent=D("100"), min_quantity=1)
    assert quote_to_json(price([rule]))["unit_price"] == "0.00"


def test_unit_price_rounds_half_up():
    rule = Rule(id=1, name="half", type=BULK, priority=0, percent=D("50"), min_quantity=1)
    q = price([rule], base="1.01", adjustment="0", quantity=3)
    assert q.unit_price == D("0.51")  # 0.505 half-up, not banker's 0.50
    assert q.applied_rules[0].amount == D("0.51")  # 0.505 taken, shown half-up
    assert q.line_total == D("1.53")


def test_unit_price_is_rounded_once_not_per_rule():
    rules = [Rule(id=i, name=f"r{i}", type=BULK, priority=i, percent=D("0.5"), min_quantity=1) for i in (1, 2)]
    q = price(rules, base="1.00", adjustment="0")
    # 1.00 * 0.995 * 0.995 = 0.990025 -> 0.99; rounding after each rule would give 1.00.
    assert q.unit_price == D("0.99")


def test_a_negative_variant_adjustment_lowers_the_list_price():
    q = price([], base="500.00", adjustment="-25.50", quantity=2)
    assert quote_to_json(q)["list_price"] == "474.50"
    assert q.line_total == D("949.00")


def test_unknown_stacking_is_refused():
    with pytest.raises(ValueError):
        price([], stacking="sequential")


def test_a_rule_refuses_a_percent_over_100():
    with pytest.raises(ValueError):
        Rule(id=1, name="x", type=BULK, priority=0, percent=D("100.01"), min_quantity=1)


# --- rule_problems --------------------------------------------------------------------------

def problems(**kw):
    values = dict(type=BULK, min_quantity=None, tier=None, starts_at=None, ends_at=None,
                  product_id=None, category_id=None)
    values.update(kw)
    return rule_problems(**values)


def test_a_sound_rule_has_no_problems():
    assert problems(type=BULK, min_quantity=5) == {}
    assert problems(type=USER_TIER, tier="GOLD") == {}
    assert problems(type=SEASONAL, starts_at=NOW) == {}
    assert problems(type=SEASONAL, ends_at=NOW, product_id=3) == {}


def test_each_type_needs_its_own_condition():
    assert set(problems(type=BULK)) == {"min_quantity"}
    assert set(problems(type=USER_TIER)) == {"tier"}
    assert set(problems(type=SEASONAL)) == {"starts_at"}


def test_seasonal_needs_start_before_end():
    assert set(problems(type=SEASONAL, starts_at=NOW, ends_at=NOW)) == {"ends_at"}


def test_fields_of_another_type_and_a_double_scope_are_problems():
    found = problems(type=BULK, min_quantity=2, tier="GOLD", starts_at=NOW, product_id=1, category_id=2)
    assert set(found) == {"tier", "starts_at", "category_id"}


# --- properties -----------------------------------------------------------------------------

percents = st.decimals(min_value=0, max_value=100, places=2)
money = st.decimals(min_value=0, max_value=D("99999999.99"), places=2)
stackings = st.sampled_from([MULTIPLICATIVE, ADDITIVE])


@st.composite
def rule_lists(draw):
    count = draw(st.integers(0, 6))
    rule_ids = draw(st.lists(st.integers(1, 10_000), min_size=count, max_size=count, unique=True))
    return [
        Rule(id=rid, name=f"r{rid}", type=BULK, priority=draw(st.integers(-3, 3)),
             percent=draw(percents), min_quantity=draw(st.integers(1, 20)))
        for rid in rule_ids
    ]


@given(base=money, adjustment=money, quantity=st.integers(1, 1000), rules=rule_lists(), stacking=stackings)
@hsettings(max_examples=300, deadline=None)
def test_unit_price_stays_between_zero_and_list_price_with_two_places(base, adjustment, quantity, rules, stacking):
    q = price(rules, base=base, adjustment=adjustment, quantity=quantity, stacking=stacking)
    assert D("0") <= q.unit_price <= q.list_price
    assert q.unit_price.as_tuple().exponent == -2
    assert q.line_total == q.unit_price * quantity
    assert q.line_total.as_tuple().exponent == -2
    assert all(r.amount.as_tuple().exponent == -2 and r.amount >= 0 for r in q.applied_rules)


@given(rules=rule_lists(), quantity=st.integers(1, 30), stacking=stackings, seed=st.randoms())
@hsettings(max_examples=200, deadline=None)
def test_order_of_the_rule_list_does_not_matter(rules, quantity, stacking, seed):
    shuffled = list(rules)
    seed.shuffle(shuffled)
    assert price(rules, quantity=quantity, stacking=stacking) == price(shuffled, quantity=quantity, stacking=stacking)


@given(base=money, adjustment=money, percent=percents)
@hsettings(max_examples=200, deadline=None)
def test_one_rule_prices_the_same_additive_or_multiplicative(base, adjustment, percent):
    rule = Rule(id=1, name="one", type=BULK, priority=0, percent=percent, min_quantity=1)
    multiplicative = price([rule], base=base, adjustment=adjustment, stacking=MULTIPLICATIVE)
    additive = price([rule], base=base, adjustment=adjustment, stacking=ADDITIVE)
    assert multiplicative.unit_price == additive.unit_price
    assert multiplicative.applied_rules == additive.applied_rules


@given(rules=rule_lists(), stacking=stackings)
@hsettings(max_examples=200, deadline=None)
def test_amounts_add_up_to_the_discount_within_rounding(rules, stacking):
    q = price(rules, quantity=30, stacking=stacking)
    taken = sum((r.amount for r in q.applied_rules), D("0"))
    # Each amount is rounded on its own: at most half a cent off each, and the unit price's half cent.
    assert abs(q.list_price - q.unit_price - taken) <= D("0.005") * (len(q.applied_rules) + 1)


def test_applied_rule_is_a_value():
    assert AppliedRule(1, "a", BULK, D("1"), D("2")) == AppliedRule(1, "a", BULK, D("1"), D("2"))


@given(rules=rule_lists())
@hsettings(max_examples=200, deadline=None)
def test_additive_never_prices_above_multiplicative(rules):
    # Additive takes each percent of the full list price, so it discounts at least as much.
    assert price(rules, stacking=ADDITIVE).unit_price <= price(rules, stacking=MULTIPLICATIVE).unit_price
