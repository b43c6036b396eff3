"""Money: `Decimal` end to end, quantised to cents once per unit price (half up), shown as a string."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

CENTS = Decimal("0.01")


def cents(value) -> Decimal:
    """The value rounded half up to two places."""
    return Decimal(value).quantize(CENTS, rounding=ROUND_HALF_UP)


@lru_cache(maxsize=8192)  # a sale renders the same few prices and totals on every add
def money(value: Decimal) -> str:
    """The API's money string: two places, e.g. "550.00"; never a signed zero ("-0.00").

    (Decimal("-0.00") == Decimal("0.00"), so the cache would otherwise answer either for both.)
    """
    result = cents(value)
    return format(abs(result) if result.is_zero() else result, "f")
