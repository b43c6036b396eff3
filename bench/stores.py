"""The stores a benchmark run owns: a private redis-server and a throwaway database.

The harness never touches the machine's Redis on 6379 or the `test` database that the test suite
uses: it starts its own redis-server (app.embedded.EmbeddedRedis: a free loopback port, keyspace
notifications on, no persistence) and creates the Postgres database `inventory_bench` through
BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/postgres), dropping it at the end.
Without Postgres it falls back to SQLite and the row-lock comparison is skipped.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import redis as redis_lib
from sqlalchemy import insert, literal, select

from app.composition import Container
from app.embedded import EmbeddedRedis
from app.redis_client import make_redis
from app.settings import Settings, load_settings
from persistence.db import make_engine, make_session_factory, migrate
from persistence.models import PricingRule, Product, Stock, Variant

PG_ADMIN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "inventory_bench"
RUN_LOCK_KEY = 0x1B3C4E  # pg_advisory_lock key: one benchmark run at a time on a Postgres server

# Keys the harness writes itself (the baselines and the naive demo); the service's keys are built
# in app/keys.py only. The prefix keeps them apart from every key of the service.
BENCH_PREFIX = "bench:"


def lua_stock_key(variant_id: int) -> str:
    """The minimal Lua reserve's counter (a plain integer string)."""
    return f"{BENCH_PREFIX}lua:{{v{int(variant_id)}}}"


def naive_stock_key(name: str) -> str:
    """The naive read-then-write demo's counter."""
    return f"{BENCH_PREFIX}naive:{name}"


_sku = itertools.count(1)


def _pg_connect(dsn: str):
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=3)
    conn.autocommit = True
    return conn


def _db_url(admin_url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=database).render_as_string(hide_password=False)


@dataclass
class Stores:
    """Start with `start()`, always `stop()`; `env()` is what every child process reads its settings from."""

    workdir: Path
    redis_server: EmbeddedRedis | None = None
    database_url: str = ""
    pg_admin_url: str = ""
    pg_note: str = ""
    _lock: object = None  # the maintenance-database connection holding the run lock

    @classmethod
    def create(cls) -> "Stores":
        return cls(Path(tempfile.mkdtemp(prefix="inventory-bench-")))

    @property
    def postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    def start(self) -> "Stores":
        self.redis_server = EmbeddedRedis(self.workdir / "redis").start()
        admin = os.environ.get("BENCH_PG_URL") or PG_ADMIN_DEFAULT
        try:
            self._lock = _pg_connect(admin)
        except Exception as exc:  # noqa: BLE001 - any failure: no Postgres for this run
            self.pg_note = (
                f"Postgres unreachable at {admin} ({type(exc).__name__}): row-lock comparison skipped"
            )
            self.database_url = f"sqlite:///{self.workdir / 'bench.db'}"
        else:
            self._take_run_lock()
            with self._lock.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{BENCH_DB}"')
            self.pg_admin_url = admin
            self.database_url = _db_url(admin, BENCH_DB)
        migrate(self.database_url)
        return self

    def _take_run_lock(self) -> None:
        """One run at a time per Postgres server: a second one would drop this one's database (and
        share its cores). A session-level advisory lock, so it goes with the connection, even on a crash."""
        with self._lock.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,))
            if cur.fetchone()[0]:
                return
            print(
                f"bench: another benchmark run is using {BENCH_DB}; waiting for it to finish (up to 30 min)",
                flush=True,
            )
            cur.execute("SET lock_timeout = '30min'")
            cur.execute("SELECT pg_advisory_lock(%s)", (RUN_LOCK_KEY,))

    def stop(self) -> None:
        if self.redis_server is not None:
            self.redis_server.stop()
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            if self.pg_admin_url:
                with lock.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - report, never hide the results
            print(f"bench: could not drop database {BENCH_DB}: {exc}")
        finally:
            lock.close()  # releases the run lock

    # -- settings and clients -----------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "APP_ENV": "development",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "LOG_LEVEL": "WARNING",
            "HOLD_TTL_SECONDS": "900",
        }
        env.update(extra)
        return env

    def settings(self, **extra: str) -> Settings:
        return load_settings(self.env(**extra))

    def container(self, **extra: str) -> Container:
        return Container(self.settings(**extra))

    def redis(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.redis_url, decode_responses=True)

    def flush_redis(self) -> None:
        r = self.redis()
        try:
            r.flushdb()
        finally:
            r.close()

    def used_memory(self) -> int:
        r = self.redis()
        try:
            return int(r.info("memory")["used_memory"])
        finally:
            r.close()

    def pg_dsn(self) -> str:
        """The bench database as a libpq DSN (for the psycopg2 row-lock baseline)."""
        return self.database_url.replace("postgresql+psycopg2://", "postgresql://")

    def versions(self) -> dict[str, str]:
        out = {}
        r = self.redis()
        try:
            out["redis"] = r.info("server")["redis_version"]
        finally:
            r.close()
        if self.postgres:
            conn = _pg_connect(self.pg_dsn())
            try:
                with conn.cursor() as cur:
                    cur.execute("SHOW server_version")
                    out["postgres"] = cur.fetchone()[0]
                    cur.execute("SHOW synchronous_commit")
                    out["postgres_synchronous_commit"] = cur.fetchone()[0]
            finally:
                conn.close()
        else:
            out["database"] = "sqlite"
        return out


class Replica:
    """A replica of the bench's Redis (a second redis-server in the work dir), attached with
    `REPLICAOF` only while rounds with HOLD_DURABILITY=replicated run (bench/engine.py, bench/web.py)
    and detached (`REPLICAOF NO ONE`) for the others, so those are measured as without it."""

    def __init__(self, stores: Stores):
        self.primary_port = stores.redis_server.port
        self.server = EmbeddedRedis(stores.workdir / "replica").start()
        self.client = make_redis(load_settings({"REDIS_URL": self.server.url}))
        self.primary = stores.redis()

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def attach(self, timeout: float = 60.0) -> None:
        """REPLICAOF the bench's Redis, and wait until it is online with every write."""
        self.client.execute_command("REPLICAOF", "127.0.0.1", self.primary_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.primary.info("replication")
            slave = info.get("slave0") or {}
            if slave.get("state") == "online" and slave.get("offset") == info["master_repl_offset"]:
                return
            time.sleep(0.05)
        raise RuntimeError("the bench's replica did not come in sync")

    def detach(self) -> None:
        self.client.execute_command("REPLICAOF", "NO", "ONE")

    def stop(self) -> None:
        self.client.close()
        self.primary.close()
        self.server.stop()


# --- seeding -----------------------------------------------------------------------------------


def seed_variants(
    sessions,
    count: int,
    *,
    on_hand: int,
    base_price: str = "500.00",
    status: str = "active",
    batch: int = 5000,
) -> tuple[int, list[int]]:
    """One product with `count` variants and their stock rows, written in bulk; (product id, variant ids)."""
    with sessions.begin() as s:
        product = Product(
            name=f"Bench product {next(_sku)}", description="", base_price=Decimal(base_price), status=status
        )
        s.add(product)
        s.flush()
        product_id = product.id
    now = datetime.now(timezone.utc)
    first = next(_sku)
    for start in range(0, count, batch):
        rows = [
            {
                "product_id": product_id,
                "sku": f"BENCH-{first}-{i}",
                "attributes": {},
                "price_adjustment": Decimal("0.00"),
                "created_at": now,
                "updated_at": now,
            }
            for i in range(start, min(count, start + batch))
        ]
        with sessions.begin() as s:
            s.execute(insert(Variant), rows)
    with sessions.begin() as s:
        s.execute(
            insert(Stock).from_select(
                ["variant_id", "on_hand", "version", "updated_at"],
                select(Variant.id, literal(on_hand), literal(0), literal(now, Stock.updated_at.type)).where(
                    Variant.product_id == product_id
                ),
            )
        )
        ids = list(s.scalars(select(Variant.id).where(Variant.product_id == product_id).order_by(Variant.id)))
    return product_id, ids


def seed_rules(sessions, product_id: int) -> None:
    """Two rules that a real catalog would have (a bulk discount and a tier discount)."""
    with sessions.begin() as s:
        s.add(
            PricingRule(
                name="Bulk 5+",
                type="BULK",
                priority=1,
                percent=Decimal("10.00"),
                min_quantity=5,
                product_id=product_id,
                active=True,
            )
        )
        s.add(
            PricingRule(
                name="Gold tier",
                type="USER_TIER",
                priority=2,
                percent=Decimal("5.00"),
                tier="GOLD",
                active=True,
            )
        )


def sessions_for(database_url: str):
    engine = make_engine(database_url)
    return engine, make_session_factory(engine)
