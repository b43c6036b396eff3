"""API keys and roles (API.md, Auth): checked once per request, keys compared in constant time."""
from __future__ import annotations

import hmac
import logging

from flask import Flask, g, request

from app.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/healthz", "/readyz", "/openapi.json", "/docs")
PUBLIC_READ_PREFIXES = ("/api/products", "/api/pricing")
STOREFRONT_PREFIXES = ("/api/cart", "/api/orders")


def required_role(method: str, path: str) -> str | None:
    """The role a request needs: None (public), 'storefront' or 'admin'."""
    if path in PUBLIC_PATHS or path.startswith("/docs"):
        return None
    if method in ("GET", "HEAD", "OPTIONS") and path.startswith(PUBLIC_READ_PREFIXES):
        return None
    if path.startswith(STOREFRONT_PREFIXES):
        return "storefront"
    return "admin"


def role_of(api_keys: dict[str, str], presented: str) -> str | None:
    """The role of a presented key; every known key is compared, in constant time."""
    found = None
    candidate = presented.encode()
    for key, role in api_keys.items():
        if hmac.compare_digest(key.encode(), candidate):
            found = role
    return found


def install_auth(app: Flask) -> None:
    settings = app.extensions["container"].settings
    keys = dict(settings.api_keys)

    @app.before_request
    def _authenticate():
        if request.url_rule is None:  # 404/405 answer first: no route, nothing to protect
            return None
        needed = required_role(request.method, request.path)
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        g.role = None
        if presented and scheme.lower() == "bearer" and keys:
            g.role = role_of(keys, presented)
        if not keys:
            g.role = "admin"  # auth off in development (warned at start)
            return None
        if needed is None:
            return None
        if g.role is None:
            raise Unauthorized("A valid API key is required (Authorization: Bearer <key>)")
        if needed == "admin" and g.role != "admin":
            raise Forbidden("This API key's role may not do this")
        return None


def actor() -> str:
    """Who made a change, for the stock ledger."""
    return getattr(g, "role", None) or "anonymous"
