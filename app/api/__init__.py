"""HTTP API: blueprints registered on one flask-smorest Api."""
from __future__ import annotations

import marshmallow as ma
from flask import Flask
from flask_smorest import Api
from marshmallow import fields

from app.api.auth import install_auth
from app.api.errors import register_error_handlers


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


class _BodyLimit:
    """MAX_CONTENT_LENGTH for bodies of unknown length (chunked): werkzeug cuts such a body off at
    the limit without an error, and a cut-off body can still be valid JSON. Read one byte past the
    limit here, and mark the request so it is answered 413 like any other oversize body."""

    FLAG = "inventory.body_too_large"

    def __init__(self, wsgi_app, limit: int):
        self.wsgi_app, self.limit = wsgi_app, limit

    def __call__(self, environ, start_response):
        from werkzeug.wsgi import get_content_length

        if environ.get("wsgi.input_terminated") and get_content_length(environ) is None:
            import io

            environ.pop("HTTP_TRANSFER_ENCODING", None)  # the body is now of known length
            data = environ["wsgi.input"].read(self.limit + 1)
            if len(data) > self.limit:
                environ[self.FLAG] = True
                data = b""
            environ["wsgi.input"] = io.BytesIO(data)
            environ["CONTENT_LENGTH"] = str(len(data))
        return self.wsgi_app(environ, start_response)


def install_body_limit(app: Flask) -> None:
    from flask import request
    from werkzeug.exceptions import RequestEntityTooLarge

    app.wsgi_app = _BodyLimit(app.wsgi_app, app.config["MAX_CONTENT_LENGTH"])

    @app.before_request
    def _too_large():
        if request.environ.get(_BodyLimit.FLAG):
            raise RequestEntityTooLarge()


def _skip_doc_wrappers(app: Flask, *views) -> None:
    """Dispatch these views to their own function, without flask-smorest's decorators around it.

    Those decorators document the view (the OpenAPI document was built from them at registration,
    and is unchanged) and, at each call, hand a finished Response through untouched: a view that
    returns reply(...) gains nothing from them but their cost (five wrappers for add-to-cart)."""
    import inspect

    for view in views:
        endpoint = next(name for name, func in app.view_functions.items() if func is view)
        plain = inspect.unwrap(view)
        if plain.__module__ != view.__module__ or plain.__name__ != view.__name__:
            raise RuntimeError(f"cannot unwrap the view of {endpoint}")
        app.view_functions[endpoint] = plain


def register_api(app: Flask) -> None:
    from app.api import cart, catalog, health, inventory, ops, orders, pages, pricing

    api = ContractApi(app, spec_kwargs={
        "info": {"description": "Redis-first inventory reservation and dynamic pricing service"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    })
    app.extensions["smorest_api"] = api
    for module in (health, catalog, inventory, pricing, cart, orders, ops, pages):
        api.register_blueprint(module.blp)
    app.register_blueprint(pages.assets)
    _skip_doc_wrappers(app, cart.add)
    install_body_limit(app)
    install_auth(app)
    # Registered after Api so these replace flask-smorest's own HTTPException handler.
    register_error_handlers(app)
    from app.metrics import install_request_metrics

    install_request_metrics(app)
