"""HTTP API: blueprints registered on one flask-smorest Api."""
from __future__ import annotations

from flask import Flask
from flask_smorest import Api

from app.api.auth import install_auth
from app.api.errors import register_error_handlers


def register_api(app: Flask) -> None:
    from app.api import cart, catalog, health, inventory, ops, orders, pricing

    api = Api(app, spec_kwargs={
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
