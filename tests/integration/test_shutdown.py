"""A quick, quiet stop: Ctrl-C on `inventory run` stops every process within STOP_BOUND_S without a
screen of connection errors, and SIGTERM stops a listener with exit code 0, even when its Redis
went away first (as on Ctrl-C, which reaches the embedded Redis at the same moment)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib

from app import keys
from app.embedded import EmbeddedRedis
from app.settings import ROOT
from tests.conftest import wait_for
from tests.processes import free_port, group_members, readyz

pytestmark = pytest.mark.single_node

_INVENTORY = Path(sys.executable).with_name("inventory")
INVENTORY = [str(_INVENTORY)] if _INVENTORY.exists() else [sys.executable, "-m", "app.cli"]
STOP_BOUND_S = 3.0  # what Ctrl-C on `make run` promises
JOB_STOP_BOUND_S = 3.0
_STORE_VARIABLES = ("REDIS_URL", "DATABASE_URL", "RQ_REDIS_URL", "REDIS_CLUSTER", "API_KEYS",
                    "PROMETHEUS_MULTIPROC_DIR", "REDIS_SENTINELS")
_CONNECTION_WORDS = ("lost Redis", "ConnectionError", "Connection refused", "Error 111")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STORE_VARIABLES}
    env.update(APP_ENV="development", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", **extra)
    return env


def _connection_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(w in line for w in _CONNECTION_WORDS)]


def _start_stack(tmp_path: Path):
    """`inventory run` in its own process group, once every child works; (process, stderr path,
    the embedded Redis's pid)."""
    cwd = tmp_path / "shop"
    cwd.mkdir()
    port = free_port()
    err = tmp_path / "stderr.log"
    with open(tmp_path / "stdout.log", "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([*INVENTORY, "run"], cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, start_new_session=True,
                                env=_env(PORT=str(port), DATABASE_URL=f"sqlite:///{tmp_path / 'shop.db'}",
                                         WEB_CONCURRENCY="2"))
    wait_for(lambda: proc.poll() is not None or readyz(port) == 200, 90, 0.25, "inventory run to be ready")
    assert proc.poll() is None, err.read_text()
    record = json.loads((cwd / "var" / "stack.json").read_text())
    client = redis_lib.Redis.from_url(record["stores"]["redis_url"])
    # every child up and working: the listener's heartbeat is written once it is subscribed
    wait_for(lambda: client.exists(keys.listener_heartbeat()), 30, 0.1, "the listener's heartbeat")
    client.close()
    redis_pid = next(p["pid"] for p in record["processes"] if p["name"] == "redis")
    return proc, err, redis_pid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cleanup(proc: subprocess.Popen, redis_pid: int | None) -> None:
    if group_members(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if redis_pid and _alive(redis_pid):
        os.kill(redis_pid, signal.SIGKILL)


def test_ctrl_c_stops_the_whole_stack_quietly_within_the_bound(tmp_path):
    proc, err, redis_pid = _start_stack(tmp_path)
    try:
        members = group_members(proc.pid)
        assert len(members) >= 5, members  # run, web (and its workers), listener, worker, scheduler
        # the embedded Redis is outside the group: Ctrl-C does not reach it, the runner stops it last
        assert not any(m.startswith(f"{redis_pid} ") for m in members)

        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        signalled = time.monotonic()
        proc.wait(30)
        wait_for(lambda: not group_members(proc.pid) and not _alive(redis_pid), 30, 0.02, "every process to exit")
        took = time.monotonic() - signalled
    finally:
        _cleanup(proc, redis_pid)
    text = err.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert took < STOP_BOUND_S, f"the stack took {took:.1f}s to stop:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert len(_connection_lines(text)) <= 2, "\n".join(_connection_lines(text))
    assert "did not stop within" not in text


def test_the_embedded_redis_does_not_outlive_a_killed_run(tmp_path):
    proc, _err, redis_pid = _start_stack(tmp_path)
    try:
        proc.kill()  # SIGKILL: the runner stops nothing itself
        proc.wait()
        wait_for(lambda: not _alive(redis_pid), 10, 0.05, "the embedded Redis to exit with its parent")
    finally:
        _cleanup(proc, redis_pid)


def _started(process: str, server: EmbeddedRedis, log: Path) -> bool:
    """The listener is subscribed (its heartbeat is written) or the scheduler has started."""
    if process == "scheduler":
        return "scheduler started" in log.read_text()
    with redis_lib.Redis.from_url(server.url) as client:
        return bool(client.exists(keys.listener_heartbeat()))


# process: (its command, what it logs when it lost Redis, and when it stopped)
_JOB_PROCESSES = {"listen": ("lost Redis", "listener stopped after"),
                  "scheduler": ("scheduler lost Redis", "scheduler stopped")}


@pytest.mark.parametrize("process", sorted(_JOB_PROCESSES))
@pytest.mark.parametrize("redis_first", [False, True], ids=["redis-up", "redis-gone-first"])
def test_sigterm_stops_the_listener_and_the_scheduler_with_exit_code_0(tmp_path, database_url, redis_first, process):
    lost, stopped = _JOB_PROCESSES[process]
    server = EmbeddedRedis(tmp_path / "redis").start()
    log = tmp_path / f"{process}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", process], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT,
                                env=_env(REDIS_URL=server.url, DATABASE_URL=database_url))
    try:
        wait_for(lambda: proc.poll() is not None or _started(process, server, log), 60, 0.1, f"{process} to start")
        assert proc.poll() is None, log.read_text()
        if redis_first:
            server.stop()
            # it notices: its connection fails, and it goes on trying to reconnect
            wait_for(lambda: lost in log.read_text(), 15, 0.05, f"{process} to notice")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert took < JOB_STOP_BOUND_S, f"{process} took {took:.1f}s to stop:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert stopped in text


@pytest.mark.parametrize("server", ["gunicorn-gthread", "granian", "gunicorn-sync"])
def test_sigterm_stops_the_web_server_after_its_requests_in_flight(tmp_path, env, container, sessions, server):
    """Under a stream of adds, SIGTERM: the server stops taking connections, answers what it took,
    and exits 0; every unit reserved is one a client was told it has (nothing cut half-way)."""
    import http.client
    import threading

    from app.webserver import web_command
    from tests.factories import make_variant

    vid = make_variant(sessions, on_hand=100_000)
    port = free_port()
    log = tmp_path / "web.log"
    child_env = {**_env(), **env, "PORT": str(port), "WEB_CONCURRENCY": "2", "WEB_SERVER": server}
    with open(log, "w") as out:
        proc = subprocess.Popen(web_command(sys.executable, child_env), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    statuses: list[int] = []
    stop = threading.Event()

    def shopper(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/api/cart/add/", body=json.dumps(
                    {"user_id": f"s{n}-{i}", "variant_id": vid, "quantity": 1}),
                    headers={"Content-Type": "application/json"})
                statuses.append(conn.getresponse().status)
            except (OSError, http.client.HTTPException):
                if proc.poll() is not None:
                    return  # the server is gone: nothing more to send
            finally:
                conn.close()

    try:
        wait_for(lambda: proc.poll() is not None or readyz(port) == 200, 60, 0.1, "the web server to be ready")
        assert proc.poll() is None, log.read_text()
        shoppers = [threading.Thread(target=shopper, args=(n,)) for n in range(8)]
        for t in shoppers:
            t.start()
        wait_for(lambda: statuses.count(201) >= 100, 30, 0.02, "100 adds served")
        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(30)
        took = time.monotonic() - signalled
        stop.set()
        for t in shoppers:
            t.join(15)
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert took < STOP_BOUND_S, f"the web server took {took:.1f}s to stop:\n{text[-3000:]}"
    assert set(statuses) <= {201, 429}, sorted(set(statuses))
    reserved = container.holds.counters([vid])[vid]
    assert reserved.reserved == statuses.count(201)
    assert reserved.available + reserved.reserved == 100_000
