"""A table of hostile requests: each gets its 4xx with the error body, and changes nothing at all.

"Nothing" is checked on both stores: every row count and every stock row in the database, and every
key with its value in Redis, before and after the request.
"""
from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import func, select

from persistence.models import Base, Stock
from tests.conftest import ADMIN_KEY
from tests.factories import make_variant

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = "application/json"


def _raw(body: str | bytes, content_type: str | None = JSON) -> dict:
    kw = {"data": body}
    if content_type is not None:
        kw["content_type"] = content_type
    return kw


def _deep(n: int) -> str:
    return '{"user_id": 1, "variant_id": 1, "quantity": ' + "[" * n + "]" * n + "}"


def _add(**fields) -> dict:
    return {"json": {"user_id": "h1", "variant_id": "VID", "quantity": 1, **fields}}


# (name, method, path, request kwargs, status, error code); "VID" is replaced by a real variant id
CASES = [
    # sizes and shapes
    ("oversize body", "POST", "/api/cart/add/", _raw('{"user_id": "' + "x" * 70_000 + '"}'), 413, "payload_too_large"),
    ("oversize body, no content length", "POST", "/api/cart/add/",
     {"input_stream": io.BytesIO(b'{"a": "' + b"x" * 70_000 + b'"}'),
      "headers": {"Transfer-Encoding": "chunked", "Content-Type": JSON},
      # what gunicorn sets for a chunked body: the stream ends by itself, its length is unknown
      "environ_overrides": {"wsgi.input_terminated": True}}, 413, "payload_too_large"),
    ("deep JSON", "POST", "/api/cart/add/", _raw(_deep(5000)), 400, "bad_json"),
    ("very deep JSON", "POST", "/api/cart/add/", _raw("[" * 30_000 + "]" * 30_000), 400, "bad_json"),
    ("deep object", "POST", "/api/products/", _raw('{"a":' * 3000 + "1" + "}" * 3000), 400, "bad_json"),
    ("body is a list", "POST", "/api/cart/add/", _raw("[1, 2]"), 400, "validation_error"),
    ("body is null", "POST", "/api/cart/add/", _raw("null"), 400, "validation_error"),
    ("body is a string", "POST", "/api/cart/add/", _raw('"add"'), 400, "validation_error"),
    ("truncated JSON", "POST", "/api/cart/add/", _raw('{"user_id": 1, "variant_id"'), 400, "bad_json"),
    ("not UTF-8", "POST", "/api/cart/add/", _raw(b'{"user_id": "\xff\xfe"}'), 400, "bad_json"),
    # numbers
    ("huge integer", "POST", "/api/cart/add/", _add(quantity=10**30), 400, "validation_error"),
    ("huge variant id", "POST", "/api/cart/add/", _add(variant_id=2**63), 400, "validation_error"),
    ("integer past the parser's digit limit", "POST", "/api/cart/add/",
     _raw('{"user_id": 1, "variant_id": 1, "quantity": ' + "9" * 5000 + "}"), 400, "bad_json"),
    ("NaN", "POST", "/api/cart/add/", _raw('{"user_id": 1, "variant_id": 1, "quantity": NaN}'), 400, "bad_json"),
    ("Infinity", "POST", "/api/cart/add/", _raw('{"user_id": 1, "variant_id": 1, "quantity": Infinity}'),
     400, "bad_json"),
    ("1e400", "POST", "/api/cart/add/", _raw('{"user_id": 1, "variant_id": 1, "quantity": 1e400}'), 400,
     "validation_error"),
    ("float quantity", "POST", "/api/cart/add/", _add(quantity=1.5), 400, "validation_error"),
    ("quantity as a string", "POST", "/api/cart/add/", _add(quantity="1"), 400, "validation_error"),
    ("boolean quantity", "POST", "/api/cart/add/", _add(quantity=True), 400, "validation_error"),
    ("negative quantity", "POST", "/api/cart/add/", _add(quantity=-5), 400, "validation_error"),
    ("zero quantity", "POST", "/api/cart/add/", _add(quantity=0), 400, "validation_error"),
    ("NaN price", "POST", "/api/cart/add/", _add(price="NaN"), 400, "validation_error"),
    ("price with three places", "POST", "/api/cart/add/", _add(price="1.005"), 400, "validation_error"),
    ("huge money", "POST", "/api/products/", {"json": {"name": "x", "base_price": "1e400"}}, 400, "validation_error"),
    ("adjust by 10**30", "POST", "/api/inventory/VID/adjust/", {"json": {"delta": 10**30, "reason": "x"}},
     400, "validation_error"),
    ("adjust below zero", "POST", "/api/inventory/VID/adjust/", {"json": {"delta": -10**6, "reason": "x"}},
     409, "stock_below_reserved"),
    ("page past int range", "GET", "/api/products/?page=99999999999999999999", {}, 400, "validation_error"),
    ("per_page NaN", "GET", "/api/products/?per_page=NaN", {}, 400, "validation_error"),
    ("quantity query huge", "GET", "/api/pricing/1/price/?quantity=99999999999999999999", {}, 400,
     "validation_error"),
    ("year 99999", "GET", "/api/pricing/1/price/?at=99999-01-01T00:00:00Z", {}, 400, "validation_error"),
    # text
    ("NUL in a string", "POST", "/api/products/", _raw('{"name": "a\\u0000b", "base_price": "1.00"}'), 400,
     "bad_json"),
    ("lone surrogate", "POST", "/api/products/", _raw('{"name": "\\ud800", "base_price": "1.00"}'), 400,
     "bad_json"),
    ("lone surrogate in a key", "POST", "/api/cart/add/", _raw('{"\\udfff": 1}'), 400, "bad_json"),
    ("RTL and zero-width in a user id", "POST", "/api/cart/add/", _add(user_id="\u202eabc\u200b"), 400,
     "validation_error"),
    ("emoji user id", "POST", "/api/cart/add/", _add(user_id="\U0001f600"), 400, "validation_error"),
    ("SQL injection user id", "POST", "/api/cart/add/", _add(user_id="1' OR '1'='1"), 400, "validation_error"),
    ("SQL injection in a query", "GET", "/api/orders/?user_id=1%27%20OR%201%3D1--", {}, 400, "validation_error"),
    ("Redis key injection user id", "POST", "/api/cart/add/", _add(user_id="a}:*"), 400, "validation_error"),
    ("Lua-ish user id", "POST", "/api/cart/add/", _add(user_id="x|1|l|y"), 400, "validation_error"),
    ("CRLF in a user id", "GET", "/api/cart/a%0d%0aSet-Cookie:%20x/", {}, 400, "validation_error"),
    ("unknown field", "POST", "/api/cart/add/", _add(is_admin=True), 400, "validation_error"),
    ("format string sku", "POST", "/api/products/variants/", {"json": {"product_id": 1, "sku": "%s%n{0}"}}, 400,
     "validation_error"),
    ("HTML name too long", "POST", "/api/products/", {"json": {"name": "<script>" * 100, "base_price": "1.00"}},
     400, "validation_error"),
    ("bad Idempotency-Key", "POST", "/api/cart/h1/checkout/", {"headers": {"Idempotency-Key": "a b\tc"}}, 400,
     "validation_error"),
    ("Idempotency-Key too long", "POST", "/api/cart/h1/checkout/", {"headers": {"Idempotency-Key": "k" * 300}},
     400, "validation_error"),
    # content types
    ("text/plain body", "POST", "/api/cart/add/", _raw('{"user_id": 1}', "text/plain"), 415,
     "unsupported_media_type"),
    ("form body", "POST", "/api/cart/add/", _raw("user_id=1&variant_id=1&quantity=1",
                                                 "application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    ("multipart body", "POST", "/api/products/", _raw("--x\r\n\r\n--x--", "multipart/form-data; boundary=x"), 415,
     "unsupported_media_type"),
    ("XML body", "POST", "/api/products/", _raw("<product/>", "application/xml"), 415, "unsupported_media_type"),
    ("no content type", "POST", "/api/cart/add/", _raw('{"user_id": 1}', None), 415, "unsupported_media_type"),
    # paths and ids
    ("path traversal in an item id", "DELETE", "/api/cart/..%2F..%2Fetc%2Fpasswd/", {}, 404, "not_found"),
    ("dot-dot segments", "GET", "/api/cart/../../etc/passwd/", {}, 404, "not_found"),
    ("encoded NUL in a user id", "GET", "/api/cart/%00/", {}, 400, "validation_error"),
    ("traversal in a hold id", "PATCH", "/api/cart/1~..%2Fx/", {"json": {"quantity": 1}}, 404, "not_found"),
    ("wildcard hold id", "DELETE", "/api/cart/1~*/", {}, 404, "not_found"),
    ("hold id with a huge variant", "DELETE", "/api/cart/99999999999999999999~h1/", {}, 404, "not_found"),
    ("hold id of someone else's variant", "DELETE", "/api/cart/VID~h1/", {}, 404, "not_found"),
    ("overlong user id", "GET", "/api/cart/" + "a" * 300 + "/", {}, 404, "not_found"),
    ("negative product id", "GET", "/api/products/-1/", {}, 404, "not_found"),
    ("huge product id", "GET", "/api/products/99999999999999999999999/", {}, 404, "not_found"),
    ("id with a dot", "GET", "/api/orders/1.5/", {}, 404, "not_found"),
    ("unknown variant", "POST", "/api/cart/add/", {"json": {"user_id": "h1", "variant_id": 999999, "quantity": 1}},
     404, "not_found"),
    ("wrong method", "PUT", "/api/cart/add/", {"json": {}}, 405, "method_not_allowed"),
    ("empty cart checkout", "POST", "/api/cart/h1/checkout/", {}, 400, "empty_cart"),
]


def _fill(value, vid: int):
    if isinstance(value, str):
        return value.replace("VID", str(vid))
    if isinstance(value, dict):
        return {k: (vid if v == "VID" else _fill(v, vid)) for k, v in value.items()}
    return value


def snapshot(container) -> tuple:
    """Every row count and stock row in the database; every key and value in Redis."""
    with container.sessions() as s:
        counts = tuple((t.name, s.scalar(select(func.count()).select_from(t))) for t in Base.metadata.sorted_tables)
        stock = tuple(s.execute(select(Stock.variant_id, Stock.on_hand, Stock.version).order_by(Stock.variant_id)))
    r = container.redis
    dump = []
    for key in sorted(r.scan_iter(count=1000)):
        kind = r.type(key)
        value = {"string": r.get, "hash": r.hgetall, "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
                 "set": r.smembers, "list": lambda k: r.lrange(k, 0, -1)}[kind](key)
        dump.append((key, kind, json.dumps(value, sort_keys=True, default=sorted)))
    return counts, stock, tuple(dump)


@pytest.fixture
def hostile(auth_env, build):
    client, c = build(auth_env)
    vid = make_variant(c.sessions, on_hand=10)
    # one real line in a cart, and every cache warmed, so a read changes nothing either
    assert client.post("/api/cart/add/", json={"user_id": "resident", "variant_id": vid, "quantity": 2},
                       headers=ADMIN).status_code == 201
    client.get("/api/cart/resident/", headers=ADMIN)
    client.get("/api/pricing/1/price/")
    return client, c, vid


@pytest.mark.parametrize("name, method, path, kwargs, status, code", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_request_gets_its_4xx_and_changes_nothing(hostile, name, method, path, kwargs, status, code):
    client, c, vid = hostile
    kwargs = _fill(kwargs, vid)
    if isinstance(kwargs.get("input_stream"), io.BytesIO):
        kwargs["input_stream"].seek(0)
    headers = {**ADMIN, **kwargs.pop("headers", {})}
    before = snapshot(c)
    response = client.open(_fill(path, vid), method=method, headers=headers, **kwargs)
    text = response.get_data(as_text=True)
    assert response.status_code == status, (name, text[:300])
    body = response.get_json(silent=True)
    assert isinstance(body, dict) and body["error"]["code"] == code, (name, text[:300])
    assert set(body["error"]) == {"code", "message", "details"}
    assert "Traceback" not in text and "sqlalchemy" not in text.lower() and "redis." not in text.lower()
    assert snapshot(c) == before, f"{name} changed the stores"
