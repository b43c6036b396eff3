"""Which Redis failures are an outage (503 `unavailable`, retry later) and which are bugs.

Redis refuses a command for the state it is in (memory full, too few replicas, a replica, loading
its dataset, running a script, the cluster down) with an error reply; a server that cannot be
reached raises a connection error or a timeout (redis-py's Sentinel errors, MasterNotFoundError
while no sentinel names a healthy primary and the ConnectionError it raises for a primary demoted to
replica, are ConnectionErrors too). Both are outages. Any other error reply (WRONGTYPE,
a script's own error, NOPERM, ...) is a bug and stays a 500.
"""
from __future__ import annotations

import re

from redis import exceptions as redis_exceptions

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
                        redis_exceptions.SlotNotCoveredError,
                        redis_exceptions.AskError)):  # MOVED / ASK still, after the redirects followed
        return True
    if isinstance(exc, redis_exceptions.ResponseError):
        return redis_error_code(exc) in REDIS_REFUSALS
    return False
