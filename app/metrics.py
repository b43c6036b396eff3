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
            REQUEST_LATENCY.labels(request.method, endpoint, str(response.status_code)).observe(
                time.perf_counter() - t0
            )
        return response
