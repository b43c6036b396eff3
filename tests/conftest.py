"""Shared fixtures. Tests run against a real Redis and a real database:

- REDIS_URL set: that server (its db is flushed around each test); unset: an embedded redis-server.
- DATABASE_URL set: that database (tables emptied around each test); unset: SQLite in a temp dir.
"""
from __future__ import annotations

import os
import time

import pytest
import redis as redis_lib
from sqlalchemy import text

from app import create_app
from app.composition import Container
from app.embedded import EmbeddedRedis
from app.settings import load_settings
from persistence.db import make_engine, migrate
from persistence.models import Base

ADMIN_KEY = "admin-test-key-0001"
STOREFRONT_KEY = "storefront-test-key-0001"


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, message: str = "condition"):
    """Poll predicate until it is truthy or the bound passes; returns its last value or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def pytest_addoption(parser):
    parser.addoption("--redis-cluster", action="store_true",
                     help="run against a 3-primary Redis Cluster started on loopback ports")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--redis-cluster"):
        return
    skip = pytest.mark.skip(reason="single-node only (MONITOR, per-db tricks or a private server)")
    for item in items:
        if "single_node" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster_mode(request) -> bool:
    return bool(request.config.getoption("--redis-cluster"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory, cluster_mode):
    if cluster_mode:
        from app.embedded import EmbeddedCluster

        cluster = EmbeddedCluster(tmp_path_factory.mktemp("cluster")).start()
        try:
            yield cluster.url
        finally:
            cluster.stop()
        return
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rq_url(tmp_path_factory, cluster_mode):
    """On a cluster, rq's queue needs a standalone Redis (RQ_REDIS_URL); otherwise REDIS_URL serves."""
    if not cluster_mode:
        yield None
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("rq-redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


def raw_redis(url: str, cluster: bool, decode: bool = False):
    """A plain client to the test Redis: a cluster client when the suite runs on a cluster."""
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, decode_responses=decode)
    return redis_lib.Redis.from_url(url, decode_responses=decode)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    migrate(url)
    return url


@pytest.fixture(scope="session")
def _db_engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _empty_database(engine) -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                conn.execute(text(f"DELETE FROM {name}"))
            conn.execute(text("DELETE FROM sqlite_sequence")) if _has_sqlite_sequence(conn) else None


def _has_sqlite_sequence(conn) -> bool:
    return bool(conn.execute(text("SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'")).first())


@pytest.fixture
def clean_stores(redis_url, _db_engine, cluster_mode, rq_url):
    """Empty Redis db and database before (and after) a test."""
    if rq_url:
        redis_lib.Redis.from_url(rq_url).flushdb()
    r = raw_redis(redis_url, cluster_mode)
    r.flushdb()
    _empty_database(_db_engine)
    yield
    r.flushdb()
    r.close()


@pytest.fixture
def env(redis_url, database_url, cluster_mode, rq_url):
    """The environment a test's settings are read from; tests may change it before `settings`."""
    return {
        "REDIS_CLUSTER": "1" if cluster_mode else "0",
        **({"RQ_REDIS_URL": rq_url} if rq_url else {}),
        "APP_ENV": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "HOLD_TTL_SECONDS": "900",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def settings(env, clean_stores):
    return load_settings(env)


@pytest.fixture
def container(settings):
    c = Container(settings)
    yield c
    c.close()


@pytest.fixture
def app(container):
    application = create_app(container=container)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def build_app(clean_stores):
    """build_app(env) -> (test client, container) for settings a test changes; closed at the end."""
    made: list[Container] = []

    def build(env: dict):
        container = Container(load_settings(env))
        made.append(container)
        return create_app(container=container).test_client(), container

    yield build
    for container in made:
        container.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth_env(env):
    env["API_KEYS"] = f"admin:{ADMIN_KEY},storefront:{STOREFRONT_KEY}"
    return env


@pytest.fixture
def admin_headers():
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def storefront_headers():
    return {"Authorization": f"Bearer {STOREFRONT_KEY}"}


@pytest.fixture
def redis_client(redis_url, cluster_mode):
    r = raw_redis(redis_url, cluster_mode, decode=True)
    yield r
    r.close()


@pytest.fixture
def sessions(container):
    return container.sessions
