"""The HTML shell of /ops/ and its assets: public, holding no data, loading nothing from outside."""
from __future__ import annotations

import re

import pytest

from app import create_app
from app.api.auth import required_role
from app.composition import Container
from app.settings import load_settings
from tests.api.test_docs_offline import is_same_origin_path, links_of
from tests.conftest import STOREFRONT_KEY

# The one absolute URL the script may hold: the SVG namespace, a name and never a request.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture
def secured(auth_env, clean_stores):
    container = Container(load_settings(auth_env))
    yield create_app(container=container).test_client()
    container.close()


@pytest.mark.parametrize("path", ["/ops", "/ops/", "/ops/?variant_id=3&variant_id=9"])
def test_the_dashboard_page_needs_no_key_with_authentication_on(secured, path):
    response = secured.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.content_type.startswith("text/html")
    html = response.get_data(as_text=True)
    assert re.search(r'<input name="api_key"', html)


def test_the_dashboard_page_holds_no_data_and_points_at_the_admin_summary(secured, sessions):
    from tests.factories import make_variant

    make_variant(sessions, sku="SECRET-SKU-1", on_hand=7)
    html = secured.get("/ops/").get_data(as_text=True)
    assert "SECRET-SKU-1" not in html
    assert 'data-summary-url="/api/ops/summary/"' in html
    assert required_role("GET", "/api/ops/summary/") == "admin"


def test_every_asset_of_the_dashboard_is_local_and_answers_without_a_key(secured):
    html = secured.get("/ops/").get_data(as_text=True)
    links = [link for link in links_of(html) if not link.startswith("data:")]
    assert {"/static/ops.js", "/static/ops.css"} <= set(links), links
    assert all(is_same_origin_path(link) for link in links), links
    for link in links:
        asset = secured.get(link)
        assert asset.status_code == 200, link
        text = asset.get_data(as_text=True)
        assert set(re.findall(r"https?://[^\s\"')]+", text)) <= {SVG_NAMESPACE}, link


def test_the_browser_is_told_to_load_nothing_from_another_host_for_the_dashboard(secured):
    policy = secured.get("/ops/").headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'", name
    assert directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", ["/ops", "/ops/", "/static/ops.js", "/static/ops.css"])
def test_the_dashboard_and_its_assets_are_public_paths(path):
    assert required_role("GET", path) is None


@pytest.mark.parametrize("path", ["/opsx", "/ops/summary", "/api/ops/summary/", "/api/ops/reconcile/",
                                  "/staticx/ops.js", "/x/ops/"])
def test_paths_that_only_look_like_the_dashboard_are_not_public(path):
    assert required_role("GET", path) == "admin"


def test_a_storefront_key_does_not_turn_the_public_page_away(secured):
    response = secured.get("/ops/", headers={"Authorization": f"Bearer {STOREFRONT_KEY}"})
    assert response.status_code == 200


def test_the_openapi_document_lists_the_dashboard_as_a_public_html_page(secured):
    operation = secured.get("/openapi.json").get_json()["paths"]["/ops/"]["get"]
    assert "text/html" in operation["responses"]["200"]["content"]
    assert not operation.get("security")
    assert [p["name"] for p in operation["parameters"]] == ["variant_id"]
