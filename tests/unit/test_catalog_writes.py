"""Catalog and pricing-rule writes go through one transaction helper that bumps the catalog version
(app.catalog_cache.write), so a write function cannot forget the bump."""
from __future__ import annotations

import ast
import inspect

import pytest

from app import catalog_cache
from app.services import catalog, pricing


class FakeRedis:
    def __init__(self):
        self.calls: list[str] = []
        self.version = 0

    def ping(self):
        self.calls.append("ping")
        return True

    def incr(self, key):
        assert key == catalog_cache.KEY
        self.calls.append("bump")
        self.version += 1
        return self.version


class FakeSessions:
    """A session factory whose transactions record what happened to them."""

    def __init__(self, log: list[str]):
        self.log = log

    def begin(self):
        log = self.log

        class Transaction:
            def __enter__(self):
                log.append("begin")
                return "session"

            def __exit__(self, exc_type, exc, tb):
                log.append("rollback" if exc_type else "commit")
                return False

        return Transaction()


def test_a_write_pings_redis_then_commits_then_bumps():
    redis = FakeRedis()
    with catalog_cache.write(FakeSessions(redis.calls), redis) as session:
        assert session == "session"
        redis.calls.append("work")
    assert redis.calls == ["ping", "begin", "work", "commit", "bump"]
    assert redis.version == 1


def test_a_write_that_fails_rolls_back_and_does_not_bump():
    redis = FakeRedis()
    with pytest.raises(ValueError):
        with catalog_cache.write(FakeSessions(redis.calls), redis):
            raise ValueError("refused")
    assert redis.calls == ["ping", "begin", "rollback"]
    assert redis.version == 0


def test_a_write_without_redis_is_refused_before_it_starts():
    log: list[str] = []
    with pytest.raises(TypeError):
        with catalog_cache.write(FakeSessions(log), None):
            pass
    assert log == []


def test_a_write_with_redis_down_writes_nothing():
    class DownRedis(FakeRedis):
        def ping(self):
            raise ConnectionError("down")

    redis = DownRedis()
    with pytest.raises(ConnectionError):
        with catalog_cache.write(FakeSessions(redis.calls), redis):
            redis.calls.append("work")
    assert redis.calls == []


def _begin_calls(module) -> list[str]:
    """Every `<x>.begin(...)` call in a module's code (docstrings and comments do not count)."""
    tree = ast.parse(inspect.getsource(module))
    return [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "begin"]


@pytest.mark.parametrize("module", [catalog, pricing], ids=lambda m: m.__name__)
def test_no_catalog_write_opens_its_own_transaction(module):
    # Each write goes through catalog_cache.write (via the service's _write), which bumps the version.
    assert _begin_calls(module) == []
