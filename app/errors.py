"""Domain errors. Each carries its data; exactly one place (app.api.errors) turns them into HTTP."""
from __future__ import annotations

import re
from typing import Any

from redis import exceptions as redis_exceptions


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
            f"At most {limit} units of this item per customer; {already} already held or ordered, requested {requested}",
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


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"


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


# --- Redis refusing or unreachable ------------------------------------------------------------

# Error replies with which Redis refuses a command because of the state it is in (memory full, too
# few replicas, a replica or a replica cut off from its primary, loading its dataset, running a
# script, persistence failing, the cluster down or resharding), not because of the command: an
# outage to retry after, like a server that cannot be reached. Any other error reply (WRONGTYPE,
# a script's own error, NOSCRIPT, NOPERM, ...) is a bug, not an outage.
# NOTBUSY is not one: it is the answer to SCRIPT KILL when no script runs.
REDIS_REFUSALS = frozenset({
    "OOM",          # used memory above maxmemory under noeviction: writes refused
    "NOREPLICAS",   # fewer replicas than min-replicas-to-write: writes refused
    "READONLY",     # a read-only replica: writes refused
    "MASTERDOWN",   # a replica whose link to its primary is down, replica-serve-stale-data no
    "LOADING",      # loading its dataset after a restart or a full sync
    "BUSY",         # a script or function ran past busy-reply-threshold
    "MISCONF",      # the last background save failed with stop-writes-on-bgsave-error yes
    "UNBLOCKED",    # a blocked command ended by a role change (primary to replica)
    "CLUSTERDOWN",  # the cluster is down
    "TRYAGAIN",     # a multi-key command during resharding
})

# redis-py's prefix on an error it raises for a command of a pipeline (raise_on_error=True)
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.DOTALL)


def redis_error_code(exc: BaseException) -> str | None:
    """The code of a Redis error reply (its first word: "OOM", "NOREPLICAS", "WRONGTYPE", ...), or
    None when `exc` is not an error reply. redis-py keeps the code at the start of the message of a
    plain `ResponseError` ("NOREPLICAS Not enough good replicas to write."); for the codes it has a
    class for (OOM, READONLY, LOADING, MASTERDOWN, ...) it strips it into `status_code`."""
    if not isinstance(exc, redis_exceptions.RedisError):
        return None
    status = getattr(exc, "status_code", None)
    if isinstance(status, str) and status:
        return status
    if not isinstance(exc, redis_exceptions.ResponseError):
        return None
    message = _PIPELINE_PREFIX.sub("", str(exc.args[0]) if exc.args else "", count=1)
    first = message.split(" ", 1)[0]
    return first if first.isupper() else None


def store_refusal(exc: BaseException) -> bool:
    """True when `exc` says Redis cannot be reached (connection refused or lost, a timeout) or
    refuses work for the state it is in (`REDIS_REFUSALS`): an outage, answered 503 `unavailable`
    with Retry-After (API.md). False for anything else, other error replies included."""
    if isinstance(exc, (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError,
                        redis_exceptions.ClusterDownError, redis_exceptions.TryAgainError,
                        redis_exceptions.ReadOnlyError, redis_exceptions.OutOfMemoryError,
                        redis_exceptions.SlotNotCoveredError)):
        return True
    if isinstance(exc, redis_exceptions.ResponseError):
        return redis_error_code(exc) in REDIS_REFUSALS
    return False
