"""rq jobs. Module-level functions taking plain values, idempotent, built from the composition root."""
from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import asdict

from app import keys
from app.composition import Container, build_container

log = logging.getLogger(__name__)

QUEUE = "inventory"
_container: Container | None = None


def container() -> Container:
    global _container
    if _container is None or _container_pid != os.getpid():
        _set(build_container())
    return _container


_container_pid = -1


def _set(c: Container) -> None:
    global _container, _container_pid
    _container, _container_pid = c, os.getpid()


class _JobLock:
    """One sweeper / reconciler at a time across processes; a second one started by mistake skips."""

    def __init__(self, redis, name: str, ttl_ms: int):
        self.redis, self.name, self.ttl_ms = redis, name, ttl_ms
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"

    def __enter__(self) -> bool:
        self.acquired = bool(self.redis.set(self.name, self.token, nx=True, px=self.ttl_ms))
        return self.acquired

    def __exit__(self, *exc):
        if self.acquired:
            # delete only our own lock
            self.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                            "return 0", 1, self.name, self.token)


def sweep_job() -> dict:
    """Release every lapsed hold (the guarantee behind the expiry listener)."""
    c = container()
    with _JobLock(c.redis, keys.sweep_lock(), 60_000) as acquired:
        if not acquired:
            log.info("sweep skipped: another sweep is running")
            return {"skipped": True}
        report = c.stock.sweep()
    if report.holds:
        log.info("sweeper released %d hold(s), %d unit(s) over %d variant(s)", report.holds, report.units,
                 report.variants)
    return asdict(report)


def reconcile_job(dry_run: bool = False, variant_ids: list[int] | None = None) -> dict:
    """Compare and repair the live counters against the database."""
    c = container()
    with _JobLock(c.redis, keys.reconcile_lock(), 15 * 60_000) as acquired:
        if not acquired:
            log.info("reconcile skipped: another reconcile is running")
            return {"skipped": True}
        report = c.stock.reconcile(variant_ids, dry_run=dry_run)
    if report.drifted:
        log.warning("reconciler found drift in %d variant(s), repaired %d", report.drifted, report.repaired)
    return report.as_dict()
