"""Domain errors. Each carries its data; exactly one place (app.api.errors) turns them into HTTP."""
from __future__ import annotations

from typing import Any


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    """The error body of API.md, for every error of every endpoint."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


class DomainError(Exception):
    """Base of every error a caller can be told about."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: dict[str, Any] | None = None, *, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.code, self.message, self.details)


class ValidationFailed(DomainError):
    status, code = 400, "validation_error"


class BadJson(DomainError):
    status, code = 400, "bad_json"


class NotFound(DomainError):
    status, code = 404, "not_found"

    def __init__(self, what: str = "resource", ident: Any = None):
        msg = f"{what} {ident} not found" if ident is not None else f"{what} not found"
        super().__init__(msg, {"resource": what, "id": ident} if ident is not None else {"resource": what})


class Conflict(DomainError):
    status, code = 409, "conflict"


class DuplicateSku(Conflict):
    code = "duplicate_sku"


class ProductHasActiveHolds(Conflict):
    code = "product_has_active_holds"


class StockBelowReserved(Conflict):
    code = "stock_below_reserved"

    def __init__(self, variant_id: int, available: int, delta: int):
        super().__init__(
            f"Adjustment of {delta} would make available negative (available {available})",
            {"variant_id": variant_id, "available": available, "delta": delta},
        )


class InsufficientStock(DomainError):
    status, code = 400, "insufficient_stock"

    def __init__(self, variant_id: int, available: int, requested: int):
        super().__init__(
            f"Only {available} units available, requested {requested}",
            {"available": available, "requested": requested, "variant_id": variant_id},
        )
        self.variant_id, self.available, self.requested = variant_id, available, requested


class LimitExceeded(DomainError):
    status, code = 400, "limit_exceeded"

    def __init__(self, variant_id: int, limit: int, already: int, requested: int):
        super().__init__(
            f"At most {limit} units of this item per customer; {already} already held or ordered, "
            f"requested {requested}",
            {"variant_id": variant_id, "limit": limit, "already": already, "requested": requested},
        )


class ProductNotActive(DomainError):
    status, code = 400, "product_not_active"


class PriceChanged(Conflict):
    code = "price_changed"


class EmptyCart(DomainError):
    status, code = 400, "empty_cart"


class ReservationExpired(DomainError):
    status, code = 410, "reservation_expired"

    def __init__(self, item_ids: list[str]):
        super().__init__(
            "Some reservations in the cart have expired", {"expired_item_ids": list(item_ids)}
        )
        self.item_ids = list(item_ids)


class CheckoutInProgress(Conflict):
    """A hold is locked by a checkout that has not finished."""

    code = "checkout_in_progress"


class IdempotencyKeyReused(DomainError):
    status, code = 422, "idempotency_key_reused"

    def __init__(self):
        super().__init__("This Idempotency-Key was used for another request (another body, user or endpoint)")


class RequestInProgress(Conflict):
    code = "request_in_progress"

    def __init__(self, retry_after: int = 1):
        super().__init__("The first request with this Idempotency-Key is still running; retry shortly",
                         headers={"Retry-After": str(retry_after)})


class Unauthorized(DomainError):
    status, code = 401, "unauthorized"


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class Unavailable(DomainError):
    """A store (Redis or the database) cannot be reached."""

    status, code = 503, "unavailable"

    def __init__(self, what: str, retry_after: int = 2):
        super().__init__(f"{what} is unavailable, retry shortly", {"store": what},
                         headers={"Retry-After": str(retry_after)})
