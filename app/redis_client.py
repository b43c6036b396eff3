"""Redis connections: one client per process, single node, cluster (REDIS_CLUSTER) or the primary
that Redis Sentinel names (REDIS_SENTINELS)."""
from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.settings import Settings


def make_redis(settings: Settings, *, decode: bool = True, timeout: float = 5.0):
    """A client for REDIS_URL; a RedisCluster client when REDIS_CLUSTER=1; with REDIS_SENTINELS, a
    client of the primary the sentinels name (found again after a failover)."""
    if not settings.redis_configured:
        raise RuntimeError("REDIS_URL is not set (inventory run starts an embedded Redis and sets it)")
    common = dict(
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        # No silent re-sends: a reserve script sent twice would reserve twice. A failed call
        # surfaces as 503 and the client retries with its Idempotency-Key. (On a cluster,
        # redirections are still followed: they did not run.)
        retry=Retry(NoBackoff(), 0),
    )
    if settings.redis_sentinels:
        return _sentinel_primary(settings, common, timeout)
    if settings.redis_cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(settings.redis_url, **common)
    return redis.Redis.from_url(settings.redis_url, **common)


def _sentinel_primary(settings: Settings, common: dict, timeout: float):
    """`Sentinel(...).master_for(service)`: every new connection asks the sentinels for the current
    primary, and a connection to a primary demoted to replica (READONLY) is dropped and raised as a
    ConnectionError, so a failover surfaces as 503 `unavailable` until the new primary answers.

    REDIS_URL, when set beside REDIS_SENTINELS, gives only the db number, user, password and TLS
    (rediss://) of the primary; its host and port are not used. The sentinels themselves are asked
    without a password (their socket timeouts are the same)."""
    from redis.connection import SSLConnection, parse_url
    from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

    kwargs = dict(common)
    if settings.redis_url:
        parsed = parse_url(settings.redis_url)
        for name in ("db", "username", "password"):
            if parsed.get(name) is not None:
                kwargs[name] = parsed[name]
        if parsed.get("connection_class") is SSLConnection:
            kwargs["connection_class"] = SentinelManagedSSLConnection
    kwargs.setdefault("connection_class", SentinelManagedConnection)
    sentinel = Sentinel(list(settings.redis_sentinels),
                        sentinel_kwargs={"socket_timeout": min(timeout, 1.0),
                                         "socket_connect_timeout": min(timeout, 1.0)})
    return sentinel.master_for(settings.redis_sentinel_service, **kwargs)
