"""Idempotency-Key: a retry with the same key returns the first result and does nothing twice.

A key names one request: its endpoint (scope), its user and its body, together the request's
fingerprint. The same key sent with another fingerprint (another body, user or endpoint) is 422
`idempotency_key_reused` and runs nothing; a retry that arrives while the first request still runs
is 409 `request_in_progress` with Retry-After. Results (and 4xx refusals) are kept a day.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from app import keys
from app.errors import DomainError, IdempotencyKeyReused, RequestInProgress

PENDING_TTL_S = 60  # longer than any request; a crashed owner's marker lapses after this
RESULT_TTL_S = 24 * 3600
RETRY_AFTER_S = 1

Result = tuple[int, dict]


def fingerprint(scope: str, user: str, body: Any) -> str:
    """What a key stands for: the endpoint, the user and the request body, hashed."""
    raw = json.dumps([scope, user, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Idempotency:
    """Results of requests sent with an Idempotency-Key, kept in Redis for a day."""

    def __init__(self, redis):
        self.redis = redis

    def run_once(self, scope: str, user: str, key: str | None, body: Any, fn: Callable[[], Result],
                 durable: Callable[[], Result | None] | None = None) -> Result:
        """Run fn once per key; replay its result (or its 4xx error) on a retry of the same request.

        `durable` looks the result up in the database (checkout), for when Redis lost the marker
        or its owner died after committing.

        Raises:
            IdempotencyKeyReused: the key was used for another request.
            RequestInProgress: the first request with this key is still running.
        """
        if not key:
            return fn()
        rkey = keys.idempotency(key)
        mine = fingerprint(scope, user, body)
        if not self.redis.set(rkey, json.dumps({"fp": mine}), nx=True, ex=PENDING_TTL_S):
            return self._replay(rkey, mine, durable)
        if durable is not None:
            found = durable()
            if found is not None:
                self._store(rkey, mine, *found)
                return found
        try:
            status, result = fn()
        except DomainError as exc:
            if exc.status < 500:
                self._store(rkey, mine, exc.status, exc.body())
            else:
                self.redis.delete(rkey)
            raise
        except Exception:
            self.redis.delete(rkey)
            raise
        self._store(rkey, mine, status, result)
        return status, result

    def _store(self, rkey: str, fp: str, status: int, body: dict) -> None:
        self.redis.set(rkey, json.dumps({"fp": fp, "status": status, "body": body}, separators=(",", ":")),
                       ex=RESULT_TTL_S)

    def _replay(self, rkey: str, mine: str, durable) -> Result:
        raw = self.redis.get(rkey)
        if raw is None:
            # the first request failed and let the key go between our SET and GET: the client retries
            raise RequestInProgress(RETRY_AFTER_S)
        stored = json.loads(raw)
        if stored.get("fp") != mine:
            raise IdempotencyKeyReused()
        if "status" in stored:
            return stored["status"], stored["body"]
        if durable is not None:
            # still pending, but its owner may have died after committing: the database knows
            found = durable()
            if found is not None:
                return found
        raise RequestInProgress(RETRY_AFTER_S)
