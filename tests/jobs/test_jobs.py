"""rq jobs on a real Redis: the sweeper and reconciler jobs, their single-run lock, the schedule."""
from __future__ import annotations

import pytest
from rq import Queue

import jobs.tasks
from app import clock, keys
from jobs.scheduler import (RECONCILE_JOB_ID, SWEEP_JOB_ID, install_schedule, make_scheduler, rq_connection,
                            run_worker)
from jobs.tasks import LOCK_MARGIN_S, QUEUE, RECONCILE_TIMEOUT_S, SWEEP_TIMEOUT_S, reconcile_job, sweep_job
from tests.factories import make_variant


@pytest.fixture
def jobs_container(container):
    """The jobs use the test's container, as a worker process would use its own."""
    jobs.tasks.use_container(container)
    yield container
    jobs.tasks.use_container(None)


@pytest.fixture
def rq_redis(settings):
    r = rq_connection(settings)
    yield r
    r.close()


@pytest.fixture
def scheduler(settings):
    s = make_scheduler(settings)
    yield s
    s.connection.close()


def lapsed_holds(engine, vid, n=3) -> None:
    past = clock.now_ms() - 60_000
    for i in range(n):
        engine.reserve(vid, f"u{i}", 1, now=past, ttl_ms=1_000)


def available(engine, vid) -> int:
    return engine.counters([vid])[vid].available


# --- the schedule -------------------------------------------------------------------------------

def test_install_schedule_registers_the_sweeper_and_the_reconciler_under_fixed_ids(scheduler, settings):
    install_schedule(scheduler, settings)
    jobs_ = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs_) == {SWEEP_JOB_ID, RECONCILE_JOB_ID}
    assert jobs_[SWEEP_JOB_ID].func is sweep_job
    assert jobs_[RECONCILE_JOB_ID].func is reconcile_job
    assert jobs_[SWEEP_JOB_ID].meta["interval"] == settings.sweep_interval_seconds
    assert jobs_[RECONCILE_JOB_ID].meta["interval"] == settings.reconcile_interval_seconds


def test_installing_the_schedule_twice_leaves_two_jobs_not_four(scheduler, settings):
    install_schedule(scheduler, settings)
    install_schedule(scheduler, settings)
    second = make_scheduler(settings)  # a second scheduler process started by mistake
    try:
        install_schedule(second, settings)
    finally:
        second.connection.close()
    assert sorted(job.id for job in scheduler.get_jobs()) == sorted([SWEEP_JOB_ID, RECONCILE_JOB_ID])


def test_due_scheduled_jobs_are_enqueued_and_a_burst_worker_runs_them(
        jobs_container, scheduler, settings, sessions, rq_redis):
    engine = jobs_container.holds
    vid = make_variant(sessions, on_hand=5)
    lapsed_holds(engine, vid)
    install_schedule(scheduler, settings)
    scheduler.enqueue_jobs()
    queue = Queue(QUEUE, connection=rq_redis)
    assert sorted(queue.job_ids) == sorted([SWEEP_JOB_ID, RECONCILE_JOB_ID])
    run_worker(settings, burst=True)
    assert len(queue) == 0
    assert available(engine, vid) == 5
    assert queue.fetch_job(SWEEP_JOB_ID).return_value()["holds"] == 3
    assert queue.fetch_job(RECONCILE_JOB_ID).return_value()["drifted"] == 0
    assert sorted(job.id for job in scheduler.get_jobs()) == sorted([SWEEP_JOB_ID, RECONCILE_JOB_ID])


# --- the jobs -------------------------------------------------------------------------------------

def test_the_sweep_job_releases_lapsed_holds_through_an_rq_queue(jobs_container, sessions, rq_redis):
    engine = jobs_container.holds
    vid = make_variant(sessions, on_hand=5)
    engine.reserve(vid, "current", 1)  # first: a reserve reclaims the variant's lapsed holds
    lapsed_holds(engine, vid)
    job = Queue(QUEUE, connection=rq_redis, is_async=False).enqueue(sweep_job)
    assert job.return_value() == {"variants": 1, "holds": 3, "units": 3}
    assert available(engine, vid) == 4
    assert sweep_job() == {"variants": 0, "holds": 0, "units": 0}  # nothing else due yet


def test_the_reconcile_job_repairs_drift_and_in_a_dry_run_only_reports_it(
        jobs_container, sessions, redis_client):
    engine = jobs_container.holds
    a, b = make_variant(sessions, on_hand=5), make_variant(sessions, on_hand=5)
    engine.counters([a, b])
    for vid in (a, b):
        redis_client.hincrby(keys.stock(vid), "available", 2)
    dry = reconcile_job(dry_run=True)
    assert (dry["drifted"], dry["repaired"]) == (2, 0)
    assert available(engine, a) == 7
    report = reconcile_job(variant_ids=[a])
    assert (report["checked"], report["repaired"]) == (1, 1)
    assert (available(engine, a), available(engine, b)) == (5, 7)


def test_a_job_skips_while_another_run_holds_its_lock_and_frees_only_its_own(
        jobs_container, sessions, redis_client):
    engine = jobs_container.holds
    vid = make_variant(sessions, on_hand=5)
    lapsed_holds(engine, vid)
    redis_client.set(keys.sweep_lock(), "someone-else", px=60_000)
    redis_client.set(keys.reconcile_lock(), "someone-else", px=60_000)
    assert sweep_job() == {"skipped": True}
    assert reconcile_job() == {"skipped": True}
    assert available(engine, vid) == 2
    assert redis_client.get(keys.sweep_lock()) == "someone-else"

    redis_client.delete(keys.sweep_lock(), keys.reconcile_lock())
    assert sweep_job()["holds"] == 3
    assert reconcile_job()["checked"] == 1
    assert redis_client.exists(keys.sweep_lock(), keys.reconcile_lock()) == 0


def test_each_jobs_lock_outlives_the_longest_the_job_may_run(jobs_container, scheduler, settings, redis_client,
                                                             monkeypatch):
    install_schedule(scheduler, settings)
    timeouts = {job.id: job.timeout for job in scheduler.get_jobs()}
    assert timeouts == {SWEEP_JOB_ID: SWEEP_TIMEOUT_S, RECONCILE_JOB_ID: RECONCILE_TIMEOUT_S}
    lock_left_ms = {}
    for part, method, lock in ((jobs_container.sweeper, "sweep", keys.sweep_lock()),
                               (jobs_container.reconciler, "reconcile", keys.reconcile_lock())):
        real = getattr(part, method)

        def watching(*args, _real=real, _lock=lock, _name=method, **kwargs):
            lock_left_ms[_name] = redis_client.pttl(_lock)  # read while the job runs under its lock
            return _real(*args, **kwargs)

        monkeypatch.setattr(part, method, watching)
    sweep_job()
    reconcile_job()
    assert SWEEP_TIMEOUT_S * 1000 < lock_left_ms["sweep"] <= (SWEEP_TIMEOUT_S + LOCK_MARGIN_S) * 1000
    assert RECONCILE_TIMEOUT_S * 1000 < lock_left_ms["reconcile"] <= (RECONCILE_TIMEOUT_S + LOCK_MARGIN_S) * 1000


def test_a_job_builds_its_container_from_the_environment_when_none_was_set(
        settings, monkeypatch, env, sessions):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    jobs.tasks.use_container(None)
    try:
        assert jobs.tasks.container().settings.redis_url == settings.redis_url
        assert sweep_job() == {"variants": 0, "holds": 0, "units": 0}
    finally:
        jobs.tasks.container().close()
        jobs.tasks.use_container(None)


def test_a_scheduler_puts_back_a_schedule_lost_with_an_emptied_redis(scheduler, settings, rq_redis):
    from jobs.scheduler import schedule_present, scheduler_tick

    install_schedule(scheduler, settings)
    rq_redis.flushdb()  # Redis restarted without persistence
    assert not schedule_present(scheduler)
    scheduler_tick(scheduler, settings)
    assert schedule_present(scheduler)
    assert {job.id for job in scheduler.get_jobs()} == {SWEEP_JOB_ID, RECONCILE_JOB_ID}


def test_two_schedulers_ticking_together_enqueue_each_due_job_once(settings, rq_redis):
    from jobs.scheduler import scheduler_tick

    first, second = make_scheduler(settings), make_scheduler(settings)
    install_schedule(first, settings)
    enqueued = scheduler_tick(first, settings) + scheduler_tick(second, settings)
    assert enqueued == 2  # the sweep and the reconcile, due now, once each
    assert len(Queue(QUEUE, connection=rq_redis)) == 2
