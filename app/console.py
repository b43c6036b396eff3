"""What `inventory status` and `inventory top` show, drawn with rich (API.md, Command line).

Both read the ops summary (app/services/ops.py, the same figures as `GET /api/ops/summary/`). Beside
a local `inventory run`, its rates come from the counter files its processes keep (the record's
`metrics_dir`), so the command line and the dashboard see the same numbers.
"""
from __future__ import annotations

import functools
import os
import select
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from app import stack
from app.metrics import counter_totals
from app.settings import Settings, redact_url, stack_path

REFRESH_SECONDS = 1.0
WIDE = 120  # the width of a snapshot written to a file or a pipe, where rich cannot ask a terminal


@dataclass
class Probe:
    """One store's answer to a trivial request."""

    store: str
    url: str
    up: bool
    ms: float | None
    error: str = ""


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, WIDE))


def _timed(store: str, url: str, call: Callable[[], object]) -> Probe:
    started = time.perf_counter()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - a store that fails in any way is down, by name
        return Probe(store, url, False, None, type(exc).__name__)
    return Probe(store, url, True, (time.perf_counter() - started) * 1000)


def probe_stores(c) -> list[Probe]:
    """Redis (and the queue's own Redis, when it has one) and the database, each asked once."""
    from sqlalchemy import text

    def database() -> None:
        from sqlalchemy.engine import make_url

        url = make_url(c.settings.database_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
                and not Path(url.database).exists():
            raise FileNotFoundError(url.database)  # connecting would create an empty file
        with c.db.connect() as conn:
            conn.execute(text("SELECT 1"))

    probes = [_timed("redis", c.settings.redacted_redis_url(), c.redis.ping)]
    if c.settings.rq_redis_url:
        from app.redis_client import make_redis

        queue = make_redis(c.settings.with_(redis_url=c.settings.rq_redis_url, redis_cluster=False,
                                            redis_sentinels=()), timeout=5)
        probes.append(_timed("redis (queue)", redact_url(c.settings.rq_redis_url), queue.ping))
        queue.close()
    probes.append(_timed("database", c.settings.redacted_database_url(), database))
    return probes


def ops_for(c):
    """The ops service; beside a recorded local stack, with that stack's counters for the rates."""
    record = stack.read(c.settings.stack_file) if c.settings.stack_file else None
    directory = (record or {}).get("metrics_dir")
    if not directory or not Path(directory).is_dir():
        return c.ops
    import socket

    from app.services.ops import OpsService

    # the same source as the stack's web server (its host name), so both share one rate sample
    return OpsService(c.runner, c.stock_repository, c.settings, functools.partial(counter_totals, directory),
                      source=socket.gethostname())


# -- inventory status -------------------------------------------------------------------------------

def _yes_no(value: bool, good: str = "yes", bad: str = "no") -> Text:
    return Text(good, style="green") if value else Text(bad, style="bold red")


def stores_table(probes: list[Probe]) -> Table:
    table = Table(title="Stores", box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in (("store", "left"), ("url", "left"), ("state", "left"), ("round trip", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for p in probes:
        state = _yes_no(p.up, "up", f"DOWN ({p.error})")
        table.add_row(p.store, p.url, state, f"{p.ms:.1f} ms" if p.ms is not None else "-")
    return table


def processes_table(record: dict, path: Path) -> Table:
    since = (f"stopped at {record.get('stopped_at', '?')}" if record.get("state") == stack.STOPPED
             else f"running since {record.get('started_at', '?')}")
    table = Table(title=f"Processes of inventory run (pid {record.get('pid')}, {since})", box=box.SIMPLE_HEAD,
                  title_justify="left", caption=f"recorded in {path}", caption_justify="left")
    for name, justify in (("process", "left"), ("pid", "right"), ("alive", "left"), ("restarts", "right"),
                          ("started", "left")):
        table.add_column(name, justify=justify)
    for p in record.get("processes", []):
        table.add_row(str(p.get("name")), str(p.get("pid")), _yes_no(stack.pid_alive(p.get("pid"))),
                      str(p.get("restarts", 0)), str(p.get("started_at", "")))
    return table


def _count_variants(c) -> int:
    from sqlalchemy import func, select

    from persistence.models import Stock

    with c.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Stock)) or 0)


def stock_table(summary: dict, variants: int) -> Table:
    totals = summary["totals"]
    table = Table(title="Stock", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("variants", "on hand", "available", "reserved", "holds live", "lapsing next minute"):
        table.add_column(name, justify="right")
    table.add_row(str(variants), str(totals["on_hand"]), str(totals["available"]), str(totals["reserved"]),
                  str(totals["holds_live"]), str(summary["holds_lapsing_next_minute"]))
    return table


def invariant_text(summary: dict) -> Text:
    inv = summary["invariant"]
    if inv["ok"]:
        return Text.assemble("Invariant available + reserved == on_hand: ", ("ok", "green"))
    ids = ", ".join(str(v) for v in inv["violations"])
    return Text.assemble("Invariant available + reserved == on_hand: ", (f"BROKEN for variant(s) {ids}", "bold red"))


def jobs_table(summary: dict, queued: int | str) -> Table:
    jobs, listener = summary["jobs"], summary["listener"]
    table = Table(title="Jobs", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("job", "last success", "last result"):
        table.add_column(name)
    sweep, rec = jobs["sweep"], jobs["reconcile"]
    table.add_row("sweep", sweep["last_success_at"] or "never", _result(released=sweep["released"]))
    table.add_row("reconcile", rec["last_success_at"] or "never",
                  _result(drifted=rec["drifted"], repaired=rec["repaired"]))
    lag = listener["lag_p99_ms"]
    table.add_row("listener", _yes_no(listener["alive"], "alive", "not alive"),
                  f"release lag p99 {lag:.0f} ms" if lag is not None else "")
    table.add_row("queue", f"{queued} job(s) waiting", "")
    return table


def _result(**numbers) -> str:
    return ", ".join(f"{k} {v}" for k, v in numbers.items() if v is not None) or "-"


def _same_stack(record: dict, settings: Settings) -> bool:
    """The recorded run is the stack these settings point at (its stores, or stores taken from it)."""
    stores = record.get("stores", {})
    return bool(settings.stack_file) or (stores.get("redis_url"), stores.get("database_url")) == (
        settings.redis_url, settings.database_url)


def status_command(settings: Settings, queued_jobs: Callable[[Settings], int]) -> str | None:
    """Print the status tables; return why the stack is unhealthy (a store down, the invariant
    broken) in one line, or None when it is healthy."""
    from app.composition import build_container

    console = _console()
    c = build_container(settings)
    try:
        probes = probe_stores(c)
        console.print(stores_table(probes))
        path = stack_path()
        record = stack.read(path)
        if record is not None and _same_stack(record, settings):
            console.print(processes_table(record, path))
        down = [p for p in probes if not p.up]
        if down:
            return "; ".join(f"{p.store} is down at {p.url}: {p.error}" for p in down)
        summary = ops_for(c).summary(limit=0)
        try:
            queued: int | str = queued_jobs(settings)
        except Exception as exc:  # noqa: BLE001 - the queue's count is a detail, not a health check
            queued = f"? ({type(exc).__name__})"
        console.print(stock_table(summary, _count_variants(c)))
        console.print(invariant_text(summary))
        console.print(jobs_table(summary, queued))
        if not summary["invariant"]["ok"]:
            ids = ", ".join(str(v) for v in summary["invariant"]["violations"])
            return f"invariant broken (available + reserved != on_hand) for variant(s) {ids}"
        return None
    finally:
        c.close()


# -- inventory top ---------------------------------------------------------------------------------

def top_view(summary: dict | None, error: str = "", limit: int = 0, live: bool = True) -> Group:
    """The busiest variants with the totals and rates above them."""
    if summary is None:
        return Group(Text(f"inventory top: {error} (retrying every {REFRESH_SECONDS:.0f}s; q quits)", style="bold red"))
    t = summary["totals"]
    inv = summary["invariant"]
    head = Text.assemble(
        ("inventory top", "bold"), f"  {summary['generated_at']}  ",
        f"reservations {summary['reservations_per_second']:.1f}/s  refusals {summary['refusals_per_second']:.1f}/s  ",
        f"holds live {t['holds_live']}  lapsing next minute {summary['holds_lapsing_next_minute']}  invariant ",
        ("ok", "green") if inv["ok"] else ("BROKEN for " + ", ".join(map(str, inv["violations"][:5])), "bold red"))
    table = Table(box=box.SIMPLE_HEAD, caption=error or ("q or Ctrl-C quits" if live else None),
                  caption_justify="left")
    for name in ("variant", "sku", "on hand", "available", "reserved", "holds", "reservations/s"):
        table.add_column(name, justify="left" if name == "sku" else "right", no_wrap=name != "sku")
    for v in summary["variants"][:limit or None]:
        table.add_row(str(v["variant_id"]), v["sku"], str(v["on_hand"]), str(v["available"]), str(v["reserved"]),
                      str(v["active_holds"]), f"{v['reservations_per_minute'] / 60:.2f}")
    return Group(head, table)


@contextmanager
def _keys():
    """A reader of single key presses from a terminal in cbreak mode (no Enter needed; Ctrl-C still
    interrupts), restored on the way out; a reader that never has a key when stdin is no terminal."""
    if not sys.stdin.isatty():
        yield lambda timeout: time.sleep(timeout)
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return os.read(fd, 32).decode(errors="replace") if ready else None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top_command(c, limit: int = 20) -> None:
    """Refresh the view every second until q or Ctrl-C; on a stdout that is no terminal, print one
    snapshot and return."""
    ops = ops_for(c)
    console = _console()
    if not console.is_terminal:
        console.print(top_view(ops.summary(limit), limit=limit, live=False))
        return
    from rich.live import Live

    def view():
        try:
            return top_view(ops.summary(limit), limit=limit)
        except Exception as exc:  # noqa: BLE001 - a store that goes away is shown, and retried
            return top_view(None, type(exc).__name__)

    try:
        with _keys() as read_key, Live(view(), console=console, auto_refresh=False, screen=False,
                                       transient=False) as live:
            next_at = time.monotonic() + REFRESH_SECONDS
            while True:
                key = read_key(next_at - time.monotonic())
                if key and "q" in key.lower():
                    return
                if time.monotonic() >= next_at:
                    live.update(view(), refresh=True)
                    next_at = time.monotonic() + REFRESH_SECONDS
    except KeyboardInterrupt:
        return
