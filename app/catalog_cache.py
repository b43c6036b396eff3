"""The catalog version: what keys the per-process cache of what add-to-cart and pricing need from
the catalog (app.services.pricing).

Every catalog or pricing-rule write runs in `write(sessions, redis)`, which commits its transaction
and then calls `bump(redis)`; readers compare the cached version with `inv:catalog-version` (one GET,
pipelined with other reads) and drop the cache when it moved, so nothing is priced from a stale rule
after a change is acknowledged.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from app import keys
from app.clock import now_ms

KEY = keys.catalog_version()


def bump(redis) -> int:
    """Mark the catalog (products, variants, categories, pricing rules) as changed."""
    return int(redis.incr(KEY))


@contextmanager
def write(sessions, redis) -> Iterator:
    """The one way to write the catalog (products, variants, categories) or the pricing rules:
    `with catalog_cache.write(sessions, redis) as session:` opens a transaction, commits it when
    the block ends and then bumps the version. A block that raises rolls back and bumps nothing.

    Redis is pinged first: a write committed while Redis is down would lose its bump, and other
    processes would keep pricing and selling from their stale copies.
    """
    if redis is None:
        raise TypeError("a catalog write needs the Redis client that holds the catalog version")
    redis.ping()
    with sessions.begin() as session:
        yield session
    bump(redis)


def parse(raw) -> int | None:
    """The version from a GET of KEY (e.g. one riding in a pipeline); None when there is none."""
    return int(raw) if raw is not None else None


def read(redis) -> int | None:
    """The current version (one GET); None when the key does not exist."""
    return parse(redis.get(KEY))


def start(redis) -> int:
    """Create the version when it is missing (fresh or emptied Redis), so the cache works from the
    first request. It starts at the clock in ms, not 0, so a Redis that lost the key does not count
    back up through numbers an older cache was keyed by."""
    redis.set(KEY, now_ms(), nx=True)
    return int(redis.get(KEY))
