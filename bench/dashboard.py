"""Add-to-cart with the dashboard open: does watching a flash sale slow it down?

The HTTP benchmark's server (bench/web.py: gunicorn, production config, 4 sync workers) on a
catalog of N variants (2,000; QUICK 500) beside the hot one, and add-to-cart under wrk at 64
connections on the hot variant, in rounds that take turns: with nobody watching, then with the
dashboard open (what /ops/ does: GET /api/ops/summary/ once a second with the admin key, from a
thread of this process). The median round of each stands; every round is in the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

from app.embedded import free_port
from bench import web
from bench.stores import Stores, seed_variants, sessions_for

POLL_SECONDS = 1.0  # the page's own refresh


class Watcher:
    """GET /api/ops/summary/ every second until stopped; counts answers and their latency."""

    def __init__(self, port: int, admin_key: str):
        self.port, self.key = port, admin_key
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = web.request("127.0.0.1", self.port, "GET", "/api/ops/summary/", headers=headers)
                if status == 200:
                    self.latencies.append(time.perf_counter() - t0)
                else:
                    self.failures += 1
            except OSError:
                self.failures += 1
            self.stop.wait(max(0.0, POLL_SECONDS - (time.perf_counter() - t0)))

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def run(stores: Stores, *, seconds: float, rounds: int, variants: int, log=print) -> dict:
    wrk = shutil.which("wrk")
    if not wrk:
        return {"skipped": "wrk is not on the PATH"}
    engine_db, sessions = sessions_for(stores.database_url)
    _product, (hot,) = seed_variants(sessions, 1, on_hand=web.STOCK)
    seed_variants(sessions, variants, on_hand=100)
    engine_db.dispose()
    port = free_port()
    prom_dir = stores.workdir / "prometheus-dashboard"
    shutil.rmtree(prom_dir, ignore_errors=True)
    env = stores.env(PORT=str(port), WEB_CONCURRENCY=os.environ.get("WEB_CONCURRENCY", "4"),
                     PROMETHEUS_MULTIPROC_DIR=str(prom_dir))
    admin = storefront = ""
    if stores.postgres:
        env.update(APP_ENV="production", API_KEYS=f"admin:{web.ADMIN_KEY},storefront:{web.STOREFRONT_KEY}")
        admin, storefront = web.ADMIN_KEY, web.STOREFRONT_KEY
    script = stores.workdir / "dashboard.lua"
    script.write_text(web.WRK_SCRIPT)
    server = web.Server(env, stores.workdir / "gunicorn-dashboard.log").start()
    by_mode: dict[str, list[dict]] = {"closed": [], "open": []}
    polls: list[float] = []
    failures = 0
    try:
        web.run_wrk(wrk, script, f"http://127.0.0.1:{port}/api/cart/add/", 1.0, ["add", str(hot), "warm", storefront])
        for n in range(rounds):
            for mode in ("closed", "open"):
                args = ["add", str(hot), f"{mode}{n}", storefront]
                if mode == "open":
                    with Watcher(port, admin) as watcher:
                        r = web.run_wrk(wrk, script, f"http://127.0.0.1:{port}/api/cart/add/", seconds, args)
                    polls += watcher.latencies
                    failures += watcher.failures
                else:
                    r = web.run_wrk(wrk, script, f"http://127.0.0.1:{port}/api/cart/add/", seconds, args)
                by_mode[mode].append(r)
    finally:
        server.stop()
    out: dict = {"variants": variants + 1, "seconds": seconds, "rounds": rounds,
                 "summary_polls": len(polls), "summary_failures": failures,
                 "summary_p50_ms": round(sorted(polls)[len(polls) // 2] * 1000, 1) if polls else None}
    for mode, runs in by_mode.items():
        median = sorted(runs, key=lambda x: x["per_second"])[len(runs) // 2]
        out[mode] = {"per_second": median["per_second"], "p99_ms": median["p99_ms"],
                     "by_round": [x["per_second"] for x in runs], "non_2xx": sum(x["other_status"] for x in runs)}
    closed = out["closed"]["per_second"]
    out["open_vs_closed"] = round(out["open"]["per_second"] / closed, 3) if closed else None
    log(f"  dashboard: add-to-cart {out['closed']['per_second']:,.0f}/s closed, {out['open']['per_second']:,.0f}/s "
        f"with /api/ops/summary/ polled every second ({out['open_vs_closed']}x); p99 {out['closed']['p99_ms']:.1f} "
        f"vs {out['open']['p99_ms']:.1f} ms; {len(polls)} polls (p50 {out['summary_p50_ms']} ms), "
        f"{failures} failed; by round {json.dumps({m: out[m]['by_round'] for m in by_mode})}")
    return out
