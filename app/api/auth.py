"""API keys and roles (API.md, Auth): checked once per request, keys compared in constant time."""
from __future__ import annotations

import hmac
import logging

from flask import Flask, g, request

from app.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

# Public with or without the trailing slash (API.md, Conventions and Auth); compared whole.
PUBLIC_PATHS = ("/healthz", "/readyz", "/openapi.json", "/docs", "/ops")
# The documentation's own pages and assets; the dashboard's script and stylesheet (Flask's static
# route). The HTML of /ops/ and these hold no data: the dashboard's data needs the admin key.
PUBLIC_PREFIXES = ("/docs/", "/static/")
PUBLIC_READ_PREFIXES = ("/api/products", "/api/pricing")
STOREFRONT_PREFIXES = ("/api/cart", "/api/orders")


def is_public_path(path: str) -> bool:
    """A public path of API.md: one of PUBLIC_PATHS with or without one trailing slash, or under
    PUBLIC_PREFIXES. Nothing else: "/healthzz", "/docsx" or "/metrics/" are not public."""
    bare = path[:-1] if len(path) > 1 and path.endswith("/") else path
    return bare in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def required_role(method: str, path: str) -> str | None:
    """The role a request needs: None (public), 'storefront' or 'admin'."""
    if is_public_path(path):
        return None
    if method in ("GET", "HEAD", "OPTIONS") and path.startswith(PUBLIC_READ_PREFIXES):
        return None
    if path.startswith(STOREFRONT_PREFIXES):
        return "storefront"
    return "admin"


def role_of(api_keys: dict[str, str], presented: str) -> str | None:
    """The role of a presented key; every known key is compared, in constant time."""
    return _role_of_encoded([(key.encode(), role) for key, role in api_keys.items()], presented)


def _role_of_encoded(encoded: list[tuple[bytes, str]], presented: str) -> str | None:
    found = None
    candidate = presented.encode()
    for key, role in encoded:
        if hmac.compare_digest(key, candidate):
            found = role
    return found


def install_auth(app: Flask) -> None:
    settings = app.extensions["container"].settings
    keys = dict(settings.api_keys)
    encoded = [(key.encode(), role) for key, role in keys.items()]  # once, not per request

    @app.before_request
    def _authenticate():
        req = request._get_current_object()  # one proxy lookup instead of one per attribute
        if req.url_rule is None:  # 404/405 answer first: no route, nothing to protect
            return None
        if not keys:
            g.role = "admin"  # auth off in development (warned at start)
            return None
        needed = required_role(req.method, req.path)
        header = req.environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        role = None
        if presented and scheme.lower() == "bearer":
            role = _role_of_encoded(encoded, presented)
        g.role = role
        if needed is None:
            return None
        if role is None:
            raise Unauthorized("A valid API key is required (Authorization: Bearer <key>)")
        if needed == "admin" and role != "admin":
            raise Forbidden("This API key's role may not do this")
        return None


def actor() -> str:
    """Who made a change, for the stock ledger."""
    return getattr(g, "role", None) or "anonymous"
