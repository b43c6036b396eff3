"""Enqueues the sweeper and the reconciler on their intervals (rq-scheduler 0.14 on rq 3.0).

Job ids are fixed, so a restarted scheduler, or a second one started by mistake, replaces the
schedule instead of doubling it; rq-scheduler's own lock lets one scheduler enqueue at a time.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from rq_scheduler import Scheduler

from app.settings import Settings

log = logging.getLogger(__name__)

SWEEP_JOB_ID = "inventory-sweep"
RECONCILE_JOB_ID = "inventory-reconcile"


def rq_connection(settings: Settings):
    """rq needs a client that returns bytes."""
    from app.redis_client import make_redis

    return make_redis(settings, decode=False, timeout=10)


def make_scheduler(settings: Settings, poll_seconds: float = 1.0) -> Scheduler:
    from jobs.tasks import QUEUE

    return Scheduler(queue_name=QUEUE, connection=rq_connection(settings), interval=poll_seconds)


def install_schedule(scheduler: Scheduler, settings: Settings) -> None:
    """(Re)register the two periodic jobs under fixed ids."""
    from jobs.tasks import reconcile_job, sweep_job

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for job_id in (SWEEP_JOB_ID, RECONCILE_JOB_ID):
        scheduler.cancel(job_id)
    scheduler.schedule(now, sweep_job, id=SWEEP_JOB_ID, interval=settings.sweep_interval_seconds,
                       repeat=None, result_ttl=60, timeout=300, description="release lapsed holds")
    scheduler.schedule(now, reconcile_job, id=RECONCILE_JOB_ID, interval=settings.reconcile_interval_seconds,
                       repeat=None, result_ttl=600, timeout=1800, description="reconcile counters")
    log.info("scheduled sweep every %ss and reconcile every %ss", settings.sweep_interval_seconds,
             settings.reconcile_interval_seconds)


def run_scheduler(settings: Settings) -> None:
    """`inventory scheduler`: poll every second and enqueue what is due, until SIGTERM."""
    scheduler = make_scheduler(settings)
    install_schedule(scheduler, settings)
    scheduler.run()


def run_worker(settings: Settings, burst: bool = False) -> bool:
    """`inventory worker`: an rq worker on the inventory queue. Jobs are short and idempotent,
    so a SimpleWorker (no fork per job) keeps the sweeper's latency low."""
    from rq import Queue, SimpleWorker

    from jobs.tasks import QUEUE

    connection = rq_connection(settings)
    worker = SimpleWorker([Queue(QUEUE, connection=connection)], connection=connection)
    return worker.work(burst=burst, with_scheduler=False)
