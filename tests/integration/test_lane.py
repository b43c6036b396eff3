"""The lane (app/engine/lane.py) on real redis-servers of its own: error replies in a pipeline,
timeouts, a connection closed while idle or while busy, fork, restarts (also one still loading its
data), what its packers send, and the check that fails loudly when redis-py's internals changed.

Every server here is private, on a free loopback port; the shared Redis is never touched."""
from __future__ import annotations

import configparser
import gc
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib
import redis._parsers
import redis.connection
from redis.backoff import NoBackoff
from redis.exceptions import (BusyLoadingError, ConnectionError, NoScriptError, OutOfMemoryError,
                              ReadOnlyError, ResponseError, TimeoutError)
from redis.retry import Retry

from app.embedded import EmbeddedRedis
from app.engine import lane as lane_mod
from app.engine.lane import Lane, as_dict, bulk, bulks, check_redis_py, pack, script_prefix
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.single_node  # private servers, CLIENT KILL, CLIENT PAUSE, restarts

RETURN_ERROR = "return redis.error_reply(ARGV[1])"


def _client(url: str, decode: bool = True, timeout: float = 5.0) -> redis_lib.Redis:
    """A client as app/redis_client.py makes one (no silent re-sends), for a lane to copy."""
    return redis_lib.Redis.from_url(url, decode_responses=decode, socket_timeout=timeout,
                                    socket_connect_timeout=timeout, health_check_interval=30,
                                    retry=Retry(NoBackoff(), 0))


def _ids(admin) -> set[int]:
    return {int(c["id"]) for c in admin.client_list()}


def _client_id(lane: Lane) -> int:
    return int(lane.call(pack("CLIENT", "ID")))


def _past_idle_check(since: float) -> None:
    """Let the lane's connection sit idle past IDLE_CHECK_SECONDS: the condition is time itself."""
    time.sleep(max(0.0, since + 2 * lane_mod.IDLE_CHECK_SECONDS - time.monotonic()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = EmbeddedRedis(tmp_path_factory.mktemp("lane-redis")).start()
    yield s
    s.stop()


@pytest.fixture
def admin(server):
    c = _client(server.url)
    c.flushdb()
    yield c
    c.close()


@pytest.fixture
def make_lane(server):
    """make_lane(url=None, decode=True, timeout=5) -> a Lane on a client of its own; closed at the end."""
    made: list[tuple[Lane, redis_lib.Redis]] = []

    def make(url: str | None = None, decode: bool = True, timeout: float = 5.0) -> Lane:
        client = _client(url or server.url, decode, timeout)
        lane = Lane(client)
        made.append((lane, client))
        return lane

    yield make
    for lane, client in made:
        lane.close()
        client.close()


# --- (a) error replies -------------------------------------------------------------------------------

def test_an_error_reply_in_the_middle_of_call_many_comes_back_in_its_place_and_the_rest_is_read(
        make_lane, admin):
    lane = make_lane()
    admin.set("a-string", "x")
    before = _client_id(lane)
    replies = lane.call_many(pack("SET", "k", "1") + pack("HGET", "a-string", "f") + pack("GET", "k"), 3)
    assert replies[0] == "OK" and replies[2] == "1"
    assert isinstance(replies[1], ResponseError) and str(replies[1]).startswith("WRONGTYPE")
    assert _client_id(lane) == before  # the same connection, still in step


def test_a_noscript_in_the_middle_of_execute_is_a_noscripterror_in_its_place_on_a_connection_kept(make_lane):
    lane = make_lane()
    before = _client_id(lane)
    first, missing, last = lane.execute([("ECHO", "a"), ("EVALSHA", "0" * 40, 0), ("ECHO", "b")])
    assert (first, last) == ("a", "b")
    assert isinstance(missing, NoScriptError)
    assert _client_id(lane) == before


def test_call_raises_an_error_reply_and_keeps_its_connection(make_lane):
    lane = make_lane()
    before = _client_id(lane)
    with pytest.raises(NoScriptError):
        lane.call(pack("EVALSHA", "f" * 40, 0))
    assert _client_id(lane) == before


@pytest.mark.parametrize("reply", [
    "NOSCRIPT No matching script. Please use EVAL.",
    "READONLY You can't write against a read only replica.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOPERM this user has no permissions to run the 'evalsha' command",
    "EXECABORT Transaction discarded because of previous errors.",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "BUSY Redis is busy running a script.",
    "ERR anything else",
])
def test_every_error_reply_is_the_same_redis_py_class_with_the_same_message_as_redis_py_makes_of_it(
        make_lane, admin, reply):
    lane = make_lane()
    with pytest.raises(ResponseError) as expected:
        admin.eval(RETURN_ERROR, 0, reply)
    (got,) = lane.call_many(pack("EVAL", RETURN_ERROR, 0, reply), 1)
    assert type(got) is type(expected.value) and str(got) == str(expected.value)
    with pytest.raises(type(expected.value)) as raised:
        lane.call(pack("EVAL", RETURN_ERROR, 0, reply))
    assert str(raised.value) == str(expected.value)
    assert lane.call(pack("PING")) == "PONG"


def test_real_noscript_readonly_and_oom_replies_are_redis_pys_classes(make_lane, admin, server, tmp_path):
    replica = EmbeddedRedis(tmp_path / "replica",
                            extra_args=["--replicaof", "127.0.0.1", str(server.port)]).start()
    try:
        on_replica = make_lane(replica.url)
        with pytest.raises(ReadOnlyError):
            on_replica.call(pack("SET", "k", "v"))
        _, refused = on_replica.call_many(pack("GET", "k") + pack("SET", "k", "v"), 2)
        assert isinstance(refused, ReadOnlyError)
    finally:
        replica.stop()
    lane = make_lane()
    assert isinstance(lane.execute([("EVALSHA", "a" * 40, 0)])[0], NoScriptError)
    admin.config_set("maxmemory", 1)
    try:
        (oom,) = lane.execute([("SET", "big", "x" * 1000)])
        assert isinstance(oom, OutOfMemoryError)
    finally:
        admin.config_set("maxmemory", 0)


@pytest.mark.parametrize("way", ["call", "call_many"])
def test_a_loading_reply_is_raised_as_busyloadingerror_like_redis_py_does_never_returned_as_a_result(
        make_lane, admin, way):
    """LOADING is not a ResponseError in redis-py but a ConnectionError (BusyLoadingError): returned
    in place it would pass for a script's result (a 500 where the API promises a 503)."""
    loading = "LOADING Redis is loading the dataset in memory"
    with pytest.raises(BusyLoadingError):
        admin.eval(RETURN_ERROR, 0, loading)
    lane = make_lane()
    before = _client_id(lane)
    with pytest.raises(BusyLoadingError):
        if way == "call":
            lane.call(pack("EVAL", RETURN_ERROR, 0, loading))
        else:
            lane.call_many(pack("ECHO", "a") + pack("EVAL", RETURN_ERROR, 0, loading) + pack("ECHO", "b"), 3)
    # as redis-py does, that connection is not kept: the next call works on a new one
    assert lane.call(pack("ECHO", "next")) == "next"
    assert _client_id(lane) != before
    wait_for(lambda: before not in _ids(admin), message="the refused connection closed")


# --- (b) timeouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("way", ["call", "call_many"])
def test_a_server_that_stops_answering_times_out_within_the_bound_and_the_call_after_it_answers_works(
        make_lane, admin, way):
    lane = make_lane(timeout=0.3)
    first = _client_id(lane)
    admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        if way == "call":
            lane.call(pack("PING"))
        else:
            lane.call_many(pack("PING") + pack("PING"), 2)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.3, elapsed
    assert admin.ping()  # returns once the server answers again (the pause is over)
    assert lane.call(pack("ECHO", "back")) == "back"
    assert _client_id(lane) != first  # the timed-out connection was dropped, not reused out of step
    wait_for(lambda: first not in _ids(admin), message="the timed-out connection closed")


class _SilentServer:
    """Accepts connections and never answers; records when each one is closed by the client."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.closed_by_client = 0
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn):
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    if not conn.recv(4096):
                        self.closed_by_client += 1
                        return
                except socket.timeout:
                    continue
                except OSError:
                    self.closed_by_client += 1
                    return

    def stop(self):
        self._stop.set()
        self.listener.close()


def test_a_server_that_accepts_and_never_answers_times_out_the_first_call_and_leaves_no_connection_open(
        make_lane):
    silent = _SilentServer()
    try:
        lane = make_lane(f"redis://127.0.0.1:{silent.port}/0", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            lane.call(pack("PING"))
        assert time.monotonic() - started < 1.3
        assert silent.accepted == 1
        wait_for(lambda: silent.closed_by_client == 1, message="the client to close the silent connection")
    finally:
        silent.stop()


# --- (c) a connection closed by the server -------------------------------------------------------------

@pytest.mark.parametrize("way", ["call", "call_many"])
def test_a_connection_killed_while_idle_is_replaced_before_the_next_call_which_succeeds(
        make_lane, admin, way):
    lane = make_lane()
    old = _client_id(lane)
    last_use = time.monotonic()
    admin.execute_command("CLIENT", "KILL", "ID", old)
    wait_for(lambda: old not in _ids(admin), message="the kill")
    _past_idle_check(last_use)
    if way == "call":
        assert lane.call(pack("SET", "k", "v")) == "OK"
    else:
        assert lane.call_many(pack("SET", "k", "v") + pack("GET", "k"), 2) == ["OK", "v"]
    assert _client_id(lane) != old


@pytest.mark.parametrize("way", ["call", "call_many"])
def test_a_connection_killed_within_idle_check_seconds_of_its_last_call_fails_that_call_the_next_reconnects(
        make_lane, admin, monkeypatch, way):
    """What the code does: a connection used less than IDLE_CHECK_SECONDS ago is not looked at, so
    the command is written into the closed socket, the read finds it closed (EOF, or EPIPE/ECONNRESET
    once the server's RST is in), the connection is dropped and ConnectionError raised. The command is
    not sent again; the next call connects again and works."""
    monkeypatch.setattr(lane_mod, "IDLE_CHECK_SECONDS", 3600.0)  # "within": for certain, on any machine
    lane = make_lane()
    old = _client_id(lane)
    admin.execute_command("CLIENT", "KILL", "ID", old)
    wait_for(lambda: old not in _ids(admin), message="the kill")
    with pytest.raises(ConnectionError) as failed:
        if way == "call":
            lane.call(pack("SET", "lost", "1"))
        else:
            lane.call_many(pack("SET", "lost", "1") + pack("PING"), 2)
    assert not isinstance(failed.value, TimeoutError)
    assert admin.get("lost") is None  # the server had closed that connection: nothing ran, nothing resent
    assert lane.call(pack("SET", "after", "1")) == "OK"
    assert _client_id(lane) != old


# --- (d) fork ----------------------------------------------------------------------------------------------

def test_a_forked_child_gets_its_own_connection_and_leaves_the_parents_alone(make_lane, admin):
    lane = make_lane()
    parent_id = _client_id(lane)
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: use the lane, report, wait for the parent to look, exit
        code = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)
            gc.collect()  # the parent's connection objects, dropped at fork, are collected here
            child_id = _client_id(lane)
            wrote = lane.call(pack("SET", "child", "1")) == "OK"
            os.write(to_parent_w, f"{child_id} {int(wrote)}\n".encode())
            os.read(to_child_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(to_parent_w)
    os.close(to_child_r)
    try:
        child_id, wrote = os.read(to_parent_r, 100).decode().split()
        child_id = int(child_id)
        assert wrote == "1"
        assert child_id != parent_id and {parent_id, child_id} <= _ids(admin)
        assert _client_id(lane) == parent_id  # the parent's connection is untouched and in step
    finally:
        os.write(to_child_w, b"x")
        _, status = os.waitpid(pid, 0)
        os.close(to_parent_r)
        os.close(to_child_w)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: child_id not in _ids(admin), message="the child's connection to close with it")
    assert lane.call(pack("GET", "child")) == "1"
    assert _client_id(lane) == parent_id


# --- (e) restarts ------------------------------------------------------------------------------------------

def test_after_a_restart_on_the_same_port_the_first_call_on_a_connection_idle_past_idle_check_succeeds(
        make_lane, tmp_path):
    first = EmbeddedRedis(tmp_path / "redis").start()
    again = None
    try:
        lane = make_lane(first.url)
        assert lane.call(pack("SET", "k", "before")) == "OK"
        last_use = time.monotonic()
        first.stop()
        again = EmbeddedRedis(tmp_path / "redis", port=first.port).start()
        _past_idle_check(last_use)
        assert lane.call(pack("SET", "k", "after")) == "OK"  # no error: the dead connection was replaced
        assert lane.execute([("GET", "k"), ("DBSIZE",)]) == ["after", 1]
    finally:
        first.stop()
        if again is not None:
            again.stop()


def test_a_call_while_the_server_is_down_raises_connection_error_and_the_first_after_it_is_back_works(
        make_lane, tmp_path):
    first = EmbeddedRedis(tmp_path / "redis").start()
    again = None
    try:
        lane = make_lane(first.url)
        assert lane.call(pack("PING")) == "PONG"
        first.stop()
        with pytest.raises(ConnectionError):
            lane.call(pack("PING"))
        with pytest.raises(ConnectionError):
            lane.call_many(pack("PING"), 1)
        again = EmbeddedRedis(tmp_path / "redis", port=first.port).start()
        assert lane.call(pack("PING")) == "PONG"
    finally:
        first.stop()
        if again is not None:
            again.stop()


def test_a_call_while_a_restarted_server_still_loads_its_data_raises_busyloadingerror_then_works_once_loaded(
        make_lane, tmp_path):
    first = EmbeddedRedis(tmp_path / "redis").start()
    # the same directory, so the snapshot saved below is loaded, slowly (10 ms a key: about 4 s),
    # answering clients between every KB it loads (by default only every 2 MB)
    loader = EmbeddedRedis(tmp_path / "redis", port=first.port, extra_args=[
        "--key-load-delay", "10000", "--loading-process-events-interval-bytes", "1024"])
    try:
        lane = make_lane(first.url)
        admin = _client(first.url)
        admin.mset({f"key{i}": f"{i:<100}" for i in range(400)})
        admin.save()
        admin.close()
        assert lane.call(pack("DBSIZE")) == 400
        first.stop()
        # started by hand: EmbeddedRedis.start() waits for a PONG, which a loading server refuses
        loader.process = subprocess.Popen(loader.command(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def loading() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", first.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64).startswith(b"-LOADING")
            except OSError:
                return False

        wait_for(loading, timeout=10, message="the restarted server to be loading its data")
        with pytest.raises(BusyLoadingError):
            lane.call(pack("GET", "key1"))
        with pytest.raises(BusyLoadingError):
            lane.call_many(pack("GET", "key1") + pack("GET", "key2"), 2)
        assert loading(), "the data loaded before the calls: raise --key-load-delay"
        wait_for(lambda: not loading(), timeout=60, interval=0.1, message="the data to be loaded")
        assert lane.call_many(pack("GET", "key1") + pack("DBSIZE"), 2) == [f"{1:<100}", 400]
    finally:
        first.stop()
        loader.stop()


# --- (f) packing -------------------------------------------------------------------------------------------

VALUES = ["plain", "héllo wörld", "日本語のテキスト", "emoji 🎉", "", "with\r\nCRLF and $3\r\n", "x" * 70000,
          0, -42, 2**62]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_str_and_int_values_packed_by_pack_and_bulks_round_trip_through_a_real_server(
        make_lane, admin, value):
    lane = make_lane()
    assert lane.call(pack("SET", "k:é", value)) == "OK"
    assert lane.call(pack("GET", "k:é")) == str(value) == admin.get("k:é")
    head = b"*3\r\n" + bulk("SET")  # the hot path's way: a fixed head, then bulks() of the rest
    assert lane.call(head + bulks(["k2:é", value])) == "OK"
    assert admin.get("k2:é") == str(value)


def test_bytes_values_round_trip_unchanged_on_a_lane_that_does_not_decode(make_lane, admin):
    lane = make_lane(decode=False)
    raw = bytes(range(256)) + b"\r\n\x00"
    assert lane.call(pack(b"SET", b"raw", raw)) == b"OK"
    assert lane.call(pack("GET", "raw")) == raw
    assert lane.call(pack("SET", "text", "é")) == b"OK"
    assert lane.call(pack("GET", "text")) == "é".encode()


def test_bulks_counts_bytes_not_characters_for_non_ascii_arguments():
    for values in (["ascii", 7, -1], ["é", "日本", 3, "🎉x"]):
        assert bulks(values) == b"".join(bulk(str(v)) for v in values)
    assert bulks(["é"]) == b"$2\r\n\xc3\xa9\r\n"


def test_a_script_prefix_with_the_rest_appended_is_an_evalsha_whose_keys_and_arguments_arrive_intact(
        make_lane, admin):
    lane = make_lane()
    sha = admin.script_load("return {KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4]}")
    fixed = ["k:{1}", "clé:{1}"]
    rest = ["naïve ☃", 12, "ascii", -3]
    expected = ["k:{1}", "clé:{1}", "naïve ☃", "12", "ascii", "-3"]
    head = script_prefix(sha, 2, fixed, 6)
    assert lane.call(head + bulks(rest)) == expected
    assert lane.call(head + b"".join(map(bulk, rest))) == expected
    assert lane.call(pack("EVALSHA", sha, 2, *fixed, *rest)) == expected


def test_as_dict_of_a_hgetall_through_the_lane_is_what_redis_py_reads(make_lane, admin):
    admin.hset("h", mapping={"a": "1", "clé": "välue", "n": 3})
    (reply,) = make_lane().execute([("HGETALL", "h")])
    assert as_dict(reply) == admin.hgetall("h") == {"a": "1", "clé": "välue", "n": "3"}


@pytest.mark.parametrize("value", [1.5, None, True, object()])
def test_values_redis_cannot_take_as_they_are_are_refused_when_packed(value):
    with pytest.raises(TypeError):
        pack("SET", "k", value)


# --- redis-py's internals: checked, and a change fails loudly ------------------------------------------

def _pinned_redis_py() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = dict(re.findall(r"^\s*([A-Za-z0-9_.\-]+)==(\S+)", cfg["options"]["install_requires"], re.M))
    return pins["redis"]


def test_the_lane_is_written_for_the_redis_py_pinned_in_setup_cfg_and_the_installed_one_passes_the_check(
        server):
    assert lane_mod.WRITTEN_FOR == _pinned_redis_py()
    check_redis_py()  # what an app calls at start
    client = _client(server.url)
    try:
        check_redis_py(client)
    finally:
        client.close()


def _drop_connection_sock(monkeypatch):
    original = redis.connection.AbstractConnection.__init__

    def init_without_sock(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._sock

    monkeypatch.setattr(redis.connection.AbstractConnection, "__init__", init_without_sock)


@pytest.mark.parametrize("internal, remove", [
    ("redis._parsers.BaseParser (", lambda mp, client: mp.delattr(redis._parsers, "BaseParser")),
    ("BaseParser.parse_error", lambda mp, client: mp.delattr(redis._parsers.BaseParser, "parse_error")),
    ("NOSCRIPT parsed as NoScriptError",
     lambda mp, client: mp.setattr(redis._parsers.BaseParser, "EXCEPTION_CLASSES", {})),
    ("ConnectionPool.connection_kwargs",
     lambda mp, client: mp.delattr(type(client.connection_pool), "connection_kwargs")),
    ("ConnectionPool.connection_class",
     lambda mp, client: mp.delattr(client.connection_pool, "connection_class")),
    ("Connection._sock", lambda mp, client: _drop_connection_sock(mp)),
], ids=["BaseParser", "parse_error", "error-table", "connection_kwargs", "connection_class", "_sock"])
def test_a_redis_py_missing_an_internal_fails_the_lane_at_construction_with_one_message_naming_it(
        server, monkeypatch, internal, remove):
    client = _client(server.url)
    try:
        remove(monkeypatch, client)
        with pytest.raises(RuntimeError) as failed:
            Lane(client)
    finally:
        monkeypatch.undo()
        client.close()
    message = str(failed.value)
    assert internal in message
    assert f"installed redis {redis_lib.__version__}" in message
    assert f"written for redis {lane_mod.WRITTEN_FOR} (pinned in setup.cfg)" in message


def test_a_connected_connection_without_its_socket_where_the_lane_reads_it_fails_the_call_with_the_message(
        make_lane, monkeypatch):
    lane = make_lane()
    original = redis.connection.AbstractConnection.connect
    hidden = []

    def connect_and_hide_the_socket(self):
        original(self)
        hidden.append(self._sock)
        self._sock = None

    monkeypatch.setattr(redis.connection.AbstractConnection, "connect", connect_and_hide_the_socket)
    try:
        with pytest.raises(RuntimeError, match=r"Connection\._sock .*written for redis 8\.1\.0"):
            lane.call(pack("PING"))
    finally:
        for sock in hidden:
            sock.close()
    assert len(hidden) == 1


# --- (g) Sentinel -----------------------------------------------------------------------------------------

def _port_of(lane: Lane) -> int:
    """The port of the server the lane's connection is on (as that server says)."""
    info = lane.call(pack("INFO", "server"))
    return int(re.search(r"tcp_port:(\d+)", info).group(1))


def test_a_readonly_reply_drops_the_connection_so_the_next_call_connects_again(make_lane, tmp_path):
    primary = EmbeddedRedis(tmp_path / "primary").start()
    node = EmbeddedRedis(tmp_path / "node").start()
    try:
        lane = make_lane(node.url)
        before = _client_id(lane)
        admin = _client(node.url)
        admin.replicaof("127.0.0.1", primary.port)  # demoted under the lane (its clients are kept)
        with pytest.raises(ReadOnlyError):
            lane.call(pack("SET", "k", "1"))
        replies = lane.call_many(pack("GET", "k"), 1)  # a new connection, in step
        assert replies == [None] and _client_id(lane) != before
        between = _client_id(lane)
        replies = lane.call_many(pack("SET", "k", "1") + pack("ECHO", "after"), 2)  # read to the end, then dropped
        assert isinstance(replies[0], ReadOnlyError) and replies[1] == "after"
        assert _client_id(lane) != between
    finally:
        node.stop()
        primary.stop()


@pytest.fixture
def sentinel_group(tmp_path):
    """A primary, its replica and one sentinel watching them as `svc` (stopped by pid at the end)."""
    from app.embedded import find_redis_server, free_port

    primary = EmbeddedRedis(tmp_path / "primary").start()
    replica = EmbeddedRedis(tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {tmp_path}\nlogfile {tmp_path}/sentinel.log\n"
                    f"sentinel monitor svc 127.0.0.1 {primary.port} 1\n"
                    "sentinel down-after-milliseconds svc 2000\nsentinel failover-timeout svc 10000\n")
    proc = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sentinel = redis_lib.Redis(port=port, decode_responses=True)
    try:
        def replica_known() -> bool:
            try:
                listed = sentinel.execute_command("SENTINEL", "REPLICAS", "svc")
            except redis_lib.RedisError:
                return False
            # redis-py reads each replica as a dict of its fields (flags as a set)
            return any(r.get("master-link-status") == "ok" and "s_down" not in r.get("flags", ()) for r in listed)

        wait_for(replica_known, timeout=30, interval=0.1, message="the sentinel to see the replica in sync")
        yield primary, replica, port
    finally:
        proc.terminate()
        proc.wait(10)
        replica.stop()
        primary.stop()


def test_a_lane_behind_sentinel_follows_the_primary_across_a_failover(sentinel_group):
    from redis.sentinel import Sentinel

    primary, replica, sentinel_port = sentinel_group
    client = Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=5).master_for(
        "svc", decode_responses=True, socket_timeout=5, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
    assert lane_mod.supports(client)
    lane = Lane(client)
    try:
        assert lane.call(pack("SET", "before", "1")) == "OK"
        assert _port_of(lane) == primary.port
        sentinel = redis_lib.Redis(port=sentinel_port, decode_responses=True)
        assert sentinel.execute_command("SENTINEL", "FAILOVER", "svc") in ("OK", True)

        def switched() -> bool:
            addr = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "svc")
            old_role = redis_lib.Redis(port=primary.port, decode_responses=True).execute_command("ROLE")[0]
            return int(addr[1]) == replica.port and old_role == "slave"

        wait_for(switched, timeout=30, interval=0.1, message="the failover to end with the old primary a replica")
        # The sentinel kills the old primary's clients when it turns it into a replica, or (if this
        # connection escaped that) the old primary answers READONLY: either way the call fails, is not
        # sent again, and the lane's next connection asks the sentinel for the new primary.
        try:
            wrote = lane.call(pack("SET", "after", "1"))
        except (ConnectionError, ReadOnlyError):
            wrote = lane.call(pack("SET", "after", "1"))
        assert wrote == "OK"
        assert _port_of(lane) == replica.port
        assert redis_lib.Redis(port=replica.port, decode_responses=True).get("after") == "1"
    finally:
        lane.close()
        client.close()


def test_the_runner_on_redis_sentinels_settings_uses_a_lane_that_finds_the_promoted_primary(tmp_path):
    from app.embedded_sentinel import EmbeddedSentinelGroup
    from app.engine.runner import ScriptRunner
    from app.redis_client import make_redis
    from app.settings import load_settings

    group = EmbeddedSentinelGroup(tmp_path / "sentinel").start()
    try:
        client = make_redis(load_settings({**os.environ, **group.env, "REDIS_URL": "", "REDIS_CLUSTER": "0"}))
        runner = ScriptRunner(client)
        assert runner.lane is not None and runner.router is None  # the lane, not redis-py's pool
        assert runner.run([("SET", "before", "1")]) == ["OK"]
        assert _port_of(runner.lane) == group.primary_port
        old = group.kill_primary()
        with pytest.raises(ConnectionError):  # on the dead primary: raised, not sent again
            runner.run([("INCR", "counter")])
        new = group.wait_for_promotion()
        assert new != old

        def incr():
            try:
                return runner.run([("INCR", "counter")])
            except ConnectionError:  # MasterNotFoundError while the sentinels settle (a 503): nothing ran
                return None

        assert wait_for(incr, timeout=15, interval=0.1, message="a call on the new primary") == [1]
        assert _port_of(runner.lane) == new
        assert group.client(new).get("counter") == "1"
        runner.close()
        client.close()
    finally:
        group.stop()
