"""The one place that turns errors into HTTP responses with the error body of API.md."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from app.errors import DomainError, Unavailable

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
    response = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _store_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    import redis
    from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout

    redis_errors = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                    redis.exceptions.ReadOnlyError, redis.exceptions.ClusterDownError,
                    redis.exceptions.TryAgainError, redis.exceptions.MasterDownError)
    db_errors = (OperationalError, PoolTimeout)
    del DBAPIError
    return redis_errors, db_errors


def register_error_handlers(app: Flask) -> None:
    redis_errors, db_errors = _store_errors()

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

    def _redis_down(exc):
        log.warning("Redis unavailable: %s", type(exc).__name__)
        err = Unavailable("redis")
        return error_response(err.status, err.code, err.message, err.details, err.headers)

    def _db_down(exc):
        log.warning("database unavailable: %s", type(exc).__name__)
        err = Unavailable("database")
        return error_response(err.status, err.code, err.message, err.details, err.headers)

    for cls in redis_errors:
        app.register_error_handler(cls, _redis_down)
    for cls in db_errors:
        app.register_error_handler(cls, _db_down)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Internal server error")
