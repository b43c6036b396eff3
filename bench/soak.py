"""Soak test: mixed shopper and admin load from several processes for N seconds, with the stock
invariant checked every second and the order ledger checked at the end.

    python -m bench.soak --seconds 60          # or: make soak MINUTES=10

Each worker process builds the app (the real Flask app, through its test client, so validation,
auth, error mapping and the services all run) and loops over adds, quantity changes, removes,
checkouts (some retried with their Idempotency-Key), cart reads, prices and stock adjustments.
Holds last HOLD_TTL_SECONDS=2, so lines lapse all the time; in this process the expiry listener,
a sweeper (every second) and a reconciler (every 5 seconds) run as in production.

A violation is any of: a 5xx; `available + reserved != on_hand` or `reserved != units held` for a
variant with nothing in flight (same version in both stores, no adjustment half-way), or
`available < 0`; drift found by the reconciler; at the end, an order a shopper was given a 201 for
that is missing or different in the database, an order nobody was given, a retried Idempotency-Key
that made a second order, or a variant whose ledger does not add up to its on_hand.

The stores are private by default: an embedded redis-server and an SQLite file in a temporary
directory (`--database-url` takes an empty database of your own, e.g. Postgres).
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

ADMIN_KEY = "soak-admin-key-0001"
STOREFRONT_KEY = "soak-storefront-key-0001"
HOLD_TTL_SECONDS = 2
ON_HAND = 300
ALLOWED = {
    "add": {201, 400, 409},
    "change": {200, 400, 404, 409},
    "remove": {204, 404, 409},
    "checkout": {201, 400, 409, 410},
    "retry": {201, 400, 409, 410},
    "cart": {200},
    "price": {200},
    "adjust": {200, 409},
}


def _env(redis_url: str, database_url: str) -> dict:
    return {
        "APP_ENV": "test", "REDIS_URL": redis_url, "DATABASE_URL": database_url, "LOG_LEVEL": "ERROR",
        "HOLD_TTL_SECONDS": str(HOLD_TTL_SECONDS), "API_KEYS": f"admin:{ADMIN_KEY},storefront:{STOREFRONT_KEY}",
    }


# --- the worker processes -----------------------------------------------------------------------

def _worker(index: int, env: dict, deadline: float, variants: list[tuple[int, int]], results) -> None:
    """One shopper process: random operations until the deadline; sends back counts, orders, violations."""
    import logging

    logging.disable(logging.CRITICAL)  # expected errors (lapsed holds, 409s) are counted, not logged
    from app import create_app
    from app.composition import Container
    from app.settings import load_settings

    container = Container(load_settings(env))
    client = create_app(container=container).test_client()
    shop = {"Authorization": f"Bearer {STOREFRONT_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    rng = random.Random(index)
    # Enough shoppers per process that some come back after their holds lapsed (410, expired lines),
    # and some never come back at all (their holds lapse and the listener or sweeper returns them).
    users = [f"w{index}u{k}" for k in range(150)]
    abandoned = 0
    counts: Counter = Counter()
    orders: list[dict] = []
    violations: list[str] = []
    keyed: dict[str, int] = {}  # Idempotency-Key -> order id

    def record(op: str, response) -> dict | None:
        status = response.status_code
        counts[(op, status)] += 1
        body = response.get_json(silent=True)
        if status >= 500 or status not in ALLOWED[op]:
            violations.append(f"{op}: {status} {response.get_data(as_text=True)[:200]}")
        return body

    try:
        while time.time() < deadline:
            user = rng.choice(users)
            roll = rng.random()
            if roll < 0.40:
                vid, product = rng.choice(variants)
                if rng.random() < 0.15:
                    abandoned += 1
                    user = f"w{index}gone{abandoned}"
                record("add", client.post("/api/cart/add/", headers=shop, json={
                    "user_id": user, "variant_id": vid, "quantity": rng.randint(1, 3)}))
            elif roll < 0.60:
                cart = record("cart", client.get(f"/api/cart/{user}/", headers=shop))
                items = (cart or {}).get("items") or []
                if items:
                    item = rng.choice(items)
                    if roll < 0.50:
                        record("remove", client.delete(f"/api/cart/{item['id']}/", headers=shop))
                    else:
                        record("change", client.patch(f"/api/cart/{item['id']}/", headers=shop,
                                                      json={"quantity": rng.randint(1, 4)}))
            elif roll < 0.80:
                key = uuid.uuid4().hex if rng.random() < 0.5 else None
                headers = {**shop, "Idempotency-Key": key} if key else shop
                response = client.post(f"/api/cart/{user}/checkout/", headers=headers)
                body = record("checkout", response)
                if response.status_code == 201:
                    orders.append(body)
                    if key:
                        keyed[key] = body["id"]
                        if rng.random() < 0.3:  # the client never heard the answer: it retries
                            again = client.post(f"/api/cart/{user}/checkout/", headers=headers)
                            again_body = record("retry", again)
                            if again.status_code != 201 or again_body["id"] != body["id"]:
                                violations.append(f"retry of key {key}: {again.status_code} {again_body}")
                elif response.status_code == 410:
                    # the shopper is told which lines lapsed and removes them
                    for item in body["error"]["details"].get("expired_item_ids", []):
                        record("remove", client.delete(f"/api/cart/{item}/", headers=shop))
            elif roll < 0.90:
                vid, product = rng.choice(variants)
                record("price", client.get(f"/api/pricing/{product}/price/?quantity={rng.randint(1, 9)}"
                                           f"&variant_id={vid}"))
            else:
                vid, _ = rng.choice(variants)
                delta = rng.choice([-3, -1, 2, 4, 6, 10, 15])  # restocks outweigh write-offs
                record("adjust", client.post(f"/api/inventory/{vid}/adjust/", headers=admin,
                                             json={"delta": delta, "reason": "soak"}))
    except Exception as exc:  # noqa: BLE001 - reported as a violation, never hidden
        violations.append(f"worker {index} crashed: {type(exc).__name__}: {exc}")
    finally:
        container.close()
    results.put({"index": index, "counts": dict(counts), "orders": orders, "violations": violations,
                 "keyed": keyed})


# --- checks in this process ---------------------------------------------------------------------

class Monitor:
    """The invariant, every second, for every variant with nothing in flight."""

    def __init__(self, container, variant_ids: list[int]):
        self.c = container
        self.variant_ids = variant_ids
        self.checks = self.skipped = 0
        self.violations: list[str] = []

    def check_once(self) -> None:
        from sqlalchemy import select

        from app import keys
        from app.engine.holdrec import unpack_hold
        from persistence.models import Stock

        with self.c.sessions() as s:  # the database first, then Redis: see the module docstring
            db = {vid: (on_hand, version) for vid, on_hand, version in s.execute(
                select(Stock.variant_id, Stock.on_hand, Stock.version).where(Stock.variant_id.in_(self.variant_ids)))}
        for vid in self.variant_ids:
            pipe = self.c.redis.pipeline(transaction=True)  # one atomic snapshot of this variant
            pipe.hmget(keys.stock(vid), ["available", "reserved", "version", "adj_pending"])
            pipe.hvals(keys.holds(vid))
            (available, reserved, version, pending), holds = pipe.execute()
            on_hand, db_version = db[vid]
            available, reserved = int(available or 0), int(reserved or 0)
            held = sum(h.quantity for h in map(unpack_hold, holds) if h)
            if available < 0 or on_hand < 0:
                self.violations.append(f"variant {vid}: available {available}, on_hand {on_hand}")
            if reserved != held:
                self.violations.append(f"variant {vid}: reserved {reserved} != units held {held}")
            if int(version or 0) != db_version or int(pending or 0) > 0:
                self.skipped += 1  # a checkout or adjustment is between its two stores right now
                continue
            self.checks += 1
            if available + reserved != on_hand:
                self.violations.append(f"variant {vid}: available {available} + reserved {reserved} "
                                       f"!= on_hand {on_hand} (version {db_version})")


def _every(interval: float, stop: threading.Event, fn, errors: list[str], name: str) -> threading.Thread:
    def loop():
        while not stop.wait(interval):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=loop, daemon=True, name=name)
    thread.start()
    return thread


def _seed(sessions, count: int) -> list[tuple[int, int]]:
    from persistence.models import Product, Stock, StockMovement, Variant

    out = []
    with sessions.begin() as s:
        tag = uuid.uuid4().hex[:6]
        for p in range(max(1, count // 2)):
            product = Product(name=f"Soak {p}", description="", base_price=Decimal("20.00"), status="active")
            s.add(product)
            s.flush()
            for v in range(2):
                if len(out) == count:
                    break
                variant = Variant(product_id=product.id, sku=f"SOAK-{tag}-{p}-{v}", attributes={},
                                  price_adjustment=Decimal("1.50") * v)
                s.add(variant)
                s.flush()
                s.add(Stock(variant_id=variant.id, on_hand=ON_HAND, version=0))
                s.add(StockMovement(variant_id=variant.id, delta=ON_HAND, on_hand_after=ON_HAND, kind="initial",
                                    reason="soak", actor="soak"))
                out.append((variant.id, product.id))
    return out


def _ledger(container, variant_ids, reported: list[dict], keyed: dict[str, int]) -> list[str]:
    """Every 201 has its order, nothing else was ordered, and each variant's ledger adds up."""
    from sqlalchemy import func, select

    from persistence.models import IdempotencyRecord, Order, OrderLine, Stock, StockMovement

    problems = []
    with container.sessions() as s:
        ids = set(s.scalars(select(Order.id).join(OrderLine).where(OrderLine.variant_id.in_(variant_ids))))
        for order in reported:
            row = s.get(Order, order["id"])
            if row is None:
                problems.append(f"order {order['id']} answered 201 but is not in the database")
                continue
            lines = sorted((l.variant_id, l.quantity) for l in row.lines)
            if lines != sorted((i["variant_id"], i["quantity"]) for i in order["items"]) \
                    or f"{row.total:.2f}" != order["total"]:
                problems.append(f"order {order['id']} differs from what the shopper was told")
        unreported = ids - {o["id"] for o in reported}
        if unreported:
            problems.append(f"{len(unreported)} order(s) in the database that no shopper was given: "
                            f"{sorted(unreported)[:10]}")
        records = dict(s.execute(select(IdempotencyRecord.key, IdempotencyRecord.response)).all())
        for key, order_id in keyed.items():
            if key not in records or records[key]["id"] != order_id:
                problems.append(f"Idempotency-Key {key}: recorded {records.get(key)}, answered order {order_id}")
        for vid in variant_ids:
            on_hand = s.get(Stock, vid).on_hand
            moved = s.scalar(select(func.coalesce(func.sum(StockMovement.delta), 0))
                             .where(StockMovement.variant_id == vid))
            sold = s.scalar(select(func.coalesce(func.sum(OrderLine.quantity), 0)).where(OrderLine.variant_id == vid))
            checkout_moves = s.scalar(select(func.coalesce(func.sum(StockMovement.delta), 0)).where(
                StockMovement.variant_id == vid, StockMovement.kind == "checkout"))
            if moved != on_hand:
                problems.append(f"variant {vid}: ledger sums to {moved}, on_hand is {on_hand}")
            if -checkout_moves != sold:
                problems.append(f"variant {vid}: {sold} units in orders, {-checkout_moves} in checkout ledger rows")
    return problems


# --- the run -------------------------------------------------------------------------------------

def run(seconds: float, *, redis_url: str | None = None, database_url: str | None = None, workers: int = 3,
        variants: int = 8, out=sys.stdout) -> dict:
    """Run the soak; returns its figures, `violations` among them (0 is a pass)."""
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    server = None
    try:
        if redis_url is None:
            from app.embedded import EmbeddedRedis

            server = EmbeddedRedis(tmp / "redis").start()
            redis_url = server.url
        database_url = database_url or f"sqlite:///{tmp / 'soak.db'}"
        return _run(seconds, redis_url, database_url, workers, variants, out)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(seconds, redis_url, database_url, workers, count, out) -> dict:
    import logging

    # Quiet the jobs of this process (expected warnings are counted, not logged) without touching
    # the logging of whoever called run(): a test runner's capture, for one.
    quiet = [logging.getLogger(name) for name in ("app", "jobs")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        return _run_quiet(seconds, redis_url, database_url, workers, count, out)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _run_quiet(seconds, redis_url, database_url, workers, count, out) -> dict:
    from app.composition import Container
    from app.settings import load_settings
    from jobs.listener import ExpiryListener
    from persistence.db import migrate

    env = _env(redis_url, database_url)
    migrate(database_url)
    c = Container(load_settings(env))
    try:
        seeded = _seed(c.sessions, count)
        variant_ids = [vid for vid, _ in seeded]
        c.holds.counters(variant_ids)
        monitor = Monitor(c, variant_ids)
        stop = threading.Event()
        errors: list[str] = []
        drift: list[dict] = []
        jobs = Counter()

        listener = ExpiryListener(c, stop=stop)
        threading.Thread(target=listener.run, daemon=True, name="listener").start()

        def sweep():
            jobs["sweeps"] += 1
            jobs["swept holds"] += c.sweeper.sweep().holds

        def reconcile():
            jobs["reconciles"] += 1
            report = c.reconciler.reconcile(variant_ids)
            drift.extend(report.rows)

        def check():
            monitor.check_once()
            jobs["invariant checks"] += 1

        threads = [_every(1.0, stop, sweep, errors, "sweeper"), _every(5.0, stop, reconcile, errors, "reconciler"),
                   _every(1.0, stop, check, errors, "monitor")]

        started = time.time()
        deadline = started + seconds
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(i, env, deadline, seeded, results), daemon=True)
                 for i in range(workers)]
        for p in procs:
            p.start()
        print(f"soak: {workers} worker processes, {len(variant_ids)} variants x {ON_HAND} units, {seconds:.0f}s, "
              f"stores {load_settings(env).redacted_redis_url()} and {database_url.split('://')[0]}", file=out)
        collected = []
        last_report = time.time()
        while len(collected) < workers and time.time() < deadline + 120:
            try:
                collected.append(results.get(timeout=1))
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting, report progress
                pass
            if time.time() - last_report >= 30 and time.time() < deadline:
                last_report = time.time()
                print(f"soak: {time.time() - started:.0f}s, {monitor.checks} invariant checks, "
                      f"{len(monitor.violations)} violations so far", file=out, flush=True)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        stop.set()
        for t in threads:
            t.join(30)
        elapsed = time.time() - started

        # quiet now: settle, then every check must be exact
        c.sweeper.sweep()
        final = c.reconciler.reconcile(variant_ids, grace_ms=0)
        drift.extend(final.rows)
        monitor.check_once()
        violations = list(monitor.violations) + [f"reconciler drift: {row}" for row in drift] + errors
        if len(collected) < workers:
            violations.append(f"only {len(collected)} of {workers} workers reported")
        counts: Counter = Counter()
        orders, keyed = [], {}
        for r in collected:
            counts.update({tuple(k): v for k, v in r["counts"].items()})
            orders += r["orders"]
            keyed.update(r["keyed"])
            violations += r["violations"]
        violations += _ledger(c, variant_ids, orders, keyed)
        with c.sessions() as s:
            from sqlalchemy import func, select

            from persistence.models import OrderLine

            sold = s.scalar(select(func.coalesce(func.sum(OrderLine.quantity), 0))
                            .where(OrderLine.variant_id.in_(variant_ids)))
        ops = sum(counts.values())
        by_op = Counter()
        for (op, _status), n in counts.items():
            by_op[op] += n
        figures = {
            "seconds": round(elapsed, 1), "workers": workers, "operations": ops,
            "operations_per_second": round(ops / elapsed, 1) if elapsed else 0, "by_operation": dict(by_op),
            "by_status": {f"{op} {status}": n for (op, status), n in sorted(counts.items())},
            "orders": len(orders), "units_sold": int(sold), "idempotent_retries": counts.get(("retry", 201), 0),
            "lapsed_holds_released": jobs["swept holds"] + listener.released_holds,
            "invariant_checks": monitor.checks * 1, "in_flight_skips": monitor.skipped,
            "sweeps": jobs["sweeps"], "reconciles": jobs["reconciles"] + 1,
            "violations": len(violations), "violation_samples": violations[:20],
        }
        _print(figures, out)
        return figures
    finally:
        c.close()


def _print(f: dict, out) -> None:
    print(f"soak: {f['operations']} operations in {f['seconds']}s ({f['operations_per_second']}/s) "
          f"from {f['workers']} processes", file=out)
    print("  by operation: " + ", ".join(f"{k} {v}" for k, v in sorted(f["by_operation"].items())), file=out)
    print("  by status:    " + ", ".join(f"{k}: {v}" for k, v in f["by_status"].items()), file=out)
    print(f"  orders {f['orders']} ({f['units_sold']} units, {f['idempotent_retries']} idempotent retries), "
          f"lapsed holds released {f['lapsed_holds_released']}, sweeps {f['sweeps']}, reconciles {f['reconciles']}",
          file=out)
    print(f"  invariant checked {f['invariant_checks']} times (one variant, one second) with nothing in flight "
          f"({f['in_flight_skips']} skipped mid-checkout or mid-adjustment)", file=out)
    print(f"  violations: {f['violations']}", file=out)
    for v in f["violation_samples"]:
        print(f"    {v}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seconds", type=float, help="how long to run (default 60)")
    group.add_argument("--minutes", type=float, help="how long to run, in minutes")
    parser.add_argument("--workers", type=int, default=3, help="shopper processes (default 3)")
    parser.add_argument("--variants", type=int, default=8, help="variants under load (default 8)")
    parser.add_argument("--database-url", help="an empty database to use instead of a temporary SQLite file")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes * 60 if args.minutes else 60)
    figures = run(seconds, database_url=args.database_url, workers=args.workers, variants=args.variants)
    return 1 if figures["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
