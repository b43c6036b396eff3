"""Redis refusing commands, and Redis not answering in time: 503 `unavailable`, never a 500.

API.md: when Redis cannot be reached or refuses a write (an error reply such as OOM, NOREPLICAS,
READONLY, LOADING, MASTERDOWN), an endpoint that needs it answers 503 `unavailable` with a
`Retry-After` header, `/readyz` answers 503 meanwhile, and the service recovers by itself.

For each kind a private redis-server is made to answer that way for real (never a shared one):

| kind       | how                                                                   | refused       |
|------------|-----------------------------------------------------------------------|---------------|
| NOREPLICAS | CONFIG SET min-replicas-to-write 1, no replica attached               | writes        |
| OOM        | CONFIG SET maxmemory 1 under maxmemory-policy noeviction              | writes        |
| READONLY   | REPLICAOF a second private server holding a copy of the same data     | writes        |
| MASTERDOWN | REPLICAOF a port where nothing listens, replica-serve-stale-data no   | data commands |
| BUSY       | a script looping on its own connection past busy-reply-threshold      | everything    |
| LOADING    | restarted on its own dump, loading slowed down by key-load-delay      | everything    |
| timeout    | the server process stopped (SIGSTOP), the app's socket timeout 0.5 s  | everything    |
| refused    | the server stopped; only the inventory endpoints (see CASES)          | everything    |

One server and one app per kind (the app is never restarted); each test has its own variant and
customers. A test: a held line, then the fault; one request answers 503 with Retry-After, and the
app's "redis unavailable" warning, when it logs one, names the fault (a read that a server refusing
only writes can still serve may answer 200, with what it answered before). Then the fault is put
back: nothing changed in Redis or the database (after a timeout a command sent before it may still
run once the server resumes, so there the periodic reconcile runs and the counters must be exact
instead), and the same request succeeds.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib
from redis._parsers import BaseParser
from sqlalchemy import func, select

from app import create_app, keys
from app.composition import Container
from app.embedded import EmbeddedRedis, free_port
from app.engine.failures import store_refusal
from app.settings import load_settings
from persistence.models import OrderLine, Stock, StockMovement
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.faults.conftest import assert_stock_exact, raw_redis

ON_HAND = 10
HELD = 2
PRICE = "500.00"  # of a variant from make_variant, no pricing rules
SOLD_OUT_WINDOW = 1.0  # how long the service remembers a refusal for stock (app/services/cart.py)


# --- talking to a server without the app's client ------------------------------------------------

def answer(port: int, command: str = "PING", timeout: float = 0.5) -> str:
    """The first line a server answers to one inline command on a new connection, or "refused" /
    "timeout" (a stopped process still accepts connections into its backlog, and never answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(command.encode() + b"\r\n")
            line = s.makefile("rb").readline()
    except ConnectionRefusedError:
        return "refused"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return f"error {exc}"
    return line.decode(errors="replace").strip() or "closed"


def admin(server: EmbeddedRedis) -> redis_lib.Redis:
    return raw_redis(server.url)


def synced(server: EmbeddedRedis) -> bool:
    info = admin(server).info("replication")
    return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")


class Servers:
    """The private redis-servers of this module: each stopped at the end."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.made: list[EmbeddedRedis] = []

    def __call__(self, persist: bool = False) -> EmbeddedRedis:
        server = EmbeddedRedis(self.directory / f"redis-{len(self.made)}", persist=persist).start()
        self.made.append(server)
        return server

    def restart(self, server: EmbeddedRedis, persist: bool = False, extra_args: list[str] | None = None,
                wait: bool = True) -> EmbeddedRedis:
        """A new server on the same port and directory (so on the same data); `wait=False` returns
        at once (EmbeddedRedis.start waits for a PONG, which a loading server does not answer)."""
        server.stop()
        again = EmbeddedRedis(server.directory, port=server.port, persist=persist, extra_args=extra_args)
        self.made.append(again)
        if wait:
            return again.start()
        again.process = subprocess.Popen(again.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        return again

    def stop_all(self) -> None:
        for server in self.made:
            server.stop()


# --- the kinds -----------------------------------------------------------------------------------

class Fault:
    """One way for Redis to refuse or fail. `begin` makes the app's server answer that way and
    returns once it does; `end` puts it back; both may run many times. `cleanup` undoes whatever
    a failed `end` left."""

    name = ""
    refuses_reads = True  # False: only writes are refused, a read is still served
    logged: tuple[str, ...] = ()  # what the app's "redis unavailable" warning names
    late = False  # a command sent before the failure may still run once the server is back
    persist = False  # the server keeps its data in an append-only file across a restart
    on = False

    def __init__(self, servers: Servers):
        self.servers = servers
        self.server = servers(persist=self.persist)

    def begin(self) -> None:
        self.on = True
        self.start()

    def end(self) -> None:
        self.stop()
        self.on = False

    @property
    def app_url(self) -> str:
        return self.server.url

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class NoReplicas(Fault):
    name, refuses_reads, logged = "NOREPLICAS", False, ("NOREPLICAS",)

    def start(self):
        admin(self.server).config_set("min-replicas-to-write", 1)

    def stop(self):
        admin(self.server).config_set("min-replicas-to-write", 0)


class OutOfMemory(Fault):
    name, refuses_reads, logged = "OOM", False, ("OOM",)

    def start(self):
        assert admin(self.server).config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        admin(self.server).config_set("maxmemory", 1)

    def stop(self):
        admin(self.server).config_set("maxmemory", 0)


class ReadOnly(Fault):
    """The app's server becomes a replica. A replica drops its data for its primary's, so the
    primary first takes a copy of the app's server (as its replica, then promoted)."""

    name, refuses_reads, logged = "READONLY", False, ("READONLY",)
    primary: EmbeddedRedis | None = None

    def start(self):
        if self.primary is None:
            self.primary = self.servers()
            admin(self.primary).config_set("repl-diskless-sync-delay", 0)
            admin(self.server).config_set("repl-diskless-sync-delay", 0)
        admin(self.primary).replicaof("127.0.0.1", self.server.port)
        wait_for(lambda: synced(self.primary), timeout=10, message="the copy of the app's data")
        admin(self.primary).replicaof("NO", "ONE")
        admin(self.server).replicaof("127.0.0.1", self.primary.port)
        wait_for(lambda: synced(self.server), timeout=10, message="the app's server to be a synced replica")

    def stop(self):
        admin(self.server).replicaof("NO", "ONE")

    def cleanup(self):
        try:
            self.stop()
        except redis_lib.RedisError:
            pass


class MasterDown(Fault):
    """A replica whose primary is gone, told not to serve stale data: every data command answers
    MASTERDOWN (a plain write answers READONLY first)."""

    name, logged = "MASTERDOWN", ("MASTERDOWN", "READONLY")

    def start(self):
        admin(self.server).config_set("replica-serve-stale-data", "no")
        admin(self.server).replicaof("127.0.0.1", free_port())  # nothing listens there
        wait_for(lambda: answer(self.server.port, "GET anything").startswith("-MASTERDOWN"), timeout=5,
                 message="MASTERDOWN")

    def stop(self):
        admin(self.server).replicaof("NO", "ONE")
        admin(self.server).config_set("replica-serve-stale-data", "yes")

    cleanup = stop


# Loops until SCRIPT KILL (it writes nothing, so it can be killed), or ARGV[1] microseconds.
BUSY_SCRIPT = """
local start = redis.call('TIME')
local limit = tonumber(ARGV[1])
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > limit then return 0 end
end
"""


class Busy(Fault):
    """A script runs past busy-reply-threshold: every other command answers BUSY."""

    name, logged = "BUSY", ("BUSY",)
    thread: threading.Thread | None = None

    def start(self):
        admin(self.server).config_set("busy-reply-threshold", 100)
        self.outcome: list = []

        def run():
            own = redis_lib.Redis.from_url(self.server.url, socket_timeout=60)
            try:
                self.outcome.append(own.eval(BUSY_SCRIPT, 0, 30_000_000))
            except redis_lib.RedisError as exc:
                self.outcome.append(exc)
            finally:
                own.close()

        self.thread = threading.Thread(target=run, name="busy-script", daemon=True)
        self.thread.start()
        wait_for(lambda: answer(self.server.port).startswith("-BUSY"), timeout=5, message="BUSY")

    def stop(self):
        assert answer(self.server.port, "SCRIPT KILL", timeout=2) == "+OK"
        self.thread.join(10)
        assert not self.thread.is_alive() and "killed" in str(self.outcome[0]).lower(), self.outcome
        wait_for(lambda: answer(self.server.port) == "+PONG", timeout=5, message="PONG after SCRIPT KILL")

    def cleanup(self):
        if self.thread is not None and self.thread.is_alive():
            answer(self.server.port, "SCRIPT KILL", timeout=2)
            self.thread.join(10)


class Loading(Fault):
    """The server restarts on its own dump (the app's keys, and filler keys in database 1) and
    loads it with a delay per key: it answers LOADING meanwhile (between two keys: events are
    served every KiB loaded). Put back: the delay is lifted (CONFIG SET is served while loading)
    and loading finishes."""

    name, logged = "LOADING", ("LOADING",)
    FILLERS, DELAY_US = 2000, 5000  # up to 10 s of loading: far longer than a test needs

    def start(self):
        filler = redis_lib.Redis(host="127.0.0.1", port=self.server.port, db=1)
        if filler.dbsize() < self.FILLERS:
            pipe = filler.pipeline(transaction=False)
            for i in range(self.FILLERS):
                pipe.set(f"filler:{i}", os.urandom(1100))  # random: the dump cannot compress it
            pipe.execute()
        filler.save()
        filler.close()
        self.server = self.servers.restart(self.server, extra_args=[
            "--key-load-delay", str(self.DELAY_US), "--loading-process-events-interval-bytes", "1024"], wait=False)
        wait_for(lambda: answer(self.server.port).startswith("-LOADING"), timeout=10, message="LOADING")

    def stop(self):
        assert answer(self.server.port, "CONFIG SET key-load-delay 0") == "+OK"
        wait_for(lambda: answer(self.server.port) == "+PONG", timeout=20, message="the dump loaded")


class Timeout(Fault):
    """The server process is stopped (SIGSTOP): connections are accepted and nothing is answered,
    so every call ends at the app's socket timeout (0.5 s here). A command sent before the
    timeout runs once the process resumes."""

    name, logged, late = "timeout", ("TimeoutError",), True
    stopped = False

    @property
    def app_url(self) -> str:
        return f"{self.server.url}?socket_timeout=0.5"

    def start(self):
        os.kill(self.server.process.pid, signal.SIGSTOP)
        self.stopped = True
        wait_for(lambda: answer(self.server.port, timeout=0.2) == "timeout", timeout=5, message="no answer")

    def stop(self):
        os.kill(self.server.process.pid, signal.SIGCONT)
        self.stopped = False
        wait_for(lambda: answer(self.server.port) == "+PONG", timeout=5, message="PONG after SIGCONT")

    def cleanup(self):
        if self.stopped and self.server.process is not None:
            os.kill(self.server.process.pid, signal.SIGCONT)


class Refused(Fault):
    """The server is stopped (its data kept in its append-only file) and started again."""

    name, logged, persist = "refused", ("ConnectionError",), True

    def start(self):
        self.server.stop()
        wait_for(lambda: answer(self.server.port) == "refused", timeout=5, message="connection refused")

    def stop(self):
        self.server = self.servers.restart(self.server, persist=True)


KINDS = {kind.name: kind for kind in (NoReplicas, OutOfMemory, ReadOnly, MasterDown, Busy, Loading, Timeout,
                                      Refused)}


# --- the endpoints -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict | None
    ok: int  # the status once Redis is back
    read: bool = False  # served from reads alone
    first: dict | None = None  # an add refused for stock just before (see "add-soldout")


def calls(vid: int) -> dict[str, Call]:
    holder, shopper = f"holder-{vid}", f"shopper-{vid}"
    add = {"user_id": shopper, "variant_id": vid, "quantity": 1}
    return {
        # the hot path: the lane, the reserve script pipelined with the cart's reads and its write
        "add": Call("POST", "/api/cart/add/", add, 201),
        # the same, less than a second after an add of that variant was refused for stock (a
        # sold-out rush): then the add does not write its line beside the reserve, and the
        # reserve's reply is the only one that can carry the refusal
        "add-soldout": Call("POST", "/api/cart/add/", add, 201,
                            first={"user_id": f"rush-{vid}", "variant_id": vid, "quantity": ON_HAND + 1}),
        # with the price the client showed: every check before the reserve (the hold and the cart
        # read through the lane), then the reserve alone
        "add-priced": Call("POST", "/api/cart/add/", {**add, "price": PRICE}, 201),
        "cart": Call("GET", f"/api/cart/{holder}/", None, 200, read=True),
        "checkout": Call("POST", f"/api/cart/{holder}/checkout/", {}, 201),
        "stock": Call("GET", f"/api/inventory/{vid}/", None, 200, read=True),
        "adjust": Call("POST", f"/api/inventory/{vid}/adjust/", {"delta": 3, "reason": "restock"}, 200),
        "readyz": Call("GET", "/readyz", None, 200),
    }


ENDPOINTS = ("add", "add-soldout", "add-priced", "cart", "checkout", "stock", "adjust", "readyz")
# Redis stopped under the cart's traffic, and /readyz meanwhile, are covered by
# test_redis_faults.py::test_redis_stopped_mid_traffic_answers_503_and_recovers_without_a_restart.
CASES = [(kind, endpoint) for kind in KINDS for endpoint in ENDPOINTS
         if kind != "refused" or endpoint in ("stock", "adjust")]


def send(client, call: Call):
    return client.open(call.path, method=call.method, json=call.body)


def rush(client, call: Call) -> float:
    """The add refused for stock that `call` needs just before it, if any; returns when it was sent."""
    sent = time.monotonic()
    if call.first is not None:
        refused = client.post("/api/cart/add/", json=call.first)
        assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "insufficient_stock", (
            refused.get_json())
    return sent


# --- what must not change ------------------------------------------------------------------------

_READ = {"string": ("GET",), "hash": ("HGETALL",), "zset": ("ZRANGE", 0, -1, "WITHSCORES"),
         "set": ("SMEMBERS",), "list": ("LRANGE", 0, -1)}


def redis_state(url: str) -> dict:
    """Every key of database 0 with its value (not its TTL)."""
    r = raw_redis(url)
    try:
        names = sorted(r.scan_iter(count=1000))
        pipe = r.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
        kinds = pipe.execute()
        for name, kind in zip(names, kinds):
            read = _READ.get(kind, ("TYPE",))
            pipe.execute_command(read[0], name, *read[1:])
        values = pipe.execute()
    finally:
        r.close()
    return {name: sorted(value) if isinstance(value, (set, list)) and kind == "set" else value
            for name, kind, value in zip(names, kinds, values)}


def database_state(c, vid: int) -> dict:
    with c.sessions() as s:
        stock = s.get(Stock, vid)
        return {"on_hand": stock.on_hand, "version": stock.version,
                "orders": s.scalar(select(func.count(func.distinct(OrderLine.order_id)))
                                   .where(OrderLine.variant_id == vid)),
                "movements": s.scalar(select(func.count()).select_from(StockMovement)
                                      .where(StockMovement.variant_id == vid))}


def settle(c, variant_ids) -> None:
    """What the periodic reconcile does after a fault, twice (the first pass may only resolve a
    stale checkout lock). grace_ms=0: nothing is in flight any more. (No sweep: no hold lapsed.)"""
    c.reconciler.reconcile(variant_ids, grace_ms=0)
    c.reconciler.reconcile(variant_ids, grace_ms=0)
    check = c.reconciler.reconcile(variant_ids, dry_run=True, grace_ms=0)
    assert check.drifted == 0 and check.skipped == 0, check.as_dict()


def last_traceback(caplog) -> str:
    """The traceback the app logged for its last 500, for the failure message."""
    for record in reversed(caplog.records):
        if record.exc_info:
            return "".join(traceback.format_exception(*record.exc_info))[-3000:]
    return "(no traceback logged)"


def unavailable_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("redis unavailable")]


# --- fixtures ------------------------------------------------------------------------------------

@dataclass
class Stand:
    fault: Fault
    client: object
    container: Container
    servers: Servers

    def close(self) -> None:
        try:
            self.fault.cleanup()
        finally:
            self.container.close()
            self.servers.stop_all()


@pytest.fixture(scope="module")
def stands(tmp_path_factory, database_url):
    """stands(kind) -> that kind's private server(s) and an app on them, kept for the kind's tests
    (they run one after the other) and closed when the next kind's tests begin."""
    current: list[Stand] = []

    def stand_of(kind: str) -> Stand:
        if current and current[0].fault.name == kind:
            return current[0]
        while current:
            current.pop().close()
        servers = Servers(tmp_path_factory.mktemp(f"error-replies-{kind}"))
        fault = KINDS[kind](servers)
        env = {"APP_ENV": "test", "REDIS_CLUSTER": "0", "DATABASE_URL": database_url, "REDIS_URL": fault.app_url,
               "HOLD_TTL_SECONDS": "900", "LOG_LEVEL": "WARNING"}
        container = Container(load_settings(env))
        current.append(Stand(fault, create_app(container=container).test_client(), container, servers))
        return current[0]

    yield stand_of
    while current:
        current.pop().close()


@pytest.fixture
def stand(stands, kind):
    """This test's kind's stand; a test that fails half-way does not leave the fault on for the
    next test of its kind."""
    stand = stands(kind)
    yield stand
    if stand.fault.on:
        try:
            stand.fault.end()
        except Exception:  # noqa: BLE001 - then the kind's cleanup is the last resort
            stand.fault.cleanup()


# --- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, endpoint", CASES)
def test_an_endpoint_that_needs_redis_answers_503_while_redis_refuses_or_fails_and_succeeds_once_it_is_back(
        kind, endpoint, stand, caplog):
    fault, client, c = stand.fault, stand.client, stand.container
    vid = make_variant(c.sessions, on_hand=ON_HAND)
    held = client.post("/api/cart/add/", json={"user_id": f"holder-{vid}", "variant_id": vid, "quantity": HELD})
    assert held.status_code == 201, held.get_json()
    call = calls(vid)[endpoint]
    before = send(client, call).get_json() if call.read else None
    rushed = rush(client, call)
    redis_before, db_before = redis_state(fault.server.url), database_state(c, vid)

    fault.begin()
    if call.first is not None:
        assert time.monotonic() - rushed < SOLD_OUT_WINDOW, f"{fault.name} took too long to start for this case"
    caplog.clear()
    during = send(client, call)
    body = during.get_json()
    if endpoint == "readyz":
        assert during.status_code == 503, (
            f"/readyz answers {during.status_code} {body} while Redis answers {fault.name}")
        assert body["status"] == "unavailable" and int(during.headers["Retry-After"]) > 0, body
    elif call.read and not fault.refuses_reads and during.status_code == 200:
        assert body == before, "a read served while only writes are refused shows what it showed before"
    else:
        assert during.status_code == 503, (
            f"{call.method} {call.path} answers {during.status_code} {body} while Redis answers {fault.name}:\n"
            f"{last_traceback(caplog)}")
        assert body["error"]["code"] == "unavailable" and body["error"]["details"] == {"store": "redis"}, body
        assert int(during.headers["Retry-After"]) > 0
        # the outage the app saw is this one (not, say, a connection dropped on the way)
        warnings = unavailable_warnings(caplog)
        assert not warnings or any(name in w for w in warnings for name in fault.logged), (fault.name, warnings)

    fault.end()
    assert database_state(c, vid) == db_before
    if fault.late:
        settle(c, [vid])
    else:
        assert redis_state(fault.server.url) == redis_before
    assert assert_stock_exact(c, [vid])[vid][0] == ON_HAND

    caplog.clear()
    rush(client, call)
    again = send(client, call)
    assert again.status_code == call.ok, (f"{call.method} {call.path} once Redis is back: {again.status_code}",
                                          again.get_json(), last_traceback(caplog))
    if endpoint == "checkout":
        assert database_state(c, vid)["on_hand"] == ON_HAND - HELD
    if endpoint == "adjust":
        assert database_state(c, vid)["on_hand"] == ON_HAND + 3
    assert_stock_exact(c, [vid])


def test_an_error_reply_that_is_no_refusal_is_a_500_not_a_503(base_env, build, own_redis, caplog):
    """WRONGTYPE is a bug (here: a cart key that is not a hash), not an outage to retry after."""
    server = own_redis()
    client, _c = build({**base_env, "REDIS_URL": server.url})
    admin(server).set(keys.cart("broken"), "not a hash")
    response = client.get("/api/cart/broken/")
    assert response.status_code == 500, response.get_json()
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "WRONGTYPE" in last_traceback(caplog)
    assert unavailable_warnings(caplog) == []


@pytest.mark.parametrize("reply, refusal", [
    ("NOREPLICAS Not enough good replicas to write.", True),
    ("OOM command not allowed when used memory > 'maxmemory'.", True),
    ("READONLY You can't write against a read only replica.", True),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
    ("LOADING Redis is loading the dataset in memory", True),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", True),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.", True),
    ("CLUSTERDOWN The cluster is down", True),
    ("TRYAGAIN Multiple keys request during rehashing of slot", True),
    ("NOREPLICAS Not enough good replicas to write. script: 1f0e, on @user_script:3.", True),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ("BUSYKEY Target key name already exists.", False),
    ("NOTBUSY No scripts in execution right now.", False),
    ("NOSCRIPT No matching script. Please use EVAL.", False),
    ("ERR user_script:1: Script attempted to access nonexistent global variable 'x'", False),
])
def test_the_refusals_are_told_from_the_other_error_replies(reply, refusal):
    exc = BaseParser.parse_error(reply)  # what redis-py (and the lane) raise for the reply
    assert store_refusal(exc) is refusal
    # the same inside a pipeline, where redis-py puts the failing command in front of the message
    exc.args = (f"Command # 2 (EVALSHA 1f0e 1 k) of pipeline caused error: {exc.args[0]}",)
    assert store_refusal(exc) is refusal


def test_a_lost_connection_and_a_timeout_are_outages_and_other_errors_are_not():
    assert store_refusal(redis_lib.ConnectionError("Connection refused"))
    assert store_refusal(redis_lib.TimeoutError("Timeout reading from socket"))
    assert not store_refusal(redis_lib.DataError("Invalid input of type: 'dict'"))
    assert not store_refusal(TypeError("'OutOfMemoryError' object is not subscriptable"))
