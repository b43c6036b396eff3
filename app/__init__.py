"""Flask application factory."""
from __future__ import annotations

import inspect
import logging
from types import FunctionType

from flask import Flask

from app.composition import Container, build_container
from app.settings import Settings, load_settings

log = logging.getLogger("app")

_CO_COROUTINE = inspect.CO_COROUTINE


class InventoryFlask(Flask):
    """Flask, with ensure_sync decided from the function's code flags: Flask and every
    flask-smorest decorator call it on each request (about ten times for add-to-cart), and
    inspect.iscoroutinefunction costs more than the rest of their wrappers. Anything but a plain
    function (a partial, a bound method, a callable object) still goes through Flask's own check."""

    def ensure_sync(self, func):
        if type(func) is FunctionType and not func.__code__.co_flags & _CO_COROUTINE:
            return func
        return super().ensure_sync(func)


def create_app(settings: Settings | None = None, container: Container | None = None) -> Flask:
    """Build the WSGI app from settings (read from the environment when not given)."""
    if container is None:
        container = build_container(settings or load_settings())
    settings = container.settings
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    app = InventoryFlask(__name__)
    app.url_map.strict_slashes = False
    app.json.sort_keys = False
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE="Inventory reservation engine",
        API_VERSION="1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        # Swagger UI's files come from the pinned swagger-ui-bundle package, served by the app
        # (app/api/pages.py), and its validator badge (an image from an outside host) is off:
        # /docs works offline.
        OPENAPI_SWAGGER_UI_URL="/docs/swagger-ui/",
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
    )
    app.extensions["container"] = container
    if settings.fault_pause_at:
        from app import faults

        faults.configure(settings.fault_pause_at, settings.fault_pause_file)
        log.warning("fault point armed: the process stops at %s", settings.fault_pause_at)

    from app.api import register_api

    register_api(app)
    from app.overload import install_admission

    # outermost: a request refused for overload (429) costs no Flask, Redis or database work
    install_admission(app)

    # the hot path's connection is built now, not on the first add (and checks the redis-py
    # internals it relies on: a changed redis-py fails here, loudly)
    container.runner  # noqa: B018
    _enable_expiry_events(container)
    if not settings.auth_enabled:
        log.warning("API_KEYS is empty: authentication is OFF (development mode only)")
    return app


def _enable_expiry_events(container: Container) -> None:
    """Turn on keyspace expiry events where the server allows CONFIG; never fail start-up over it
    (Redis may be down now and the listener retries; the sweeper is the guarantee)."""
    from app.engine.expiry import ensure_expired_events

    try:
        ensure_expired_events(container.redis)
    except Exception as exc:  # noqa: BLE001 - Redis unreachable at start
        log.warning("could not check notify-keyspace-events now (%s); the listener will retry",
                    type(exc).__name__)
