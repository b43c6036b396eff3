"""Prometheus metrics. With several gunicorn workers set PROMETHEUS_MULTIPROC_DIR (inventory run does)."""
from __future__ import annotations

import os
import time

from flask import Flask, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

HOLDS = Counter("inventory_holds_total", "Holds by what happened to them", ["event"])
REJECTIONS = Counter("inventory_rejections_total", "Refused reservations by reason", ["reason"])
RECONCILE_DRIFT = Counter("inventory_reconcile_drift_total", "Drift found and repaired by the reconciler", ["kind"])
REQUEST_LATENCY = Histogram(
    "inventory_request_seconds", "HTTP request latency", ["method", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# Every label value becomes a series kept in memory (and in each multiprocess file) for the life of
# the process, so no label may take its value from what a client sends: a request's method is any
# token a client makes up ("FOO" reaches the 405 handler), so methods outside this set are "other".
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The `method` label of a request: one of METHOD_LABELS or "other"."""
    return method if method in METHOD_LABELS else "other"


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def install_request_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer():
        g._t0 = time.perf_counter()

    @app.after_request
    def _observe(response):
        t0 = getattr(g, "_t0", None)
        if t0 is not None:
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            REQUEST_LATENCY.labels(method_label(request.method), endpoint, str(response.status_code)).observe(
                time.perf_counter() - t0
            )
        return response
