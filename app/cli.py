"""The `inventory` command line for ops (API.md, Command line)."""
from __future__ import annotations

import sys

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


def _not_yet(name: str) -> None:
    click.echo(f"inventory {name}: not implemented yet", err=True)
    sys.exit(2)


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
    _not_yet("reconcile")


@main.command()
def sweep() -> None:
    """Release every hold whose time has passed."""
    _not_yet("sweep")


@main.command()
def listen() -> None:
    """Release holds as their expiry events arrive."""
    _not_yet("listen")


@main.command()
def seed() -> None:
    """Load demo data when the database is empty."""
    from app.seed import seed_command

    sys.exit(seed_command(_settings()))


@main.command()
@click.argument("variant", type=int)
def stock(variant: int) -> None:
    """Show one variant's on_hand, available, reserved and holds."""
    _not_yet("stock")


@main.command()
def status() -> None:
    """Show the stores, the processes and a summary of stock."""
    _not_yet("status")


if __name__ == "__main__":  # pragma: no cover
    main()
