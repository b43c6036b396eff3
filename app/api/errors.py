"""The one place that turns errors into HTTP responses with the error body of API.md."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from app.errors import DomainError, Unavailable, error_body

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


# A store that cannot be reached is 503 `unavailable` with Retry-After (API.md), never a 500.
_STORE_ERRORS = {
    "redis": (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
              redis.exceptions.ReadOnlyError, redis.exceptions.ClusterDownError,
              redis.exceptions.TryAgainError, redis.exceptions.MasterDownError),
    "database": (OperationalError, PoolTimeout),
}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(exc: DomainError):
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

    def _down(store: str):
        def handler(exc):
            log.warning("%s unavailable: %s", store, type(exc).__name__)
            return _domain(Unavailable(store))
        return handler

    for store, classes in _STORE_ERRORS.items():
        for cls in classes:
            app.register_error_handler(cls, _down(store))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Internal server error")
