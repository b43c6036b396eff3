"""rq jobs. Module-level functions taking plain values, idempotent, built from the composition root."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict

from redis.exceptions import LockError

from app import clock, keys
from app.composition import Container, build_container
from app.metrics import count_store_error, store_of

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


def _record_success(c: Container, job: str, **done: int) -> None:
    """The job's last success and what it did, for the ops summary and /metrics (no TTL: an old
    time is the news)."""
    c.runner.run([("HSET", keys.job_status(job), "at_ms", clock.now_ms(),
                   *[x for kv in done.items() for x in kv])])


def _counted(fn):
    """Run a job's body; a store failure is counted in inventory_store_errors_total and re-raised
    (rq records the job as failed)."""
    try:
        return fn()
    except Exception as exc:
        store = store_of(exc)
        if store:
            count_store_error(store)
        raise


def sweep_job() -> dict:
    """Release every lapsed hold (the guarantee behind the expiry listener)."""
    return _counted(_sweep)


def _sweep() -> dict:
    c = container()
    lock = _only_one(c.redis, keys.sweep_lock(), SWEEP_TIMEOUT_S + LOCK_MARGIN_S)
    if not lock.acquire():
        log.info("sweep skipped: another sweep is running")
        return {"skipped": True}
    try:
        report = c.sweeper.sweep()
    finally:
        _release(lock)
    _record_success(c, "sweep", released=report.holds)
    if report.holds:
        log.info("sweeper released %d hold(s), %d unit(s) over %d variant(s)", report.holds, report.units,
                 report.variants)
    return asdict(report)


def reconcile_job(dry_run: bool = False, variant_ids: list[int] | None = None) -> dict:
    """Compare and repair the live counters against the database."""
    return _counted(lambda: _reconcile(dry_run, variant_ids))


def _reconcile(dry_run: bool, variant_ids: list[int] | None) -> dict:
    c = container()
    lock = _only_one(c.redis, keys.reconcile_lock(), RECONCILE_TIMEOUT_S + LOCK_MARGIN_S)
    if not lock.acquire():
        log.info("reconcile skipped: another reconcile is running")
        return {"skipped": True}
    try:
        report = c.reconciler.reconcile(variant_ids, dry_run=dry_run)
    finally:
        _release(lock)
    if not dry_run and variant_ids is None:  # only a full repairing pass vouches for every variant
        _record_success(c, "reconcile", drifted=report.drifted, repaired=report.repaired)
    if report.drifted:
        log.warning("reconciler found drift in %d variant(s), repaired %d", report.drifted, report.repaired)
    return report.as_dict()
