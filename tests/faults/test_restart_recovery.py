"""Redis restarted under a real multi-worker gunicorn: once /readyz answers 200 again, every request
succeeds on every worker, with no failed request first; while Redis loads its data, a request is
refused with 503, never a 500.

The web server is the real command line (app/runner.py's, with app/gunicorn_conf.py and
WEB_CONCURRENCY=4) with gunicorn's access log turned on, so each answer is attributed to the worker
pid that gave it. Every worker is warmed first (it has answered an add, so its redis-py pool
connection and its lane are connected); then the private redis-server is stopped (SIGTERM) and
started again on the same port: empty, with its data (AOF), or with its data loaded slowly.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.embedded import EmbeddedRedis, free_port
from app.runner import child_commands
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.faults.conftest import PYTHON, raw_redis

pytestmark = pytest.mark.single_node

WORKERS = 4
ON_HAND = 500
ACCESS_FORMAT = "ACCESS %(p)s %(s)s %(m)s %(U)s"
_ACCESS = re.compile(r"^ACCESS <(\d+)> (\d{3}) (\S+) (\S+)$", re.M)
_BOOTED = re.compile(r"Booting worker with pid: (\d+)")


def web_command() -> list[str]:
    """`inventory run`'s web command line, with gunicorn's access log on stdout."""
    argv = next(c.argv for c in child_commands(PYTHON) if c.name == "web")
    return [*argv[:-1], "--access-logfile", "-", "--access-logformat", ACCESS_FORMAT, argv[-1]]


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request on a fresh connection (gunicorn's sync workers close each one after the answer)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _ready(port: int) -> bool:
    try:
        return _request(port, "GET", "/readyz")[0] == 200
    except OSError:
        return False


class Web:
    """The gunicorn master (a child of the test) and what its log says."""

    def __init__(self, proc, port: int):
        self.proc = proc
        self.port = port

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        return {int(p) for p in _BOOTED.findall(self.log())}

    def answers(self) -> list[tuple[int, int, str, str]]:
        """(pid, status, method, path) of every request so far, in order."""
        return [(int(p), int(s), m, u) for p, s, m, u in _ACCESS.findall(self.log())]

    def add(self, user: str, variant_id: int) -> tuple[int, dict]:
        return _request(self.port, "POST", "/api/cart/add/",
                        {"user_id": user, "variant_id": variant_id, "quantity": 1})

    def adds_since(self, mark: int) -> list[tuple[int, int]]:
        """(pid, status) of the adds answered after the first `mark` requests."""
        return [(pid, status) for pid, status, _m, path in self.answers()[mark:] if path == "/api/cart/add/"]

    def logged_since(self, mark: int, path: str, at_least: int = 1) -> list[tuple[int, int]]:
        """(pid, status) of the requests to `path` after the first `mark`, once at least `at_least`
        are in the log (a worker writes its access line just after the answer has gone out)."""
        def found():
            rows = [(pid, status) for pid, status, _m, p in self.answers()[mark:] if p == path]
            return rows if len(rows) >= at_least else None

        return wait_for(found, timeout=10, message=f"{at_least} access line(s) of {path}")


@pytest.fixture
def web_stack(base_env, build, own_redis, processes):
    """start(persist) -> (web, redis server, container): a private redis-server, the private
    database of the fault tests, and gunicorn with WEB_CONCURRENCY workers on a free port."""

    def start(persist: bool):
        server = own_redis(persist=persist)
        env = {**base_env, "REDIS_URL": server.url, "REDIS_CLUSTER": "0", "WEB_CONCURRENCY": str(WORKERS),
               "PORT": str(free_port()), "LOG_LEVEL": "INFO"}
        env.pop("RQ_REDIS_URL", None)
        _client, container = build(env)
        web = Web(processes.start("web", web_command(), env), int(env["PORT"]))
        wait_for(lambda: _ready(web.port) and len(web.workers()) == WORKERS, timeout=30, interval=0.1,
                 message="gunicorn with every worker booted")
        return web, server, container

    return start


def _shoppers(prefix: str, count: int, variants: list[int], users: list) -> list[tuple[str, int]]:
    """`count` new customers, one unit each, spread over the variants; recorded in `users`."""
    batch = [(f"{prefix}{i}", variants[(len(users) + i) % len(variants)]) for i in range(count)]
    users.extend(batch)
    return batch


def _until_every_worker_served(web: Web, mark: int, variants: list[int], users: list, prefix: str,
                               message: str) -> list[tuple[int, dict]]:
    """Adds eight at a time, on fresh connections, until every worker has answered one since `mark`."""
    answers = []
    workers = web.workers()
    with ThreadPoolExecutor(8) as pool:
        def served() -> bool:
            batch = _shoppers(f"{prefix}{len(users)}-", 8, variants, users)
            answers.extend(pool.map(lambda a: web.add(*a), batch))
            return workers <= {pid for pid, _status in web.adds_since(mark)}

        wait_for(served, timeout=60, interval=0, message=message)
    return answers


def _warm(web: Web, variants: list[int], users: list) -> None:
    answers = _until_every_worker_served(web, 0, variants, users, "warm", "an add answered by every worker")
    assert [status for status, _body in answers] == [201] * len(answers), answers


def _shop_at_once(web: Web, mark: int, variants: list[int], users: list) -> list[tuple[int, dict]]:
    """Right after /readyz answered 200: adds one after the other, then together, then more until
    every worker has served one (its first after the restart is the one that counts)."""
    answers = [web.add(user, vid) for user, vid in _shoppers("after", 4 * WORKERS, variants, users)]
    with ThreadPoolExecutor(4 * WORKERS) as pool:
        answers += pool.map(lambda a: web.add(*a), _shoppers("together", 4 * WORKERS, variants, users))
    answers += _until_every_worker_served(web, mark, variants, users, "more",
                                          "an add answered by every worker after the restart")
    return answers


def _assert_all_added(web: Web, mark: int, answers: list, readyz_workers: set) -> None:
    failed = [(status, body) for status, body in answers if status != 201]
    if failed:
        adds = web.logged_since(mark, "/api/cart/add/", len(answers))
        pytest.fail(
            f"{len(failed)} of {len(answers)} adds failed after /readyz answered 200; failures by worker: "
            f"{Counter(pid for pid, status in adds if status != 201)}, workers whose /readyz answered 200: "
            f"{readyz_workers}, first: {failed[0]}\n{web.log()[-6000:]}")


def _assert_exact(web: Web, variants: list[int], held: Counter) -> None:
    """available + reserved == on_hand through the API, and reserved is exactly the units held."""
    for vid in variants:
        status, row = _request(web.port, "GET", f"/api/inventory/{vid}/")
        assert status == 200, row
        assert row["available"] + row["reserved"] == row["on_hand"] == ON_HAND, row
        assert row["reserved"] == held[vid], (row, held[vid])


@pytest.mark.parametrize("persist", [False, True], ids=["empty", "with-its-data"])
def test_every_worker_serves_adds_at_once_after_redis_restarts(web_stack, own_redis, persist, capsys):
    web, server, container = web_stack(persist)
    variants = [make_variant(container.sessions, on_hand=ON_HAND) for _ in range(4)]
    warm_users: list = []
    _warm(web, variants, warm_users)
    mark = len(web.answers())

    stopped_at = time.monotonic()
    server = own_redis.restart(server, persist)  # SIGTERM (AOF flushed when kept), then up on the same port
    if persist:
        assert raw_redis(server.url).dbsize() > 0  # it came back with its data
    else:
        assert raw_redis(server.url).dbsize() == 0  # it came back empty: counters rebuilt from the database
    wait_for(lambda: _ready(web.port), timeout=15, interval=0.05, message="/readyz 200 after the restart")
    ready_after = time.monotonic() - stopped_at
    readyz_workers = {pid for pid, status in web.logged_since(mark, "/readyz") if status == 200}

    users: list = []
    answers = _shop_at_once(web, mark, variants, users)
    _assert_all_added(web, mark, answers, readyz_workers)
    assert web.workers() <= {pid for pid, _status in web.adds_since(mark)}

    held = Counter(vid for _user, vid in users + (warm_users if persist else []))
    _assert_exact(web, variants, held)
    with capsys.disabled():
        print(f"\n[redis restarted {'with its data' if persist else 'empty'}] {WORKERS} workers warmed by "
              f"{len(warm_users)} adds; /readyz 200 {ready_after:.2f}s after the stop (from "
              f"{len(readyz_workers)} worker(s)); then "
              f"{len(answers)} adds (sequential, concurrent) all 201 across "
              f"{len({p for p, _s in web.adds_since(mark)})} workers")


def test_while_a_restarted_redis_loads_its_data_adds_are_refused_with_503_never_500_then_all_succeed(
        web_stack, capsys):
    web, server, container = web_stack(True)
    variants = [make_variant(container.sessions, on_hand=ON_HAND) for _ in range(4)]
    warm_users: list = []
    _warm(web, variants, warm_users)
    admin = raw_redis(server.url)
    admin.mset({f"filler{i}": f"{i:<100}" for i in range(400)})  # enough to load slowly
    admin.bgrewriteaof()  # the data goes into the AOF's snapshot part, which key-load-delay slows down
    wait_for(lambda: not any(admin.info("persistence")[k] for k in ("aof_rewrite_in_progress",
                                                                       "aof_rewrite_scheduled")),
             timeout=15, message="the AOF rewrite")
    admin.close()

    during: list[tuple[int, int, dict]] = []  # (variant, status, body)
    stop = threading.Event()

    def shopper(n: int) -> None:
        i = 0
        while not stop.is_set():
            vid = variants[i % len(variants)]
            during.append((vid, *web.add(f"loading{n}-{i}", vid)))
            i += 1

    server.stop()
    slow = EmbeddedRedis(server.directory, port=server.port, persist=True, extra_args=[
        "--key-load-delay", "10000", "--loading-process-events-interval-bytes", "1024"])
    threads = [threading.Thread(target=shopper, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    try:
        slow.start(timeout=60)  # returns once it answers PING: its data is loaded
        stop.set()
        for t in threads:
            t.join(30)
        mark = len(web.answers())
        wait_for(lambda: _ready(web.port), timeout=15, interval=0.05, message="/readyz 200 once loaded")
        readyz_workers = {pid for pid, status in web.logged_since(mark, "/readyz") if status == 200}
        users: list = []
        answers = _shop_at_once(web, mark, variants, users)

        statuses = Counter(status for _vid, status, _body in during)
        assert statuses[500] == 0, [body for _vid, status, body in during if status == 500][:3]
        assert set(statuses) <= {201, 503}, statuses
        assert statuses[503] > 0, f"no add was refused: the restart was over before any was sent ({statuses})"
        assert all(body["error"]["code"] == "unavailable" for _vid, status, body in during if status == 503)
        _assert_all_added(web, mark, answers, readyz_workers)
        # held: the warm-up's holds (kept in the AOF), the adds answered 201 (those sent once the data
        # was loaded) and the ones after; a refused add held nothing
        held = Counter(vid for _user, vid in warm_users + users)
        held += Counter(vid for vid, status, _body in during if status == 201)
        _assert_exact(web, variants, held)
    finally:
        stop.set()
        slow.stop()
    with capsys.disabled():
        print(f"\n[redis restarted, loading its data slowly] adds while it loaded: {dict(statuses)}; then "
              f"{len(answers)} adds all 201 across {len({p for p, _s in web.adds_since(mark)})} workers")
