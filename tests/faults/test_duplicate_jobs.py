"""Two reconcilers and two sweepers at once (docker compose scaled by mistake): same result as one.

Each test builds the same mess (lapsed holds, checkouts crashed before and after their commit,
counters drifted and counters lost), lets the jobs loose on it, and compares with one of each.
"""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from app import faults, keys
from app.composition import Container
from app.settings import load_settings
from persistence.models import Order
from tests.conftest import wait_for
from tests.factories import make_variants
from tests.faults.conftest import assert_stock_exact


def _crash(point):
    def die():
        raise faults.SimulatedCrash(point)
    return die


def make_mess(client, c: Container, tag: str) -> list[int]:
    """Six variants of 20 units in every kind of disorder the jobs must repair."""
    vids = make_variants(c.sessions, 6, on_hand=20)
    # live holds that must survive
    for i, vid in enumerate(vids):
        assert client.post("/api/cart/add/", json={"user_id": f"{tag}live{i}", "variant_id": vid,
                                                   "quantity": 2}).status_code == 201
    # checkouts that crashed: two after their commit (to finish), one after the lock (to reverse)
    for n, point in enumerate(("checkout.after_commit", "checkout.after_commit", "checkout.after_lock")):
        user = f"{tag}crash{n}"
        for vid in vids[n * 2:n * 2 + 2]:
            assert client.post("/api/cart/add/", json={"user_id": user, "variant_id": vid,
                                                       "quantity": 3}).status_code == 201
        faults.inject(point, _crash(point))
        try:
            with pytest.raises(faults.SimulatedCrash):
                client.post(f"/api/cart/{user}/checkout/")
        finally:
            faults.clear()
    # holds that lapse with nobody listening (5 per variant)
    for vid in vids:
        for k in range(5):
            c.holds.reserve(vid, f"{tag}lapse{vid}-{k}", 1, ttl_ms=30)
    # counters that drifted, and counters that were lost
    c.redis.hincrby(keys.stock(vids[3]), "available", 5)
    c.redis.delete(keys.stock(vids[4]))
    time.sleep(0.05)  # the lapse ttl (30 ms); nothing to poll: no process is watching these holds
    return vids


def outcome(c: Container, vids: list[int], tag: str) -> tuple:
    """The state, named relative to the mess, so two messes can be compared."""
    state = assert_stock_exact(c, vids)
    with c.sessions() as s:
        orders = sorted(sorted((vids.index(l.variant_id), l.quantity) for l in o.lines)
                        for o in s.scalars(select(Order).where(Order.user_id.like(f"{tag}%"))))
    holds = c.holds.holds([(vid, f"{vid}~{tag}crash2") for vid in vids[4:6]])
    return tuple(state[v] for v in vids), tuple(map(tuple, orders)), tuple(h and h.state for h in holds)


def _settled(c: Container) -> None:
    c.sweeper.sweep()
    c.reconciler.reconcile(grace_ms=0)
    assert c.reconciler.reconcile(grace_ms=0, dry_run=True).drifted == 0


def test_two_reconcilers_and_two_sweepers_at_once_give_the_same_result_as_one(base_env, build, capsys):
    client, c = build(base_env)

    one = make_mess(client, c, "a")
    c.sweeper.sweep()
    c.reconciler.reconcile(grace_ms=0)
    _settled(c)
    expected = outcome(c, one, "a")

    two = make_mess(client, c, "b")
    workers = [Container(load_settings(base_env)) for _ in range(4)]  # own connections, like processes
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(container, job):
        try:
            barrier.wait(10)
            for _ in range(3):
                job(container)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    jobs = [lambda k: k.reconciler.reconcile(grace_ms=0), lambda k: k.reconciler.reconcile(grace_ms=0),
            lambda k: k.sweeper.sweep(), lambda k: k.sweeper.sweep()]
    threads = [threading.Thread(target=run, args=(w, j)) for w, j in zip(workers, jobs)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - started
    for w in workers:
        w.close()
    assert not errors, errors
    _settled(c)
    got = outcome(c, two, "b")
    assert got == expected
    # and what "one" means: finished orders complete, the reversed one is held again, nothing lost
    states, orders, crash_holds = got
    assert orders == (((0, 3), (1, 3)), ((2, 3), (3, 3)))
    assert crash_holds == ("held", "held")
    assert [s[2] for s in states] == [2, 2, 2, 2, 5, 5]  # live holds only (2 each, +3 reversed lock)
    with capsys.disabled():
        print(f"\n[2 reconcilers + 2 sweepers, 3 rounds each, threads] {took * 1000:.0f} ms; result identical to "
              f"one of each: {states}")


def test_duplicate_reconcile_and_sweep_processes_and_jobs_give_the_same_result(base_env, build, processes, capsys):
    env = {**base_env, "CHECKOUT_GRACE_SECONDS": "1"}
    client, c = build(env)
    reference = make_mess(client, c, "r")
    time.sleep(1.1)  # the crashed checkouts' locks pass CHECKOUT_GRACE_SECONDS (1 s, the minimum)
    c.sweeper.sweep()
    c.reconciler.reconcile()
    _settled(c)
    expected = outcome(c, reference, "r")

    vids = make_mess(client, c, "p")
    lock_time = time.monotonic()
    # the rq jobs, queued twice each, for two workers
    from rq import Queue

    from jobs.scheduler import rq_connection
    from jobs.tasks import QUEUE, reconcile_job, sweep_job

    queue = Queue(QUEUE, connection=rq_connection(c.settings))
    wait_for(lambda: time.monotonic() - lock_time > 1.1, timeout=3, message="the grace period")
    for job in (reconcile_job, reconcile_job, sweep_job, sweep_job):
        queue.enqueue(job)
    started = time.monotonic()
    procs = [processes.inventory("reconcile-1", "reconcile", env),
             processes.inventory("reconcile-2", "reconcile", env),
             processes.inventory("sweep-1", "sweep", env),
             processes.inventory("sweep-2", "sweep", env),
             processes.start("worker-1", [*processes_cmd("worker"), "--burst"], env),
             processes.start("worker-2", [*processes_cmd("worker"), "--burst"], env)]
    for proc in procs:
        proc.wait(60)
    took = time.monotonic() - started
    for proc in procs:
        assert proc.returncode == 0, proc.log_path.read_text()[-2000:]
    _settled(c)
    assert outcome(c, vids, "p") == expected
    with capsys.disabled():
        print(f"\n[2 x inventory reconcile, 2 x inventory sweep, 2 rq workers with each job queued twice] "
              f"all exited 0 in {took:.2f}s; result identical to one of each")


def processes_cmd(command: str) -> list[str]:
    from tests.faults.conftest import PYTHON

    return [PYTHON, "-m", "app.cli", command]
