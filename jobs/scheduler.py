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
    """The queue's Redis, with a client that returns bytes. rq cannot run on a Redis Cluster (its
    keys span slots), so with REDIS_CLUSTER=1 the queue lives on a standalone Redis: RQ_REDIS_URL.
    It holds only the queue and the schedule; stock, holds and carts stay on the cluster."""
    from app.redis_client import make_redis
    from app.settings import SettingsError

    if settings.rq_redis_url:
        return make_redis(settings.with_(redis_url=settings.rq_redis_url, redis_cluster=False, redis_sentinels=()),
                          decode=False, timeout=10)
    if settings.redis_cluster:
        raise SettingsError("REDIS_CLUSTER=1 needs RQ_REDIS_URL: a standalone Redis for the rq queue "
                            "(rq cannot use a cluster)")
    return make_redis(settings, decode=False, timeout=10)


def make_scheduler(settings: Settings, poll_seconds: float = 1.0) -> Scheduler:
    from jobs.tasks import QUEUE

    return Scheduler(queue_name=QUEUE, connection=rq_connection(settings), interval=poll_seconds)


def install_schedule(scheduler: Scheduler, settings: Settings) -> None:
    """(Re)register the two periodic jobs under fixed ids."""
    from jobs.tasks import RECONCILE_TIMEOUT_S, SWEEP_TIMEOUT_S, reconcile_job, sweep_job

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for job_id in (SWEEP_JOB_ID, RECONCILE_JOB_ID):
        scheduler.cancel(job_id)
    scheduler.schedule(now, sweep_job, id=SWEEP_JOB_ID, interval=settings.sweep_interval_seconds,
                       repeat=None, result_ttl=60, timeout=SWEEP_TIMEOUT_S, description="release lapsed holds")
    scheduler.schedule(now, reconcile_job, id=RECONCILE_JOB_ID, interval=settings.reconcile_interval_seconds,
                       repeat=None, result_ttl=600, timeout=RECONCILE_TIMEOUT_S, description="reconcile counters")
    log.info("scheduled sweep every %ss and reconcile every %ss", settings.sweep_interval_seconds,
             settings.reconcile_interval_seconds)


def schedule_present(scheduler: Scheduler) -> bool:
    """Both periodic jobs are in the schedule (a Redis restarted without persistence loses them)."""
    key = scheduler.scheduled_jobs_key
    return all(scheduler.connection.zscore(key, job_id) is not None
               for job_id in (SWEEP_JOB_ID, RECONCILE_JOB_ID))


def scheduler_tick(scheduler: Scheduler, settings: Settings) -> int:
    """One pass: put the schedule back if it was lost, then enqueue what is due (under rq-scheduler's
    lock, so two schedulers started by mistake never enqueue twice). Returns jobs enqueued."""
    if not schedule_present(scheduler):
        log.warning("the schedule was missing (Redis restarted empty?): installing it again")
        install_schedule(scheduler, settings)
    enqueued = 0
    if scheduler.acquire_lock():
        try:
            due = list(scheduler.get_jobs_to_queue())
            for job in due:
                scheduler.enqueue_job(job)
            enqueued = len(due)
        finally:
            scheduler.remove_lock()
    scheduler.heartbeat()
    return enqueued


def run_scheduler(settings: Settings, stop=None) -> None:
    """`inventory scheduler`: every second, enqueue what is due; survives Redis going away."""
    import signal
    import threading

    import redis as redis_lib

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    scheduler = make_scheduler(settings)
    backoff = 0.5
    log.info("scheduler started: sweep every %ss, reconcile every %ss", settings.sweep_interval_seconds,
             settings.reconcile_interval_seconds)
    while not stop.is_set():
        try:
            scheduler_tick(scheduler, settings)
            backoff = 0.5
            stop.wait(1.0)
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            log.warning("scheduler lost Redis (%s); retrying in %.1fs", type(exc).__name__, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10)
    log.info("scheduler stopped")


def run_worker(settings: Settings, burst: bool = False) -> bool:
    """`inventory worker`: an rq worker on the inventory queue. Jobs are short and idempotent,
    so a SimpleWorker (no fork per job) keeps the sweeper's latency low. rq's worker gives up when
    Redis goes away under a running job; a fresh one is started once Redis answers again, unless
    SIGTERM or SIGINT asked it to stop (then it finishes the job it runs and exits)."""
    import signal
    import threading

    import redis as redis_lib
    from rq import Queue, SimpleWorker
    from rq.exceptions import StopRequested

    from jobs.tasks import QUEUE

    stop = threading.Event()

    class Worker(SimpleWorker):
        """rq's SimpleWorker, stopped by SIGTERM/SIGINT without raising out of the signal handler
        except while it waits for a job: rq's handler raises StopRequested wherever the worker is,
        and when that is in rq's own bookkeeping right after a job, a bare `except` there takes it
        and the worker goes back to waiting (405 s) for the next job, until it is killed."""

        waiting = False

        def _install_signal_handlers(self):
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._stop_soon)

        def _stop_soon(self, signum, _frame):
            if not stop.is_set():  # `make run` delivers a Ctrl-C twice, and the runner a SIGTERM
                self.log.info("Worker %s: stopping (%s)", self.name, signal.Signals(signum).name)
            stop.set()
            self._stop_requested = True  # rq's loop checks it before it waits for the next job
            if self.waiting:
                raise StopRequested()  # ends the wait; rq's loop takes it and stops

        def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
            if stop.is_set():
                return None  # rq's loop stops on it
            self.waiting = True
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            finally:
                self.waiting = False

        def subscribe(self):
            # rq's command thread must not take SIGINT/SIGTERM: a signal the kernel hands to it
            # leaves the main thread asleep in its wait for a job (405 s), the handler not run.
            # A thread starts with its creator's signal mask: blocked while it is made.
            signals = {signal.SIGINT, signal.SIGTERM}
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
            try:
                super().subscribe()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

        def unsubscribe(self):
            # rq's command thread waits up to 60 s for a message; told to stop first, the reply to
            # UNSUBSCRIBE ends that wait, and the join does not take rq's 1 s
            if self.pubsub_thread:
                self.pubsub_thread.stop()
            super().unsubscribe()

    def stop_on_signals() -> None:
        # until a worker installs rq's handlers, and after one died (its handlers would act on a
        # worker that is gone), a signal only stops this loop
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())

    stop_on_signals()
    backoff = 0.5
    while not stop.is_set():
        try:
            connection = rq_connection(settings)
            worker = Worker([Queue(QUEUE, connection=connection)], connection=connection)
            return worker.work(burst=burst, with_scheduler=False)
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            if burst:
                raise
            if stop.is_set():
                break
            stop_on_signals()
            log.warning("worker lost Redis (%s); starting a new worker in %.1fs", type(exc).__name__, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10)
    log.info("worker stopped")
    return False
