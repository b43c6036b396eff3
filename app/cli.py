"""The `inventory` command line for ops (API.md, Command line)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click

from app.settings import SettingsError, load_settings


def _settings():
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inventory reservation engine: run the stack, reconcile, sweep, listen, seed, inspect stock."""


@main.command()
def migrate() -> None:
    """Apply database migrations up to the newest."""
    from persistence.db import migrate as do_migrate

    settings = _settings()
    do_migrate(settings.database_url)
    click.echo(f"database migrated ({settings.redacted_database_url()})")


def _container():
    from app.composition import build_container

    return build_container(_settings())


def _logging() -> None:
    import logging

    logging.basicConfig(level=_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@contextmanager
def _store_errors():
    """A store that cannot be reached, or a domain error, is a one-line reason and exit 1."""
    import redis
    from sqlalchemy.exc import OperationalError

    from app.errors import DomainError

    try:
        yield
    except DomainError as exc:
        raise click.ClickException(exc.message) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise click.ClickException(f"Redis unavailable: {type(exc).__name__}") from None
    except OperationalError as exc:
        raise click.ClickException(f"database unavailable: {type(exc.orig).__name__}") from None


@main.command()
def run() -> None:
    """Run the whole stack on embedded defaults (web, listener, worker, scheduler)."""
    from app.runner import run_stack

    sys.exit(run_stack(_settings()))


@main.command()
@click.option("--dry-run", is_flag=True, help="Report drift without repairing it.")
@click.option("--variant", "variant_ids", type=int, multiple=True, help="Only this variant (repeatable).")
def reconcile(dry_run: bool, variant_ids: tuple[int, ...]) -> None:
    """Compare the live counters with the database and repair drift."""
    from sqlalchemy import func, select

    from persistence.models import Stock

    c = _container()
    with _store_errors():
        if variant_ids:
            total = len(set(variant_ids))
        else:
            with c.sessions() as s:
                total = s.scalar(select(func.count()).select_from(Stock)) or 0
        with click.progressbar(length=total, label="reconciling", file=sys.stderr,
                               show_pos=True) as bar:
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


@main.command()
def sweep() -> None:
    """Release every hold whose time has passed."""
    c = _container()
    with _store_errors():
        report = c.sweeper.sweep()
    click.echo(f"released {report.holds} hold(s), {report.units} unit(s) over {report.variants} variant(s)")


@main.command()
def listen() -> None:
    """Release holds as their expiry events arrive (runs until Ctrl-C)."""
    from jobs.listener import run_forever

    _logging()
    run_forever(_container())


@main.command()
@click.option("--burst", is_flag=True, help="Run what is queued, then exit.")
def worker(burst: bool) -> None:
    """Run an rq worker for the sweeper and reconciler jobs."""
    from jobs.scheduler import run_worker

    _logging()
    with _store_errors():
        run_worker(_settings(), burst=burst)


@main.command()
def scheduler() -> None:
    """Enqueue the sweeper and the reconciler on their intervals."""
    from jobs.scheduler import run_scheduler

    _logging()
    with _store_errors():
        run_scheduler(_settings())


@main.command()
def seed() -> None:
    """Load demo data when the database is empty."""
    from app.seed import seed_command

    sys.exit(seed_command(_settings()))


@main.command()
@click.argument("variant", type=int)
def stock(variant: int) -> None:
    """Show one variant's on_hand, available, reserved and holds."""
    c = _container()
    with _store_errors():
        row = c.inventory.get_stock(variant)
    drift = row.on_hand - row.available - row.reserved
    click.echo(f"variant {row.variant_id} ({row.sku}): on_hand {row.on_hand}, available {row.available}, "
               f"reserved {row.reserved}, active holds {row.active_holds}"
               + ("" if drift == 0 else f"  [DRIFT {drift:+d}: run inventory reconcile]"))


@main.command()
def status() -> None:
    """Show the stores, the queue and a summary of stock."""
    from sqlalchemy import func, select, text

    from persistence.models import Stock

    c = _container()
    settings = c.settings
    click.echo(f"environment  {settings.app_env}")
    click.echo(f"database     {settings.redacted_database_url()}")
    click.echo(f"redis        {settings.redacted_redis_url() or '(embedded, not running)'}")
    ok = True
    try:
        with c.sessions() as s:
            s.execute(text("SELECT 1"))
            variants = s.scalar(select(func.count()).select_from(Stock)) or 0
            on_hand = s.scalar(select(func.coalesce(func.sum(Stock.on_hand), 0))) or 0
        click.echo(f"database     ok: {variants} variant(s), {on_hand} unit(s) on hand")
    except Exception as exc:  # noqa: BLE001
        ok = False
        click.echo(f"database     DOWN ({type(exc).__name__})")
    try:
        c.redis.ping()
        due = c.sweeper.variants_with_holds()
        from rq import Queue

        from jobs.scheduler import rq_connection
        from jobs.tasks import QUEUE

        queued = len(Queue(QUEUE, connection=rq_connection(settings)))
        click.echo(f"redis        ok: {due} variant(s) with holds, {queued} job(s) queued")
    except Exception as exc:  # noqa: BLE001
        ok = False
        click.echo(f"redis        DOWN ({type(exc).__name__})")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
