"""Python-side logic of the engine: key names, hold ids, the Lua loader, the listener's handler.

fakeredis stands in for Redis here only, where what is tested is the Python around the scripts
(it runs EVALSHA but sends no `expired` events); the scripts themselves are tested in tests/lua.
"""
from __future__ import annotations

import re

import fakeredis
import pytest
from redis import exceptions as redis_exceptions
from redis.crc import key_slot

from app import keys
from app.engine import scripts
from app.settings import Settings
from app.engine.expiry import Sweeper, ensure_expired_events, expired_channel
from app.engine.holdrec import hold_id_for, parse_hold_id, unpack_hold
from app.engine.holds import Holds
from app.engine.runner import ScriptRunner
from jobs.listener import ExpiryListener

LUA_FILES = sorted(scripts.LUA_DIR.glob("*.lua"))


# --- key names ------------------------------------------------------------------------------

def test_every_per_variant_key_carries_the_variant_hash_tag():
    for build in (keys.stock, keys.holds, keys.hold_expiry, keys.customer_units):
        assert build(42).endswith("{v42}")
    assert keys.variant_timer(42) == "inv:ht:{v42}"
    same_variant = (keys.stock(42), keys.holds(42), keys.variant_timer(42))
    assert len({key_slot(k.encode()) for k in same_variant}) == 1


def test_keys_of_different_variants_do_not_collide():
    assert keys.stock(1) != keys.stock(11)
    assert keys.holds(1) != keys.holds(11)


def test_a_cart_key_carries_the_users_tag_not_a_variants():
    assert keys.cart("101") == "inv:cart:{u101}"
    assert "{v" not in keys.cart("101")


def test_a_timer_key_parses_back_to_its_variant():
    assert keys.parse_variant_timer(keys.variant_timer(7)) == 7
    assert keys.parse_variant_timer(keys.variant_timer(123456)) == 123456


@pytest.mark.parametrize("key", [
    "inv:stock:{v7}",           # not a timer
    "inv:ht:{vx}",              # variant not a number
    "inv:ht:{v}",               # no variant
    "inv:ht:{v7}:7~a",          # the old per-hold form
    "inv:ht:{v7",               # no closing brace
    "other:ht:{v7}",            # another application's key
    "",
])
def test_a_key_that_is_not_a_timer_parses_to_none(key):
    assert keys.parse_variant_timer(key) is None


def test_a_hold_id_is_one_per_customer_and_variant_and_parses_back():
    assert hold_id_for(5, "alice") == "5~alice"
    assert parse_hold_id("5~alice") == (5, "alice")
    assert parse_hold_id("5~al~ice") == (5, "al~ice")


@pytest.mark.parametrize("raw", ["5", "5~", "~alice", "x~alice", "12345678901~a", ""])
def test_a_malformed_hold_id_parses_to_none(raw):
    assert parse_hold_id(raw) is None


def test_a_packed_hold_unpacks_into_its_fields():
    h = unpack_hold("3|1700000000000|l|alice|ab12|tok|1699999999000")
    assert (h.quantity, h.expires_ms, h.state, h.user, h.gen, h.token, h.locked_ms) == (
        3, 1700000000000, "locked", "alice", "ab12", "tok", 1699999999000)
    assert unpack_hold("3|17|h|bob|g||0").state == "held"
    assert unpack_hold(None) is None
    assert unpack_hold("3|17|h") is None


# --- the Lua loader ---------------------------------------------------------------------------

def test_the_loader_finds_one_file_per_script_name():
    assert scripts.names() == sorted([
        "adjustStock", "dropCartLines", "finalizeHold", "initStock", "lockHold", "markLostLines", "reconcileStock",
        "releaseHold", "reserveBundle", "reserveHold", "sweepHolds", "unlockHold"])


def test_includes_are_expanded_in_place_and_nothing_is_left_unresolved():
    helpers = (scripts.LUA_DIR / "includes" / "holds.lua").read_text()
    for name in scripts.names():
        text = scripts.source(name)
        assert not re.search(r"^--@include", text, re.MULTILINE)
        if name in ("dropCartLines", "markLostLines"):  # cart scripts: no hold helpers
            continue
        assert helpers in text
        assert text.index(helpers) < text.index("KEYS[1]", text.index(helpers))


def test_an_unknown_script_name_is_refused():
    with pytest.raises(FileNotFoundError):
        scripts.source("noSuchScript")


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.name)
def test_a_scripts_file_name_states_the_keys_its_header_lists_and_the_body_uses_no_other(path):
    declared = scripts.key_count(path.stem.split("-")[0])
    text = path.read_text()
    header = text[:text.index("]]")]
    if declared == scripts.VARIABLE_KEYS:
        # a varying number of KEYS: the header states KEYS[1] and the layout of the rest, which
        # the body reaches by computed index only
        assert "KEYS[1]" in header and re.search(r"KEYS\[\d*i\b", header)
        assert {int(n) for n in re.findall(r"KEYS\[(\d+)\]", text[text.index("]]"):])} == {1}
        return
    assert sorted({int(n) for n in re.findall(r"KEYS\[(\d+)\]", header)}) == list(range(1, declared + 1))
    body = text[text.index("]]"):]
    used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
    assert used and used <= set(range(1, declared + 1))


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.name)
def test_no_script_builds_a_key_name_of_its_own(path):
    """Every key comes in KEYS: no string literal that looks like one of our keys, no concatenated names."""
    body = scripts.source(path.stem.split("-")[0])
    assert keys.PREFIX not in body
    assert not re.search(r'redis\.call\("\w+",\s*"', body)
    assert not re.search(r'redis\.call\("\w+",\s*\w+\s*\.\.', body)


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.name)
def test_every_script_header_states_its_returns(path):
    header = path.read_text().split("]]")[0]
    assert "ARGV[1]" in header and "Returns" in header


# --- the engine's Python side, on fakeredis -------------------------------------------------------

@pytest.fixture
def fake_engine():
    r = fakeredis.FakeRedis(decode_responses=True)
    engine = Holds(ScriptRunner(r), repository=None, settings=Settings(hold_ttl_seconds=60))
    r.hset(keys.stock(1), mapping={"available": 10, "reserved": 0, "version": 0, "adj_pending": 0})
    yield engine
    r.close()


def test_the_engine_turns_script_replies_into_a_reservation(fake_engine):
    r = fake_engine.reserve(1, "alice", 3, now=1_000, ttl_ms=500)
    assert (r.hold_id, r.quantity, r.expires_ms, r.available) == ("1~alice", 3, 1_500, 7)
    assert fake_engine.runner.redis.zscore(keys.sweep_index(1), "1") == 1_500


def test_the_engine_reloads_its_scripts_when_the_server_forgot_them(fake_engine):
    fake_engine.reserve(1, "alice", 1, now=1_000, ttl_ms=500)
    fake_engine.runner.redis.script_flush()
    assert fake_engine.reserve(1, "bob", 1, now=1_000, ttl_ms=500).available == 8


def test_the_listener_handler_sweeps_the_variant_and_rearms_its_timer_for_the_next_hold(fake_engine):
    fake_engine.reserve(1, "alice", 3, now=1_000, ttl_ms=500)
    fake_engine.reserve(1, "bob", 2, now=1_000, ttl_ms=900)
    timer = keys.variant_timer(1)
    sweeper = Sweeper(fake_engine.runner, fake_engine)
    container = type("C", (), {"sweeper": sweeper, "redis": fake_engine.runner.redis})()
    listener = ExpiryListener(container)
    assert listener.handle([1, 1], now=1_500) == 3  # alice's hold lapsed, bob's not yet
    assert (listener.released_holds, listener.released_units) == (1, 3)
    assert fake_engine.runner.redis.zscore(keys.sweep_index(1), "1") == 1_900
    assert fake_engine.runner.redis.exists(timer) == 1  # armed for bob's expiry
    assert listener.handle([1], now=1_600) == 0  # an early or repeated event: nothing
    assert listener.handle([1], now=1_900) == 2
    assert fake_engine.runner.redis.hmget(keys.stock(1), "available", "reserved") == ["10", "0"]
    assert fake_engine.runner.redis.exists(timer) == 0  # no holds left: no timer


def test_the_expired_channel_names_the_clients_database():
    assert expired_channel(fakeredis.FakeRedis(db=3)) == "__keyevent@3__:expired"


class _ManagedRedis:
    """A server that refuses CONFIG, as managed Redis services do."""

    def config_get(self, *args, **kwargs):
        raise redis_exceptions.ResponseError("unknown command 'CONFIG'")

    config_set = config_get


def test_where_config_is_refused_the_listener_warns_and_leaves_expiry_to_the_sweeper(caplog):
    assert ensure_expired_events(_ManagedRedis()) is False
    assert any("sweeper releases lapsed holds alone" in r.getMessage() for r in caplog.records)

