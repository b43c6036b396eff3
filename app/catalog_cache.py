"""A per-process cache of what add-to-cart and pricing need from the catalog.

Every catalog or pricing-rule write calls `bump(redis)` after its database commit; readers compare
the cached version with `inv:catalog-version` (one GET, pipelined with other reads) and drop the cache
when it moved, so nothing is priced from a stale rule after a change is acknowledged.
"""
from __future__ import annotations

from app import keys


def bump(redis) -> int:
    """Mark the catalog (products, variants, categories, pricing rules) as changed."""
    return int(redis.incr(keys.catalog_version()))
