"""Redis connections: one client per process, single node or cluster (REDIS_CLUSTER)."""
from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.settings import Settings


def make_redis(settings: Settings, *, decode: bool = True, timeout: float = 5.0):
    """A client for REDIS_URL; a RedisCluster client when REDIS_CLUSTER=1."""
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (inventory run starts an embedded Redis and sets it)")
    common = dict(
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    if settings.redis_cluster:
        from redis.cluster import RedisCluster

        # No silent re-sends here either (redirections are still followed: they did not run).
        return RedisCluster.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0),
                                     **common)
    return redis.Redis.from_url(
        settings.redis_url,
        # No silent re-sends: a reserve script sent twice would reserve twice. A failed call
        # surfaces as 503 and the client retries with its Idempotency-Key.
        retry=Retry(NoBackoff(), 0),
        **common,
    )
