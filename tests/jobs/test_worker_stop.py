"""`inventory worker` stops on SIGTERM, also when its Redis went away first (as when `inventory
run` stops the embedded Redis beside it), instead of starting a new worker against a dead server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis as redis_lib

from app.embedded import EmbeddedRedis
from tests.conftest import wait_for


@pytest.fixture
def private_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def start_worker(redis_url: str, database_url: str, log_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "RQ_REDIS_URL")}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, APP_ENV="test", LOG_LEVEL="INFO",
               REDIS_CLUSTER="0")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def registered_workers(url: str) -> int:
    try:
        return len(redis_lib.Redis.from_url(url).smembers("rq:workers"))
    except redis_lib.ConnectionError:
        return 0


@pytest.mark.single_node
@pytest.mark.parametrize("redis_gone_first", [False, True], ids=["redis-up", "redis-gone-first"])
def test_a_worker_stops_on_sigterm_within_seconds(private_redis, database_url, tmp_path, redis_gone_first):
    log = tmp_path / "worker.log"
    worker = start_worker(private_redis.url, database_url, log)
    try:
        wait_for(lambda: registered_workers(private_redis.url) == 1, timeout=30, message="the worker to register")
        if redis_gone_first:
            private_redis.stop()
            wait_for(lambda: any(m in log.read_text() for m in ("lost Redis", "could not connect to Redis"))
                     or worker.poll() is not None, timeout=30,
                     message="the worker to notice Redis is gone")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == 0, log.read_text()[-2000:]
    assert took < 5, f"took {took:.1f}s to stop"
    assert "Traceback" not in log.read_text()
