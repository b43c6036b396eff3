"""Every process type many times over: three web workers, two listeners, two workers and two
schedulers on one Redis give the same results as one of each: no unit released twice, no drift
repaired twice, every order written once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.composition import Container
from app.embedded import EmbeddedRedis, free_port
from app.settings import load_settings
from persistence.models import Order
from tests.conftest import wait_for
from tests.factories import make_variants, on_hand

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.single_node  # a private Redis of its own


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def stack(tmp_path, env, clean_stores):
    """A private Redis and, as subprocesses: gunicorn (3 workers), 2 listeners, 2 workers, 2 schedulers."""
    redis_server = EmbeddedRedis(tmp_path / "redis").start()
    port = free_port()
    child_env = {**os.environ, **env, "REDIS_URL": redis_server.url, "REDIS_CLUSTER": "0", "PORT": str(port),
                 "WEB_CONCURRENCY": "3", "HOLD_TTL_SECONDS": "3", "SWEEP_INTERVAL_SECONDS": "1",
                 "RECONCILE_INTERVAL_SECONDS": "2", "LOG_LEVEL": "INFO", "APP_ENV": "test"}
    child_env.pop("RQ_REDIS_URL", None)
    python = sys.executable
    commands = {
        "web": [python, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "app:create_app()"],
        **{f"listener-{i}": [python, "-m", "app.cli", "listen"] for i in (1, 2)},
        **{f"worker-{i}": [python, "-m", "app.cli", "worker"] for i in (1, 2)},
        **{f"scheduler-{i}": [python, "-m", "app.cli", "scheduler"] for i in (1, 2)},
    }
    logs, procs = {}, {}
    for name, cmd in commands.items():
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=logs[name].open("w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
    container = Container(load_settings({**env, "REDIS_URL": redis_server.url, "REDIS_CLUSTER": "0"}))
    try:
        wait_for(lambda: _ready(port), timeout=30, interval=0.2, message="the web processes")
        yield port, container, logs, procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        container.close()
        redis_server.stop()


def test_doubled_processes_release_and_repair_exactly_once(stack):
    port, container, logs, procs = stack
    variants = make_variants(container.sessions, 6, on_hand=40)
    added, checked_out = [], []
    lock = threading.Lock()

    def shopper(n: int) -> None:
        for i in range(12):
            user = f"s{n}-{i}"
            status, body = _post(port, "/api/cart/add/", {"user_id": user, "variant_id": variants[(n + i) % 6],
                                                          "quantity": 1 + i % 3})
            assert status == 201, body
            with lock:
                added.append(body["item"]["quantity"])
            if i % 3 == 0:
                status, order = _post(port, f"/api/cart/{user}/checkout/", {})
                assert status == 201, order
                with lock:
                    checked_out.append(order)

    threads = [threading.Thread(target=shopper, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    sold = {v: 0 for v in variants}
    for order in checked_out:
        for item in order["items"]:
            sold[item["variant_id"]] += item["quantity"]

    # every hold that was not checked out lapses (TTL 3 s) and comes back exactly once
    def all_back() -> bool:
        counters = container.holds.counters(variants)
        return all(c.reserved == 0 and c.available == 40 - sold[v] for v, c in counters.items())

    wait_for(all_back, timeout=15, interval=0.2, message="every lapsed hold to come back once")
    with container.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Order)) == len(checked_out) == 24
    for v in variants:
        assert on_hand(container.sessions, v) == 40 - sold[v]

    # one drift, two workers and two schedulers: it is repaired once and the counters end exact
    container.redis.hincrby(f"inv:stock:{{v{variants[0]}}}", "available", 5)
    wait_for(lambda: container.holds.counters([variants[0]])[variants[0]].available == 40 - sold[variants[0]],
             timeout=15, interval=0.2, message="the reconciler to repair the drift")
    worker_logs = "".join(logs[f"worker-{i}"].read_text() for i in (1, 2))
    assert worker_logs.count("found drift in 1 variant") == 1, worker_logs[-3000:]
    assert all(c.available + c.reserved == on_hand(container.sessions, v)
               for v, c in container.holds.counters(variants).items())
    assert all(proc.poll() is None for proc in procs.values()), {n: p.poll() for n, p in procs.items()}
