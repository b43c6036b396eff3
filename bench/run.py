"""Run the benchmarks in one go: `python -m bench [--quick] [--only engine,http,...]`.

Starts a private redis-server and a throwaway Postgres database (bench.stores), runs each section,
checks the targets (bench.report.targets), prints the table and writes JSON, markdown and the chart
to bench/results/. Exits 1 when a section failed or an invariant broke; a missed speed target is a
MISS in the table, never a failure: benchmarks are not timed tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone

from bench import cluster, correctness, dashboard, engine, expiry, memory, ops_summary, overload, reconcile, report, web
from bench.stores import Stores, seed_variants, sessions_for

# ops last but correctness: its 10,000 variants would otherwise be in the reconcile section's count
SECTIONS = ("engine", "cluster", "http", "overload", "dashboard", "expiry", "reconcile", "memory", "ops", "correctness")


@dataclass(frozen=True)
class Config:
    engine_seconds: float
    engine_rounds: int
    http_seconds: float
    http_warmup_seconds: float
    http_rounds: int
    lag_holds: int
    other_live_holds: int
    sweep_interval: int
    reconcile_variants: int
    memory_holds: int
    overload_seconds: float = 8.0
    cluster_processes: tuple[int, ...] = (8, 32, 64)
    race_processes: int = 64
    race_attempts: int = 300
    race_stock: int = 100
    ops_variants: int = 10_000
    ops_holds: int = 100_000


FULL = Config(
    # five interleaved rounds of 1 s: on a shared 2-core machine one approach's rate moves by tens of
    # percent from one second to the next, and the median of five stands still better than of three
    engine_seconds=5.0,
    engine_rounds=5,
    # five interleaved rounds of 2 s (the median round stands), as for the engine
    http_seconds=10,
    http_warmup_seconds=2,
    http_rounds=5,
    lag_holds=200,
    other_live_holds=2000,
    sweep_interval=30,
    reconcile_variants=100_000,
    memory_holds=100_000,
)
QUICK = Config(
    engine_seconds=1.5,
    engine_rounds=1,
    http_seconds=3,
    http_warmup_seconds=1,
    http_rounds=1,
    lag_holds=60,
    other_live_holds=500,
    sweep_interval=5,
    reconcile_variants=10_000,
    memory_holds=10_000,
    overload_seconds=3.0,
    cluster_processes=(8, 32),
    ops_variants=2_000,
    ops_holds=20_000,
)


def _correctness(stores: Stores, cfg: Config) -> dict:
    engine_db, sessions = sessions_for(stores.database_url)
    _, (vid,) = seed_variants(sessions, 1, on_hand=cfg.race_stock)
    engine_db.dispose()
    dsn = stores.pg_dsn() if stores.postgres else None
    out = correctness.run_races(
        stores.env(),
        vid,
        processes=cfg.race_processes,
        attempts=cfg.race_attempts,
        stock=cfg.race_stock,
        pg_dsn=dsn,
    )
    for race in out["races"]:
        print(
            f"  race {race['seller']:<34} sold {race['sold']:>4} of {race['stock']} "
            f"(oversold {race['oversold']})"
        )
    return out


RUNNERS = {
    "engine": lambda s, c: engine.run(s, seconds=c.engine_seconds, rounds=c.engine_rounds),
    # the same durations and rounds as the engine benchmark
    "cluster": lambda s, c: cluster.run(
        s, seconds=c.engine_seconds, rounds=c.engine_rounds, processes=c.cluster_processes
    ),
    "http": lambda s, c: web.run(s, seconds=c.http_seconds, warmup_seconds=c.http_warmup_seconds, rounds=c.http_rounds),
    # 512 and 2,048 connections on one hot variant, and a sold-out one: bench/overload.py
    "overload": lambda s, c: overload.run(s, seconds=c.overload_seconds),
    "expiry": lambda s, c: expiry.run(
        s, lag_holds=c.lag_holds, other_live=c.other_live_holds, sweep_interval=c.sweep_interval
    ),
    "reconcile": lambda s, c: reconcile.run(s, variants=c.reconcile_variants),
    "memory": lambda s, c: memory.run(s, holds=c.memory_holds),
    "ops": lambda s, c: ops_summary.run(s, variants=c.ops_variants, holds=c.ops_holds),
    # add-to-cart with /ops/ open: three rounds each way of a third of the HTTP time
    "dashboard": lambda s, c: dashboard.run(s, seconds=max(2.0, c.http_seconds / 3), rounds=3,
                                            variants=c.ops_variants // 5),
    "correctness": _correctness,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("QUICK") == "1",
        help="the short version (under two minutes); also QUICK=1",
    )
    parser.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = QUICK if args.quick else FULL
    if os.environ.get("SWEEP_INTERVAL_SECONDS"):
        cfg = Config(**{**cfg.__dict__, "sweep_interval": int(os.environ["SWEEP_INTERVAL_SECONDS"])})
    logging.basicConfig(level=logging.WARNING)

    started = time.monotonic()
    results: dict = {
        "quick": args.quick,
        "started_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": (
            f"python -m bench --only {','.join(sections)}{' --quick' if args.quick else ''}"
            if set(sections) != set(SECTIONS)
            else ("make bench QUICK=1" if args.quick else "make bench")
        ),
        "sections": sections,
        # a run of some sections writes its own latest-<sections> files, beside the full run's
        "partial": set(sections) != set(SECTIONS),
        "config": cfg.__dict__,
        "machine": report.machine(),
        "errors": {},
        "section_seconds": {},
    }
    print(f"bench: {'QUICK' if args.quick else 'full'} run of {', '.join(sections)}")
    stores = Stores.create()
    try:
        stores.start()
        results["versions"] = stores.versions()
        print(
            f"bench: redis-server {stores.redis_url}, database {stores.database_url}, "
            f"work dir {stores.workdir}"
        )
        if stores.pg_note:
            print(f"bench: {stores.pg_note}")
        for section in sections:
            print(f"== {section}", flush=True)
            t0 = time.monotonic()
            try:
                results[section] = RUNNERS[section](stores, cfg)
            except Exception:  # noqa: BLE001 - one section failing must not lose the others
                results["errors"][section] = traceback.format_exc()
                print(f"  {section} FAILED:\n{results['errors'][section]}")
            results["section_seconds"][section] = round(time.monotonic() - t0, 1)
    finally:
        stores.stop()
        if results["errors"]:
            print(f"bench: logs kept in {stores.workdir}")
        else:
            shutil.rmtree(stores.workdir, ignore_errors=True)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = report.targets(results, args.quick)
    text = (
        report.table(results)
        + f"\n\ntotal {results['total_seconds']} s "
        + "("
        + ", ".join(f"{k} {v} s" for k, v in results["section_seconds"].items())
        + ")"
    )
    print()
    print(text)
    paths = report.write_files(results, text)
    print()
    for name, path in paths.items():
        print(f"bench: {name}: {path}")
    broken = [name for name, ok in report.invariant_checks(results) if not ok]
    oversold = [
        t for t in results["targets"] if t["target"].startswith("correctness") and t["status"] == "MISS"
    ]
    return 1 if results["errors"] or broken or oversold else 0
