"""The `inventory` command line for ops (API.md, Command line).

Every failure ends in one line on stderr and exit 1, never a traceback: the group turns whatever a
command raises into that line (`_one_line`). Commands that need the stores check both before doing
any work, so the line names the store and where its URL came from (the environment, or the
`inventory run` recorded in ./var/stack.json).
"""
from __future__ import annotations

import sys
import time

import click

from app.settings import SettingsError, load_settings, stack_path

# listen, worker and scheduler wait this long at start for Redis to answer (a stack whose Redis comes
# up a moment after them still starts), then exit 1. Once running they outlive Redis outages.
STARTUP_WAIT_SECONDS = 10.0
_SETTINGS_KEY = "inventory.settings"


def _where(settings) -> str:
    return f" (recorded in {settings.stack_file})" if settings.stack_file else ""


def _one_line(exc: Exception, settings) -> str:
    """The reason a command failed, in one line that names the store when a store failed."""
    import redis
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from app.errors import DomainError

    if isinstance(exc, SettingsError):
        return str(exc)
    if isinstance(exc, DomainError):
        return exc.message
    where = _where(settings) if settings is not None else ""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        url = settings.redacted_redis_url() if settings is not None else "REDIS_URL"
        return f"Redis unavailable at {url}{where}: {type(exc).__name__}{_stale_run_note(settings)}"
    if isinstance(exc, redis.RedisError):
        return f"Redis error: {type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, (DBAPIError, SQLAlchemyError)):
        url = settings.redacted_database_url() if settings is not None else "DATABASE_URL"
        orig = getattr(exc, "orig", None) or exc
        return f"database unavailable at {url}{where}: {type(orig).__name__}: {_first_line(orig)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _stale_run_note(settings) -> str:
    """When the stores came from a record whose `inventory run` is gone (killed, not stopped)."""
    from app import stack

    if settings is None or not settings.stack_file:
        return ""
    record = stack.read(settings.stack_file) or {}
    pid = record.get("pid")
    return "" if stack.pid_alive(pid) else f"; its inventory run (pid {pid}) is not running"


class _Group(click.Group):
    """Whatever a command raises ends as one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the promise: one line, never a traceback
            raise click.ClickException(_one_line(exc, ctx.meta.get(_SETTINGS_KEY))) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inventory reservation engine: run the stack, reconcile, sweep, listen, seed, inspect stock.

    Run from the directory of a running `inventory run` with REDIS_URL and DATABASE_URL unset, a
    command uses that stack's stores (recorded in ./var/stack.json); set, the variables win.
    """


def _settings(use_stack: bool = True):
    settings = load_settings(use_stack=use_stack)
    click.get_current_context().meta[_SETTINGS_KEY] = settings
    return settings


def _no_redis_reason(settings) -> str:
    from app import stack

    path = stack_path()
    record = stack.read(path)
    if record is not None and record.get("state") == stack.STOPPED:
        return (f"no Redis: REDIS_URL is not set and the inventory run recorded in {path} stopped at "
                f"{record.get('stopped_at', '?')}; start it again with `inventory run`, or set REDIS_URL")
    return (f"no Redis: REDIS_URL is not set and no running inventory run is recorded in {path}; "
            "start one here with `inventory run`, or set REDIS_URL")


def _check_database(c) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    url = make_url(c.settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        from pathlib import Path

        # SQLite would create an empty file and fail later on a missing table: say it plainly.
        if not Path(url.database).exists():
            raise click.ClickException(f"no database: {c.settings.redacted_database_url()}{_where(c.settings)} "
                                       "does not exist; start `inventory run` here, or set DATABASE_URL")
    with c.db.connect() as conn:
        conn.execute(text("SELECT 1"))


def _container(database: bool = True):
    """The composition root, once both stores answered (a store that does not: one line, exit 1)."""
    from app.composition import build_container

    settings = _settings()
    if not settings.redis_configured:
        raise click.ClickException(_no_redis_reason(settings))
    c = build_container(settings)
    c.redis.ping()
    if database:
        _check_database(c)
    return c


def _await_redis(settings) -> None:
    """Wait up to STARTUP_WAIT_SECONDS for Redis to answer a PING, or fail in one line."""
    import redis

    from app.redis_client import make_redis

    if not settings.redis_configured:
        raise click.ClickException(_no_redis_reason(settings))
    deadline = time.monotonic() + STARTUP_WAIT_SECONDS
    while True:
        remaining = deadline - time.monotonic()
        try:
            client = make_redis(settings, timeout=max(0.2, min(2.0, remaining)))
            try:
                client.ping()
                return
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            if time.monotonic() + 0.5 >= deadline:
                raise click.ClickException(
                    f"Redis did not answer at {settings.redacted_redis_url()}{_where(settings)} within "
                    f"{STARTUP_WAIT_SECONDS:.0f}s: {type(exc).__name__}{_stale_run_note(settings)}") from None
        time.sleep(0.5)


def _logging() -> None:
    import logging

    logging.basicConfig(level=_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
def migrate() -> None:
    """Apply database migrations up to the newest."""
    from persistence.db import migrate as do_migrate

    settings = _settings()
    do_migrate(settings.database_url)
    click.echo(f"database migrated ({settings.redacted_database_url()})")


@main.command()
def run() -> None:
    """Run the whole stack on embedded defaults (web, listener, worker, scheduler)."""
    from app.runner import run_stack

    # Its own stores: never those of a run recorded earlier in ./var/stack.json.
    sys.exit(run_stack(_settings(use_stack=False)))


@main.command()
@click.option("--dry-run", is_flag=True, help="Report drift without repairing it.")
@click.option("--variant", "variant_ids", type=int, multiple=True, help="Only this variant (repeatable).")
def reconcile(dry_run: bool, variant_ids: tuple[int, ...]) -> None:
    """Compare the live counters with the database and repair drift."""
    from sqlalchemy import func, select

    from persistence.models import Stock

    c = _container()
    if variant_ids:
        total = len(set(variant_ids))
    else:
        with c.sessions() as s:
            total = s.scalar(select(func.count()).select_from(Stock)) or 0
    with click.progressbar(length=total, label="reconciling", file=sys.stderr, show_pos=True) as bar:
        report = c.reconciler.reconcile(list(variant_ids) or None, dry_run=dry_run, progress=bar.update)
    if report.rows:
        click.echo(f"{'variant':>10}  {'field':<10} {'expected':>10} {'actual':>10}")
        for row in report.rows:
            actual = "missing" if row["actual"] is None else row["actual"]
            click.echo(f"{row['variant_id']:>10}  {row['field']:<10} {row['expected']:>10} {actual:>10}")
    verb = "would repair" if dry_run else "repaired"
    click.echo(f"checked {report.checked}, drifted {report.drifted}, {verb} "
               f"{report.drifted if dry_run else report.repaired}, skipped (in flight) {report.skipped}, "
               f"stale checkouts finalized {report.locks_finalized}, released {report.locks_released}")
    if report.lost_holds or report.orders_finalized:
        # what a Redis failover undid (docs/OPERATIONS.md, A Redis primary lost)
        shown = ", ".join(report.lost_hold_ids[:10]) + (", ..." if report.lost_holds > 10 else "")
        click.echo(f"holds lost in a Redis failover {report.lost_holds}" + (f" ({shown})" if shown else "")
                   + f"; holds of committed orders finalized again {report.orders_finalized}")


@main.command()
def sweep() -> None:
    """Release every hold whose time has passed."""
    report = _container().sweeper.sweep()
    click.echo(f"released {report.holds} hold(s), {report.units} unit(s) over {report.variants} variant(s)")


@main.command()
def listen() -> None:
    """Release holds as their expiry events arrive (runs until Ctrl-C)."""
    from app.composition import build_container
    from jobs.listener import run_forever

    settings = _settings()
    _await_redis(settings)
    _logging()
    run_forever(build_container(settings))


@main.command()
@click.option("--burst", is_flag=True, help="Run what is queued, then exit.")
def worker(burst: bool) -> None:
    """Run an rq worker for the sweeper and reconciler jobs."""
    from jobs.scheduler import run_worker

    settings = _settings()
    _await_redis(settings)
    _logging()
    run_worker(settings, burst=burst)


@main.command()
def scheduler() -> None:
    """Enqueue the sweeper and the reconciler on their intervals."""
    from jobs.scheduler import run_scheduler

    settings = _settings()
    _await_redis(settings)
    _logging()
    run_scheduler(settings)


@main.command()
def seed() -> None:
    """Load demo data when the database is empty."""
    from app.seed import seed_command

    sys.exit(seed_command(_settings()))


@main.command()
@click.argument("variant", type=int)
def stock(variant: int) -> None:
    """Show one variant's on_hand, available, reserved and holds."""
    row = _container().inventory.get_stock(variant)
    drift = row.on_hand - row.available - row.reserved
    click.echo(f"variant {row.variant_id} ({row.sku}): on_hand {row.on_hand}, available {row.available}, "
               f"reserved {row.reserved}, active holds {row.active_holds}"
               + ("" if drift == 0 else f"  [DRIFT {drift:+d}: run inventory reconcile]"))


def _queued_jobs(settings) -> int:
    from rq import Queue

    from jobs.scheduler import rq_connection
    from jobs.tasks import QUEUE

    return len(Queue(QUEUE, connection=rq_connection(settings)))


@main.command()
def status() -> None:
    """Show the stores, the processes of a local `inventory run`, stock, holds, the invariant and the
    jobs; exit 1 when a store is down or the invariant is broken (usable as a probe)."""
    settings = _settings()
    if not settings.redis_configured:
        raise click.ClickException(_no_redis_reason(settings))
    from app.console import status_command

    problem = status_command(settings, queued_jobs=_queued_jobs)
    if problem:
        raise click.ClickException(problem)


@main.command()
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True,
              help="How many of the busiest variants to show.")
def top(limit: int) -> None:
    """A live view of the busiest variants, refreshed every second until Ctrl-C or q (one snapshot
    when the output is not a terminal)."""
    c = _container()
    from app.console import top_command

    top_command(c, limit=limit)


if __name__ == "__main__":  # pragma: no cover
    main()
