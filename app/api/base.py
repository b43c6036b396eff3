"""The Blueprint and request parser every API module uses, and shared schema pieces."""
from __future__ import annotations

import json
import re
from typing import Any

import flask_smorest
import marshmallow as ma
from flask import Response
from flask.json.provider import DefaultJSONProvider
from marshmallow import fields, validate
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from app.errors import BadJson, DomainError, ValidationFailed
from app.money import money

MAX_ID = 2**31 - 1
MAX_QUANTITY = 1_000_000
MAX_MONEY = "9999999999.99"


class UnsupportedMediaType(DomainError):
    status, code = 415, "unsupported_media_type"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def flatten_messages(messages: Any) -> dict:
    """webargs keys errors by location ({"json": {...}}); callers want the fields."""
    if isinstance(messages, dict) and len(messages) == 1:
        (location, inner), = messages.items()
        if location in ("json", "query", "querystring", "view_args", "path", "headers") and isinstance(inner, dict):
            return inner
    return messages if isinstance(messages, dict) else {"_schema": messages}


_BAD_TEXT = re.compile(r"[\x00\ud800-\udfff]")


def _clean_text(value: Any) -> bool:
    """True when no string in a decoded JSON value (keys included) holds NUL or a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _BAD_TEXT.search(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def decode_json(req) -> Any:
    """The request's JSON body (core.missing when there is none); 415 when it is not JSON, 400
    `bad_json` when it does not parse. Strings are not checked yet: see require_clean_text."""
    data = req.get_data(cache=True)
    if not data:
        return core.missing
    if req.environ.get("CONTENT_TYPE") != "application/json" and not is_json_request(req):
        raise UnsupportedMediaType("Request body must be JSON (Content-Type: application/json)")
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise BadJson("Request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadJson("Request body is not valid JSON") from None


def require_clean_text(value: Any) -> None:
    """400 `bad_json` when a string of a decoded body holds NUL or a lone surrogate."""
    if not _clean_text(value):
        # "\ud800" and "\u0000" are valid JSON escapes, but neither is text a store can keep:
        # Postgres refuses both, and a lone surrogate cannot even be encoded as UTF-8.
        raise BadJson("Request body contains a NUL character or an unpaired surrogate")


class Parser(FlaskParser):
    """JSON only; bad JSON is `bad_json`, a bad field is `validation_error` (400, API.md)."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        value = decode_json(req)
        if value is not core.missing:
            require_clean_text(value)
        return value

    def _handle_invalid_json_error(self, error, req, *args, **kwargs):
        raise BadJson("Request body is not valid JSON")

    def handle_error(self, error, req, schema, *, error_status_code, error_headers):
        raise ValidationFailed("Request has invalid fields", flatten_messages(error.messages))


PARSER = Parser()


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = PARSER


# --- shared fields --------------------------------------------------------------------------

class WholeMatch(validate.Regexp):
    """validate.Regexp against the whole value: `re.match` with a pattern ending in `$` lets a final
    newline through ("GOLD\n"). The pattern is still published in the OpenAPI document as it is."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ma.ValidationError(self._format_error(value))
        return value


def Id(**kw) -> fields.Integer:
    """A catalog or order id: a strict JSON integer in range."""
    return fields.Integer(strict=True, validate=validate.Range(1, MAX_ID), **kw)


def Quantity(**kw) -> fields.Integer:
    return fields.Integer(strict=True, validate=validate.Range(1, MAX_QUANTITY), **kw)


class Money(fields.Decimal):
    """A money amount: in as a decimal string or number with at most two places, out as "550.00".

    Not below zero unless a `validate` is given (price_adjustment may be negative); the bound is
    checked here rather than with validate.Range so the OpenAPI type stays a plain string.
    """

    def __init__(self, **kw):
        self._non_negative = "validate" not in kw
        metadata = {"type": "string", "pattern": r"^-?\d{1,10}(\.\d{1,2})?$", "example": "550.00",
                    **kw.pop("metadata", {})}
        super().__init__(places=None, as_string=True, allow_nan=False, metadata=metadata, **kw)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or isinstance(value, float):
            # A float has already lost cents; ask for a string.
            if isinstance(value, bool) or value != round(value, 2):
                raise ma.ValidationError("Not a valid money amount; send a decimal string such as \"9.99\".")
            value = repr(value)
        result = super()._deserialize(value, attr, data, **kwargs)
        if not result.is_finite():
            raise ma.ValidationError("Not a valid money amount.")
        if result.as_tuple().exponent < -2:
            raise ma.ValidationError("Money has at most two decimal places.")
        if abs(result) > type(result)(MAX_MONEY):
            raise ma.ValidationError(f"Money must be at most {MAX_MONEY}.")
        if self._non_negative and result < 0:
            raise ma.ValidationError("Money must not be negative.")
        if result.is_zero():
            result = abs(result)  # "-0.00" is zero; never echo a signed zero
        return result.quantize(type(result)("0.01"))

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else money(value)


class Timestamp(fields.DateTime):
    """ISO-8601 UTC with a Z."""

    def _serialize(self, value, attr, obj, **kwargs):
        from app.clock import iso

        return iso(value)


class PageArgs(ma.Schema):
    page = fields.Integer(load_default=1, validate=validate.Range(1, MAX_ID))
    per_page = fields.Integer(load_default=50, validate=validate.Range(1, 500))


def list_schema(item_schema: type[ma.Schema], name: str) -> type[ma.Schema]:
    """The list envelope of API.md: {items, page, per_page, total}."""
    return ma.Schema.from_dict(
        {
            "items": fields.List(fields.Nested(item_schema)),
            "page": fields.Integer(),
            "per_page": fields.Integer(),
            "total": fields.Integer(),
        },
        name=name,
    )


# What jsonify writes outside debug mode (compact, ASCII, keys in the order built, the same
# fallbacks for dates, decimals and dataclasses), with one encoder built once instead of per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=DefaultJSONProvider.default)


def reply(status: int, body: dict):
    """A JSON response a service already built in API.md's shape (no second serialisation)."""
    return Response(_ENCODER.encode(body) + "\n", status=status, content_type="application/json")


def page_of(items: list, page: int, per_page: int, total: int) -> dict:
    return {"items": items, "page": page, "per_page": per_page, "total": total}
