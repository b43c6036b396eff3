"""The one script runner (app/engine/runner.py) on a real redis-server of its own: every script
call, single or with commands beside it, through the lane or redis-py's pipeline, raises error
replies, reloads scripts after a NOSCRIPT exactly once, and never returns an error as a result."""
from __future__ import annotations

import pytest
import redis as redis_lib
from redis.exceptions import NoScriptError, ResponseError

from app import keys
from app.embedded import EmbeddedRedis
from app.engine.holds import variant_keys
from app.engine.runner import Script, ScriptRunner

VID = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = EmbeddedRedis(tmp_path_factory.mktemp("runner-redis")).start()
    yield s
    s.stop()


@pytest.fixture(params=["lane", "redis-py"])
def runner(request, server):
    client = redis_lib.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)
    client.flushdb()
    client.config_set("min-replicas-to-write", 0)
    r = ScriptRunner(client)
    if request.param == "redis-py":
        r.lane = None  # the path a cluster takes: redis-py's pipeline
    else:
        assert r.lane is not None
    yield r
    client.config_set("min-replicas-to-write", 0)
    r.close()
    client.close()


def _stock(runner, available=10):
    """Counters for VID as initStock builds them (on_hand, version 0, no limit)."""
    return runner.call("initStock", variant_keys(VID), [available, 0, 0])


def test_a_script_call_returns_its_reply(runner):
    assert _stock(runner)[0] == 1
    assert runner.run([("HGET", keys.stock(VID), "available")]) == ["10"]


def test_an_error_reply_among_several_calls_is_raised_after_every_reply_is_read(runner):
    _stock(runner)
    runner.redis.set("a-string", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        runner.run([("HGET", keys.stock(VID), "available"), ("HGET", "a-string", "f"), ("ECHO", "hi")])
    # nothing was left unread on the connection: the next round trip gets its own replies
    assert runner.run([("HGET", keys.stock(VID), "available"), ("ECHO", "hi")]) == ["10", "hi"]


def test_a_scripts_own_error_reply_is_raised_not_returned(runner):
    _stock(runner)
    prep = runner.prepare("reserveHold", [*variant_keys(VID), keys.sweep_index(VID), keys.variant_timer(VID)], 8)
    bad = ("7~u1", 0, 1_000, 60_000, "u1", "add", 0, "g1")  # 0 units in mode "add": an error reply
    with pytest.raises(ResponseError):
        runner.call_prepared(prep, bad)
    with pytest.raises(ResponseError):
        runner.call_prepared(prep, bad, [("GET", "anything")])
    res, beside = runner.call_prepared(prep, ("7~u1", 2, 1_000, 60_000, "u1", "add", 0, "g1"), [("ECHO", "hi")])
    assert res[:3] == [1, 8, 2] and list(beside) == ["hi"]


def test_a_refused_write_is_raised_as_redis_refusing_it(runner):
    _stock(runner)
    prep = runner.prepare("reserveHold", [*variant_keys(VID), keys.sweep_index(VID), keys.variant_timer(VID)], 8)
    runner.redis.config_set("min-replicas-to-write", 1)  # no replica: every write is refused
    args = ("7~u1", 2, 1_000, 60_000, "u1", "add", 0, "g1")
    for call in (lambda: runner.call_prepared(prep, args),
                 lambda: runner.call_prepared(prep, args, [("HGETALL", keys.cart("u1"))]),
                 lambda: runner.run([Script("releaseHold", variant_keys(VID), ["7~u1", 1_000, "any", ""])])):
        with pytest.raises(ResponseError, match="NOREPLICAS"):
            call()
    runner.redis.config_set("min-replicas-to-write", 0)
    assert runner.redis.hget(keys.stock(VID), "available") == "10"  # nothing was applied


def test_scripts_forgotten_by_the_server_are_loaded_again_and_each_call_runs_once(runner):
    _stock(runner)
    prep = runner.prepare("reserveHold", [*variant_keys(VID), keys.sweep_index(VID), keys.variant_timer(VID)], 8)
    runner.redis.script_flush()
    res, _ = runner.call_prepared(prep, ("7~u1", 1, 1_000, 60_000, "u1", "add", 0, "g1"))
    assert res[1] == 9
    runner.redis.script_flush()
    res, beside = runner.call_prepared(prep, ("7~u2", 1, 1_000, 60_000, "u2", "add", 0, "g2"), [("ECHO", "hi")])
    assert res[1] == 8 and list(beside) == ["hi"]
    runner.redis.script_flush()
    replies = runner.run([("HGET", keys.stock(VID), "available"),
                          Script("releaseHold", variant_keys(VID), ["7~u1", 1_000, "any", ""]),
                          Script("releaseHold", variant_keys(VID), ["7~u2", 1_000, "any", ""])])
    assert replies == ["8", [1, 1], [1, 1]]
    assert runner.redis.hget(keys.stock(VID), "available") == "10"  # each release ran exactly once


def test_a_script_missing_from_the_project_is_an_error_not_a_silent_no_op(runner):
    with pytest.raises(KeyError):
        runner.call("noSuchScript", [], [])


def test_a_prepared_call_checks_its_key_count(runner):
    with pytest.raises(ValueError, match="reserveHold takes 6 keys"):
        runner.prepare("reserveHold", variant_keys(VID), 8)


def test_the_runners_shas_are_the_servers(runner):
    runner.load_all()
    assert all(runner.redis.script_exists(*runner.sha.values()))
    assert NoScriptError is not ResponseError  # NOSCRIPT has its own class, retried; others are raised
