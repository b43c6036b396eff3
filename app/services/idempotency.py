"""Idempotency-Key: a retry with the same key returns the first result and does nothing twice,
also when the two requests race (the second waits for the first's result)."""
from __future__ import annotations

import json
import time
from typing import Callable

from app import keys
from app.errors import DomainError, IdempotencyInProgress

PENDING = "pending"
PENDING_TTL_S = 60  # longer than any request; a crashed owner's marker lapses after this
RESULT_TTL_S = 24 * 3600
WAIT_S = 10.0

Result = tuple[int, dict]


class Idempotency:
    """Results of requests sent with an Idempotency-Key, kept in Redis for a day."""

    def __init__(self, redis):
        self.redis = redis

    def run_once(self, scope: str, user: str, key: str | None, fn: Callable[[], Result],
                 durable: Callable[[], Result | None] | None = None) -> Result:
        """Run fn once per (scope, user, key); replay its result (or its 4xx error) on a retry.

        `durable` looks the result up in the database (checkout), for when Redis lost the marker.
        """
        if not key:
            return fn()
        redis = self.redis
        rkey = keys.idempotency(scope, user, key)
        if not redis.set(rkey, PENDING, nx=True, ex=PENDING_TTL_S):
            return self._wait_for(rkey, durable)
        if durable is not None:
            found = durable()
            if found is not None:
                self._store(rkey, *found)
                return found
        try:
            status, body = fn()
        except DomainError as exc:
            if exc.status < 500:
                self._store(rkey, exc.status, exc.body())
            else:
                redis.delete(rkey)
            raise
        except Exception:
            redis.delete(rkey)
            raise
        self._store(rkey, status, body)
        return status, body

    def _store(self, rkey: str, status: int, body: dict) -> None:
        self.redis.set(rkey, json.dumps({"status": status, "body": body}, separators=(",", ":")), ex=RESULT_TTL_S)

    def _wait_for(self, rkey: str, durable) -> Result:
        deadline = time.monotonic() + WAIT_S
        delay = 0.005
        while True:
            raw = self.redis.get(rkey)
            if raw is not None and raw != PENDING:
                stored = json.loads(raw)
                return stored["status"], stored["body"]
            if durable is not None:
                # Also while the marker says pending: its owner may have died after committing (a
                # killed process, a lost connection), and the database knows the result.
                found = durable()
                if found is not None:
                    return found
            if raw is None or time.monotonic() > deadline:
                raise IdempotencyInProgress("A request with this Idempotency-Key is still being processed; retry",
                                            {"retry": True})
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
