"""HTTP API: blueprints registered on one flask-smorest Api."""
from __future__ import annotations

import marshmallow as ma
from flask import Flask
from flask_smorest import Api
from marshmallow import fields


class ErrorDetailSchema(ma.Schema):
    code = fields.String(required=True, metadata={"example": "validation_error"})
    message = fields.String(required=True)
    details = fields.Dict(required=True)


class ErrorBodySchema(ma.Schema):
    """Every error, for every endpoint (API.md, Conventions)."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class ContractApi(Api):
    """Documents the error body of API.md instead of flask-smorest's own."""

    ERROR_SCHEMA = ErrorBodySchema

from app.api.auth import install_auth
from app.api.errors import register_error_handlers


def register_api(app: Flask) -> None:
    from app.api import cart, catalog, health, inventory, ops, orders, pricing

    api = ContractApi(app, spec_kwargs={
        "info": {"description": "Redis-first inventory reservation and dynamic pricing service"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    })
    app.extensions["smorest_api"] = api
    for module in (health, catalog, inventory, pricing, cart, orders, ops):
        api.register_blueprint(module.blp)
    install_auth(app)
    # Registered after Api so these replace flask-smorest's own HTTPException handler.
    register_error_handlers(app)
    from app.metrics import install_request_metrics

    install_request_metrics(app)
