"""Fixtures of the fault tests: private stores, apps built on them, and the checks every test ends with.

The fault tests stop, restart and cut stores, so they never use the shared ones directly:
- Redis: a private redis-server for the session (and one more per test that stops Redis);
- the database: with DATABASE_URL on Postgres, a private database on that server, created here
  and dropped at the end (other suites may empty the shared one at any moment); else SQLite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from app.composition import Container
from app.embedded import EmbeddedRedis
from app.settings import ROOT
from persistence.db import migrate
from persistence.models import Order, OrderLine, Stock

PYTHON = sys.executable


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres:"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """Overrides the suite's: a private Redis, so nothing here touches a shared one."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("faults-redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    """Overrides the suite's: a private Postgres database when DATABASE_URL names Postgres."""
    shared = os.environ.get("DATABASE_URL", "")
    if not is_postgres(shared):
        url = f"sqlite:///{tmp_path_factory.mktemp('faults-db') / 'faults.db'}"
        migrate(url)
        yield url
        return
    import psycopg2

    base = make_url(shared)
    name = f"faults_{uuid.uuid4().hex[:10]}"
    admin = _pg_connect(base)
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        yield url
    finally:
        admin = _pg_connect(base)
        try:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg2.Error:
            pass
        finally:
            admin.close()


@pytest.fixture(scope="session")
def _db_engine(database_url):
    """Overridden too: a session fixture is cached once per definition, so the suite's own engine,
    first built for a test here, would go on emptying this private database for everyone else."""
    from persistence.db import make_engine

    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _pg_connect(url):
    import psycopg2

    conn = psycopg2.connect(host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username,
                            password=url.password, dbname=url.database or "postgres")
    conn.autocommit = True
    return conn


@pytest.fixture
def base_env(env):
    env = dict(env)
    env["LOG_LEVEL"] = "WARNING"
    return env


@pytest.fixture
def build(build_app):
    """build(env) -> (test client, container); everything is closed at the end of the test."""
    return build_app


@pytest.fixture
def own_redis(tmp_path):
    """own_redis(persist=False) -> a started private EmbeddedRedis; restart(server, persist) brings
    up a new one on the same port (and directory); every one is stopped at the end."""
    servers: list[EmbeddedRedis] = []

    class Factory:
        def __call__(self, persist: bool = False) -> EmbeddedRedis:
            server = EmbeddedRedis(tmp_path / f"redis-{len(servers)}", persist=persist).start()
            servers.append(server)
            return server

        def restart(self, server: EmbeddedRedis, persist: bool) -> EmbeddedRedis:
            server.stop()
            again = EmbeddedRedis(server.directory, port=server.port, persist=persist).start()
            servers.append(again)
            return again

    yield Factory()
    for server in servers:
        server.stop()


class Processes:
    """Child processes of a test, each writing to its own log file; killed by pid at the end."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.children: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "ab")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        proc.log_path = self.directory / f"{name}.log"  # type: ignore[attr-defined]
        log.close()
        self.children.append(proc)
        return proc

    def inventory(self, name: str, command: str, env: dict) -> subprocess.Popen:
        return self.start(name, [PYTHON, "-m", "app.cli", command], env)

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM, timeout=5)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


# --- the checks every fault test ends with ---------------------------------------------------

def assert_stock_exact(container: Container, variant_ids) -> dict[int, tuple[int, int, int]]:
    """available + reserved == on_hand, reserved == the units of the live holds, available >= 0,
    on_hand >= 0, for every variant; returns {vid: (on_hand, available, reserved)}."""
    ids = sorted(set(variant_ids))
    with container.sessions() as s:
        on_hand = dict(s.execute(select(Stock.variant_id, Stock.on_hand).where(Stock.variant_id.in_(ids))).all())
    live = container.holds.counters(ids)
    out = {}
    from app import keys
    from app.engine.holdrec import unpack_hold

    for vid in ids:
        holds = container.redis.hgetall(keys.holds(vid))
        held_units = sum(h.quantity for h in map(unpack_hold, holds.values()) if h)
        c = live[vid]
        assert on_hand[vid] >= 0, f"variant {vid}: on_hand {on_hand[vid]} < 0"
        assert c.available >= 0, f"variant {vid}: available {c.available} < 0"
        assert c.reserved == held_units, f"variant {vid}: reserved {c.reserved} != units held {held_units}"
        assert c.available + c.reserved == on_hand[vid], (
            f"variant {vid}: available {c.available} + reserved {c.reserved} != on_hand {on_hand[vid]}")
        out[vid] = (on_hand[vid], c.available, c.reserved)
    return out


def assert_orders_durable(container: Container, orders: list[dict]) -> None:
    """Every order a client was given a 201 for is in the database, with the same lines and total."""
    with container.sessions() as s:
        for order in orders:
            row = s.get(Order, order["id"])
            assert row is not None, f"order {order['id']} answered 201 but is not in the database"
            lines = sorted((l.variant_id, l.quantity) for l in row.lines)
            assert lines == sorted((i["variant_id"], i["quantity"]) for i in order["items"]), order["id"]
            assert f"{row.total:.2f}" == order["total"]


def units_sold(container: Container, variant_ids) -> dict[int, int]:
    with container.sessions() as s:
        rows = s.execute(select(OrderLine.variant_id, func.sum(OrderLine.quantity))
                         .where(OrderLine.variant_id.in_(list(variant_ids))).group_by(OrderLine.variant_id))
        return {vid: int(total) for vid, total in rows}


def raw_redis(url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(url, decode_responses=True, socket_timeout=5)
