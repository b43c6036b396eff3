"""Liveness, readiness and metrics."""
from __future__ import annotations

import logging

import marshmallow as ma
from flask import Response, jsonify
from marshmallow import fields
from sqlalchemy import text

from app import keys
from app.api.base import Blueprint
from app.api.context import container

log = logging.getLogger(__name__)
blp = Blueprint("ops-health", __name__, description="Health and readiness")


class HealthSchema(ma.Schema):
    status = fields.String(metadata={"example": "ok"})


class ReadySchema(ma.Schema):
    status = fields.String(validate=ma.validate.OneOf(["ready", "unavailable"]))
    checks = fields.Dict(keys=fields.String(), values=fields.String(),
                         metadata={"example": {"database": "ok", "scripts": "ok", "redis": "ok"}})


_METRICS_DOC = {"responses": {"200": {"description": "Prometheus text exposition format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}}}


@blp.route("/healthz")
@blp.response(200, HealthSchema)
@blp.doc(summary="Liveness: 200 while the process lives")
def healthz():
    return jsonify({"status": "ok"})


@blp.route("/readyz")
@blp.response(200, ReadySchema)
@blp.alt_response(503, schema=ReadySchema, description="a store does not answer (Retry-After is set)")
@blp.doc(summary="Readiness: 200 when the database and Redis answer and the scripts are loaded")
def readyz():
    c = container()
    checks = {}
    try:
        with c.db.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        c.runner.load_all()
        checks["scripts"] = "ok"
        # SCRIPT LOAD is served by a Redis that refuses writes (OOM, NOREPLICAS, READONLY,
        # MASTERDOWN, MISCONF): a write through the add path's own connection tells
        c.runner.run([("SET", keys.readiness_probe(), "1", "PX", 10_000)])
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values()) and "scripts" in checks
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    if not ready:
        response.headers["Retry-After"] = "2"
    return response


@blp.route("/metrics")
@blp.doc(summary="Prometheus metrics (admin key, or open when auth is off)", **_METRICS_DOC)
def metrics():
    from app.metrics import render

    body, content_type = render()
    return Response(body, content_type=content_type)
