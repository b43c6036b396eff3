"""The one money formatter and quantiser (app.money): two places, half up, never a signed zero."""
from __future__ import annotations

from decimal import Decimal

import pytest

from app.money import cents, money


@pytest.mark.parametrize("value, expected", [
    ("0.005", "0.01"), ("0.015", "0.02"), ("0.025", "0.03"), ("2.675", "2.68"), ("-2.675", "-2.68"),
    ("550", "550.00"), ("470.245", "470.25"), ("470.2449", "470.24"), ("0", "0.00"), ("1E+2", "100.00"),
])
def test_money_rounds_half_up_to_two_places(value, expected):
    assert money(Decimal(value)) == expected
    assert cents(Decimal(value)) == Decimal(expected)
    assert cents(Decimal(value)).as_tuple().exponent == -2


@pytest.mark.parametrize("first", ["0.00", "-0.00", "-0.001"])
def test_money_never_writes_a_signed_zero_whatever_was_cached_first(first):
    money.cache_clear()
    money(Decimal(first))
    for value in ("0.00", "-0.00", "-0.004", "0"):
        assert money(Decimal(value)) == "0.00"
