"""Fixtures of the failover tests: the private stores of the fault tests (a private Redis for the
suite's fixtures and rq, a private Postgres database), and child processes killed at the end."""
from __future__ import annotations

from tests.faults.conftest import (  # noqa: F401 - fixtures, registered here by import
    _db_engine, base_env, build, database_url, processes, redis_url)
