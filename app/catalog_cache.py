"""The catalog version: what keys the per-process cache of what add-to-cart and pricing need from
the catalog (app.services.pricing).

Every catalog or pricing-rule write calls `bump(redis)` after its database commit; readers compare
the cached version with `inv:catalog-version` (one GET, pipelined with other reads) and drop the cache
when it moved, so nothing is priced from a stale rule after a change is acknowledged.
"""
from __future__ import annotations

from app import keys
from app.clock import now_ms

KEY = keys.catalog_version()


def bump(redis) -> int:
    """Mark the catalog (products, variants, categories, pricing rules) as changed."""
    return int(redis.incr(KEY))


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
