"""Keys and roles on every route, and the error body of API.md for every kind of error."""
from __future__ import annotations

import re

import pytest

from app import create_app
from app.api.auth import required_role
from app.composition import Container
from app.settings import load_settings
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def secured(auth_env, clean_stores):
    container = Container(load_settings(auth_env))
    app = create_app(container=container)
    yield app
    container.close()


def _routes(app):
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/docs") or "swagger" in rule.endpoint:
            continue
        path = re.sub(r"<int[^>]*:\w+>", "1", rule.rule)
        path = re.sub(r"<[^>]+>", "1~u1", path)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, path


def _admin_only(method, path):
    if path.startswith(("/api/cart", "/api/orders")):
        return False
    if path in ("/healthz", "/readyz", "/openapi.json", "/ops/"):  # /ops/ is the public HTML shell
        return False
    if method == "GET" and path.startswith(("/api/products", "/api/pricing")):
        return False
    return True


def test_every_write_route_needs_a_key(secured):
    client = secured.test_client()
    checked = 0
    for method, path in _routes(secured):
        if method not in WRITE_METHODS:
            continue
        response = client.open(path, method=method, json={})
        assert response.status_code == 401, (method, path, response.get_json())
        assert response.get_json()["error"]["code"] == "unauthorized"
        checked += 1
    assert checked >= 15


def test_every_admin_route_refuses_the_storefront_role(secured):
    client = secured.test_client()
    headers = {"Authorization": f"Bearer {STOREFRONT_KEY}"}
    checked = 0
    for method, path in _routes(secured):
        if not _admin_only(method, path):
            continue
        response = client.open(path, method=method, json={}, headers=headers)
        assert response.status_code == 403, (method, path, response.get_json())
        assert response.get_json()["error"]["code"] == "forbidden"
        checked += 1
    assert checked >= 14


def test_an_unknown_key_and_a_wrong_scheme_are_unauthorized(secured):
    client = secured.test_client()
    for header in ("Bearer not-a-real-key", f"Basic {ADMIN_KEY}", ADMIN_KEY, "Bearer "):
        response = client.get("/api/inventory/", headers={"Authorization": header})
        assert response.status_code == 401, header


def test_public_reads_need_no_key_and_storefront_reaches_carts(secured):
    client = secured.test_client()
    for path in ("/healthz", "/openapi.json", "/api/products/", "/api/pricing/rules/"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/cart/1/").status_code == 401
    assert client.get("/api/cart/1/", headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}).status_code == 200
    assert client.get("/api/orders/", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_metrics_need_the_admin_key_when_auth_is_on(secured):
    client = secured.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}).status_code == 403
    response = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200
    assert b"inventory_request_seconds" in response.data


@pytest.mark.parametrize("path", ["/healthz", "/healthz/", "/readyz", "/readyz/", "/openapi.json", "/docs", "/docs/"])
def test_health_readiness_and_docs_need_no_key_with_or_without_the_trailing_slash(secured, path):
    response = secured.test_client().get(path)
    assert response.status_code == 200, (path, response.get_data(as_text=True)[:300])


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_metrics_need_the_admin_key_with_or_without_the_trailing_slash(secured, path):
    client = secured.test_client()
    response = client.get(path)
    assert response.status_code == 401, path
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert client.get(path, headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}).status_code == 403
    assert client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/healthz/", "/readyz", "/readyz/", "/openapi.json",
                                  "/openapi.json/", "/docs", "/docs/", "/docs/swagger-ui.css"])
def test_the_public_paths_need_no_role(path):
    assert required_role("GET", path) is None


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "/healthzz", "/healthz//", "/readyz/x", "/healthz.json",
                                  "/docsx", "/openapi.jsonx", "/x/healthz", "/api/ops/reconcile/", "/", ""])
def test_nothing_that_only_looks_like_a_public_path_is_public(path):
    assert required_role("GET", path) == "admin"


def test_a_too_large_body_is_413_with_the_error_body(client):
    response = client.post("/api/products/", data=b"{" + b" " * 70_000 + b"}", content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"


def test_a_wrong_method_is_405_with_the_error_body(client):
    response = client.delete("/healthz")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


def test_an_unexpected_error_is_500_with_the_error_body_and_no_trace(app):
    @app.get("/boom-for-test")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom-for-test")
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"]["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)


def test_a_non_json_body_is_415(client):
    response = client.post("/api/products/", data="name=x", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"


def test_paths_work_with_and_without_the_trailing_slash(client):
    assert client.get("/api/products").status_code == 200
    assert client.get("/api/products/").status_code == 200
    assert client.get("/healthz/").status_code == 200
