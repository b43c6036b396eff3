"""rq jobs. Module-level functions taking plain values, idempotent, built from the composition root."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict

from redis.exceptions import LockError

from app import keys
from app.composition import Container, build_container

log = logging.getLogger(__name__)

QUEUE = "inventory"
# The longest each job may run: rq stops it there (the scheduler enqueues it with this timeout),
# and its lock outlives it by a margin, so a second sweeper or reconciler can never start beside a
# slow first one whose lock lapsed mid-run.
SWEEP_TIMEOUT_S = 300
RECONCILE_TIMEOUT_S = 1800
LOCK_MARGIN_S = 60
_container: Container | None = None
_container_pid = -1


def container() -> Container:
    """This process's container, built once (again after a fork)."""
    if _container is None or _container_pid != os.getpid():
        use_container(build_container())
    return _container


def use_container(c: Container | None) -> None:
    """Make `c` this process's container (None: build one on next use)."""
    global _container, _container_pid
    _container, _container_pid = c, os.getpid()


def _only_one(redis, name: str, timeout_s: int):
    """redis-py's lock, not blocking: one sweeper / reconciler at a time across processes, a second
    one started by mistake skips; it frees only its own lock."""
    return redis.lock(name, timeout=timeout_s, blocking=False)


def _release(lock) -> None:
    try:
        lock.release()
    except LockError:  # it lapsed during a very long run: nothing of ours to free
        log.warning("job lock %s had lapsed before the job ended", lock.name)


def sweep_job() -> dict:
    """Release every lapsed hold (the guarantee behind the expiry listener)."""
    c = container()
    lock = _only_one(c.redis, keys.sweep_lock(), SWEEP_TIMEOUT_S + LOCK_MARGIN_S)
    if not lock.acquire():
        log.info("sweep skipped: another sweep is running")
        return {"skipped": True}
    try:
        report = c.sweeper.sweep()
    finally:
        _release(lock)
    if report.holds:
        log.info("sweeper released %d hold(s), %d unit(s) over %d variant(s)", report.holds, report.units,
                 report.variants)
    return asdict(report)


def reconcile_job(dry_run: bool = False, variant_ids: list[int] | None = None) -> dict:
    """Compare and repair the live counters against the database."""
    c = container()
    lock = _only_one(c.redis, keys.reconcile_lock(), RECONCILE_TIMEOUT_S + LOCK_MARGIN_S)
    if not lock.acquire():
        log.info("reconcile skipped: another reconcile is running")
        return {"skipped": True}
    try:
        report = c.reconciler.reconcile(variant_ids, dry_run=dry_run)
    finally:
        _release(lock)
    if report.drifted:
        log.warning("reconciler found drift in %d variant(s), repaired %d", report.drifted, report.repaired)
    return report.as_dict()
