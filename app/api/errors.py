"""The one place that turns errors into HTTP responses with the error body of API.md."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from app.engine.failures import redis_error_code, store_refusal
from app.errors import DomainError, Unavailable, error_body
from app.api.context import container
from app.metrics import count_store_error

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str, details: dict | None = None, headers: dict | None = None):
    response = jsonify(error_body(code, message, details))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# A store that cannot be reached, or Redis refusing work for the state it is in (an error reply
# such as OOM, NOREPLICAS, READONLY, LOADING, MASTERDOWN, BUSY: app.engine.failures), is 503
# `unavailable` with Retry-After (API.md), never a 500. Every redis-py error goes through
# store_refusal; one that is not an outage (WRONGTYPE, a script's own error, ...) is a bug: 500.
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
_DATABASE_ERRORS = (OperationalError, PoolTimeout)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(exc: DomainError):
        if isinstance(exc, Unavailable):  # every 503 for a store passes here: inventory_store_errors_total
            count_store_error(exc.details["store"])
            if exc.details["store"] == "redis":
                try:  # the cart lines written before it are checked on the next write (app/engine/recent.py)
                    container().cart_store.recent.outage()
                except Exception:  # noqa: BLE001 - never more than a 503: the check is a nicety
                    log.warning("could not note the Redis outage for the cart lines check")
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        details = {}
        data = getattr(exc, "data", None)
        if isinstance(data, dict) and "messages" in data:
            from app.api.base import flatten_messages

            details, code, status = flatten_messages(data["messages"]), "validation_error", 400
        message = {
            404: "No such resource",
            405: "Method not allowed on this resource",
            413: "Request body is too large",
        }.get(status, exc.description or exc.name)
        headers = {}
        if status == 405 and exc.get_headers():
            headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        return error_response(status, code, message, details, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Internal server error")

    def _redis(exc: Exception):
        if not store_refusal(exc):
            return _unexpected(exc)
        code = redis_error_code(exc)
        log.warning("redis unavailable: %s%s", type(exc).__name__, f" ({code})" if code else "")
        return _domain(Unavailable("redis"))

    def _database(exc: Exception):
        log.warning("database unavailable: %s", type(exc).__name__)
        return _domain(Unavailable("database"))

    for cls in _REDIS_ERRORS:
        app.register_error_handler(cls, _redis)
    for cls in _DATABASE_ERRORS:
        app.register_error_handler(cls, _database)
