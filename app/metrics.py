"""Prometheus metrics: every family of API.md's table, on one scrape for every process of a host.

Counters and histograms are kept by the process that sees the event (web workers, the listener, the
rq worker). With PROMETHEUS_MULTIPROC_DIR set (`inventory run` and docker-compose.yml set it) each
process writes them to its own file in that directory (named by its pid) and a scrape sums them all,
with those of its subdirectories: processes that do not share a pid namespace (containers) each
write to a subdirectory of their own, so their pids cannot collide (docker-compose.yml: the listener
and the worker). The gauges are not kept by any process: they are read from the stores when
/metrics is scraped (`LiveCollector`, from the ops summary's scan), so they are as fresh as the
scrape and the same whichever worker answers.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


def _multiprocess_dir() -> str | None:
    # prometheus_client itself decides from this variable, when imported, whether values go to files
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


if _multiprocess_dir():  # a container's own subdirectory of a shared volume: made before any metric
    os.makedirs(_multiprocess_dir(), exist_ok=True)

HOLD_EVENTS = ("created", "released", "expired", "committed")
HOLDS = Counter("inventory_holds_total", "Holds by what happened to them", ["event"])
REJECTIONS = Counter("inventory_rejections_total", "Refused reservations by reason", ["reason"])
RECONCILE_DRIFT = Counter("inventory_reconcile_drift_total", "Drift found and repaired by the reconciler", ["kind"])
REQUEST_LATENCY = Histogram(
    "inventory_request_seconds", "HTTP request latency", ["method", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RELEASE_LAG = Histogram(
    "inventory_release_lag_seconds", "From a hold's expiry to its units being back in available",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
HOLDS_LOST = Counter("inventory_holds_lost_total",
                     "Acknowledged holds found lost by the reconciler (a cart line whose hold vanished)")
STORE_ERRORS = Counter("inventory_store_errors_total", "Redis and database failures the service saw", ["store"])
STORES = ("redis", "database")
# Every series exists from the start at 0, so a rate() or an alert sees the first increase.
for _event in HOLD_EVENTS:
    HOLDS.labels(_event)
for _reason in ("insufficient_stock", "limit_exceeded", "checkout_in_progress"):  # app/engine/holds.py
    REJECTIONS.labels(_reason)
for _kind in ("found", "repaired"):
    RECONCILE_DRIFT.labels(_kind)
for _store in STORES:
    STORE_ERRORS.labels(_store)

# Every label value becomes a series kept in memory (and in each multiprocess file) for the life of
# the process, so no label may take its value from what a client sends: a request's method is any
# token a client makes up ("FOO" reaches the 405 handler), so methods outside this set are "other".
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The `method` label of a request: one of METHOD_LABELS or "other"."""
    return method if method in METHOD_LABELS else "other"




# -- store errors ------------------------------------------------------------------------------------

def store_of(exc: BaseException) -> str | None:
    """"redis" or "database" when the exception is a failure of that store's client, else None."""
    module = type(exc).__module__ or ""
    if module.startswith(("redis", "hiredis")):
        return "redis"
    if module.startswith(("sqlalchemy", "psycopg2")):
        return "database"
    return None


def count_store_error(store: str) -> None:
    STORE_ERRORS.labels(store).inc()


# -- release lag ---------------------------------------------------------------------------------

LAG_WINDOW = 2048  # the listener's p99 is taken over its last releases, at most this many
LAG_WINDOW_S = 300.0  # ... and at most this old
_recent_lags: deque[tuple[float, float]] = deque(maxlen=LAG_WINDOW)
_lag_lock = threading.Lock()


def observe_release_lags(released_ms: int, expiries_ms) -> None:
    """One observation per released hold: from its expiry time to `released_ms`, when its units were
    back (the sweeps call this with what their sweep released)."""
    at = time.monotonic()
    for expiry in expiries_ms:
        lag = max(0, released_ms - int(expiry)) / 1000
        RELEASE_LAG.observe(lag)
        with _lag_lock:
            _recent_lags.append((at, lag))


def expiry_scores(reply) -> list[float]:
    """The scores of a ZRANGE ... WITHSCORES reply, flat (RESP2: member, score, ...) or in pairs."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [float(score) for _member, score in reply]
    return [float(score) for score in reply[1::2]]


def release_lag_p99_ms() -> float | None:
    """The p99 release lag of this process's last releases (LAG_WINDOW, LAG_WINDOW_S), None if none."""
    horizon = time.monotonic() - LAG_WINDOW_S
    with _lag_lock:
        lags = sorted(lag for at, lag in _recent_lags if at >= horizon)
    if not lags:
        return None
    return round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 1)


# -- counter totals (the ops summary's rates) -----------------------------------------------------

def _process_files(pattern: str = "*.db", root: str | None = None) -> list[str]:
    """The multiprocess files of every process: the directory's own and its subdirectories'."""
    root = root or _multiprocess_dir()
    return glob.glob(os.path.join(root, pattern)) + glob.glob(os.path.join(root, "*", pattern))


class _AllProcesses:
    """Every process's counters and histograms, summed (prometheus_client's MultiProcessCollector
    reads one directory; this reads the subdirectories too)."""

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        return MultiProcessCollector.merge(_process_files(), accumulate=True)


def counter_totals(directory: str | None = None) -> dict[str, float]:
    """{"reserved": successful reserves, "refused": refused reserves} summed over every process of
    this host (the multiprocess files of `directory`, or of PROMETHEUS_MULTIPROC_DIR when set, else
    this process)."""
    if directory or _multiprocess_dir():
        from prometheus_client.multiprocess import MultiProcessCollector

        families = MultiProcessCollector.merge(_process_files("counter_*.db", directory))
    else:
        families = [*HOLDS.collect(), *REJECTIONS.collect()]
    totals = {"reserved": 0.0, "refused": 0.0}
    for family in families:
        for sample in family.samples:
            if sample.name == "inventory_holds_total" and sample.labels.get("event") == "created":
                totals["reserved"] += sample.value
            elif sample.name == "inventory_rejections_total":
                totals["refused"] += sample.value
    return totals


# -- gauges read at scrape time ----------------------------------------------------------------------

class LiveCollector:
    """The gauges of API.md, read from the stores on every scrape through the ops service's scan
    (one database query and one Redis round trip per 500 variants; on a big store, the scan another
    caller made in the last few seconds: app/services/ops.py). When a store cannot be read,
    the gauges are left out of that scrape (an absent series is what an alert on staleness sees)
    and the failure is counted in inventory_store_errors_total; the counters are still served."""

    def __init__(self, ops):
        self.ops = ops  # app.services.ops.OpsService

    def collect(self):
        try:
            live = self.ops.gauges()
        except Exception as exc:  # noqa: BLE001 - a store down must not take the counters with it
            store = store_of(exc)
            if store is None:
                raise
            count_store_error(store)
            log.warning("metrics: gauges left out, %s unavailable (%s)", store, type(exc).__name__)
            return
        units = GaugeMetricFamily("inventory_units", "Units summed over variants, by state", labels=["state"])
        for state in ("on_hand", "available", "reserved"):
            units.add_metric([state], live["totals"][state])
        yield units
        yield GaugeMetricFamily("inventory_holds_live", "Holds not yet lapsed, committed or released",
                                value=live["totals"]["holds_live"])
        yield GaugeMetricFamily("inventory_invariant_violations",
                                "Variants whose counters break available + reserved == on_hand (0 when healthy)",
                                value=live["violations"])
        jobs = GaugeMetricFamily("inventory_job_last_success_timestamp_seconds",
                                 "When each job last succeeded (Unix time)", labels=["job"])
        for job, at in live["job_success_s"].items():
            if at is not None:  # never succeeded: no sample, rather than a 1970 that looks like a stale job
                jobs.add_metric([job], at)
        yield jobs


class _ThisProcess:
    """This process's own metrics (no multiprocess directory)."""

    def collect(self):
        return REGISTRY.collect()


def render(ops=None) -> tuple[bytes, str]:
    """The scrape: every process's counters and histograms, and the gauges read now through `ops`
    (by default the ops service of the Flask app serving the request, when there is one)."""
    registry = CollectorRegistry()
    if _multiprocess_dir():
        registry.register(_AllProcesses())
    else:
        registry.register(_ThisProcess())
    if ops is None:
        ops = _app_ops()
    if ops is not None:
        registry.register(LiveCollector(ops))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _app_ops():
    from flask import current_app, has_app_context

    if has_app_context() and "container" in current_app.extensions:
        return current_app.extensions["container"].ops
    return None


def install_request_metrics(app) -> None:
    from flask import request

    # the histogram's child for each (method, rule, status) seen, so a request does not pay for
    # labels()' checks and lock; the keys are bounded (METHOD_LABELS x the app's rules x statuses)
    children: dict[tuple[str, str, int], object] = {}
    perf_counter = time.perf_counter

    @app.before_request
    def _start_timer():
        request.environ["inventory.t0"] = perf_counter()

    @app.after_request
    def _observe(response):
        req = request._get_current_object()
        t0 = req.environ.get("inventory.t0")
        if t0 is not None:
            rule = req.url_rule
            key = (method_label(req.method), rule.rule if rule is not None else "unmatched", response.status_code)
            child = children.get(key)
            if child is None:
                child = children[key] = REQUEST_LATENCY.labels(key[0], key[1], str(key[2]))
            child.observe(perf_counter() - t0)
        return response
