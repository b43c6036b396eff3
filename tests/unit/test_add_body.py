"""The add-to-cart body's direct check agrees with AddSchema wherever it answers (pure logic)."""
from __future__ import annotations

import marshmallow as ma
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.cart import _ADD_SCHEMA, _plain_add

EDGES = [
    {"user_id": 101, "variant_id": 1, "quantity": 1},
    {"user_id": "101", "variant_id": 1, "quantity": 1},
    {"user_id": "a.b-c_d", "variant_id": 2**31 - 1, "quantity": 1_000_000},
    {"user_id": 0, "variant_id": 1, "quantity": 1, "user_tier": "GOLD"},
    {"user_id": 10**18 - 1, "variant_id": 1, "quantity": 1, "user_tier": None, "price": None},
    {"user_id": 10**18, "variant_id": 1, "quantity": 1},
    {"user_id": -1, "variant_id": 1, "quantity": 1},
    {"user_id": True, "variant_id": 1, "quantity": 1},
    {"user_id": "x" * 65, "variant_id": 1, "quantity": 1},
    {"user_id": "bad id", "variant_id": 1, "quantity": 1},
    {"user_id": "u", "variant_id": True, "quantity": 1},
    {"user_id": "u", "variant_id": 1, "quantity": True},
    {"user_id": "u", "variant_id": 1, "quantity": "2"},
    {"user_id": "u", "variant_id": 1, "quantity": 2.0},
    {"user_id": "u", "variant_id": 0, "quantity": 1},
    {"user_id": "u", "variant_id": 2**31, "quantity": 1},
    {"user_id": "u", "variant_id": 1, "quantity": 0},
    {"user_id": "u", "variant_id": 1, "quantity": 1_000_001},
    {"user_id": "u", "variant_id": 1, "quantity": 1, "user_tier": "G OLD"},
    {"user_id": "u", "variant_id": 1, "quantity": 1, "user_tier": 5},
    {"user_id": "u", "variant_id": 1, "quantity": 1, "user_tier": "x" * 33},
    {"user_id": "u", "variant_id": 1, "quantity": 1, "user_tier": "GOLD\n"},
    {"user_id": "u", "variant_id": 1, "quantity": 1, "price": "550.00"},
    {"user_id": "u", "variant_id": 1, "quantity": 1, "extra": 1},
    {"user_id": "u\x00", "variant_id": 1, "quantity": 1},
    {"variant_id": 1, "quantity": 1},
    {"user_id": "u", "quantity": 1},
    {"user_id": "u", "variant_id": 1},
    {},
    [],
    "body",
    None,
]


def _schema_says(body):
    try:
        return "ok", _ADD_SCHEMA.load(body)
    except ma.ValidationError:
        return "invalid", None


def _agrees(body) -> None:
    plain = _plain_add(body)
    if plain is None:
        return  # the schema judges it
    assert _schema_says(body) == ("ok", plain), body


@pytest.mark.parametrize("body", EDGES, ids=range(len(EDGES)))
def test_the_direct_check_of_an_add_body_returns_what_the_schema_loads(body):
    _agrees(body)


def test_the_direct_check_takes_the_plain_flash_sale_body():
    assert _plain_add({"user_id": 101, "variant_id": 3, "quantity": 2}) == \
        {"user_id": "101", "variant_id": 3, "quantity": 2}


def test_the_direct_check_leaves_every_invalid_body_to_the_schema():
    for body in EDGES:
        if _schema_says(body)[0] == "invalid":
            assert _plain_add(body) is None, body


_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**63), st.floats(allow_nan=False),
                    st.text(max_size=70), st.sampled_from(["GOLD", "101", "u-1", "550.00", "a\n"]))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["user_id", "variant_id", "quantity", "user_tier", "price", "other"]),
                       _values, max_size=6))
def test_the_direct_check_never_disagrees_with_the_schema(body):
    _agrees(body)
