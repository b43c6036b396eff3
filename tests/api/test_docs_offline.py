"""/docs works offline: its page names only files the service serves itself, all public."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

from app import create_app
from app.api.auth import required_role
from app.composition import Container
from app.settings import load_settings


class _Links(HTMLParser):
    """Every src and href attribute of a page, in order."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links.extend(value for name, value in attrs if name in ("src", "href") and value)


def links_of(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.links


def is_same_origin_path(link: str) -> bool:
    """A path on this service: no scheme, no host, not protocol-relative (`//cdn.example/x.js`)."""
    parts = urlsplit(link)
    return not parts.scheme and not parts.netloc and link.startswith("/")


@pytest.fixture
def secured(auth_env, clean_stores):
    container = Container(load_settings(auth_env))
    yield create_app(container=container).test_client()
    container.close()


def test_the_link_check_tells_an_outside_host_from_a_path_of_the_service():
    assert links_of('<link href="/a.css"><script src="//cdn.example/x.js"></script><img src="https://x/y">') \
        == ["/a.css", "//cdn.example/x.js", "https://x/y"]
    assert is_same_origin_path("/docs/swagger-ui/swagger-ui.css")
    assert not is_same_origin_path("//cdn.example/x.js")
    assert not is_same_origin_path("https://cdn.example/swagger-ui.css")


def test_the_docs_page_names_no_outside_host_and_every_asset_it_names_answers_without_a_key(secured):
    page = secured.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    links = links_of(html)
    # the stylesheet, the preset and the bundle: Swagger UI cannot render without any of them
    assert len(links) >= 3, links
    outside = [link for link in links if not is_same_origin_path(link)]
    assert not outside, f"/docs loads from outside the service: {outside}"
    assert not re.search(r"https?://", html), "an absolute URL in /docs's own HTML"
    for link in links:
        assert required_role("GET", link) is None, link
        asset = secured.get(link)
        assert asset.status_code == 200, (link, asset.status_code)
        assert asset.content_type.split(";")[0] in ("text/css", "text/javascript", "application/javascript"), link
        assert len(asset.data) > 1000, link


def test_swagger_ui_is_told_not_to_fetch_its_validator_badge_from_an_outside_host(secured):
    # Swagger UI's default validatorUrl is a public host: its badge would be an outside request
    html = secured.get("/docs").get_data(as_text=True)
    assert re.search(r'override_config = \{[^}]*"validatorUrl": null', html), html


def test_the_stylesheet_of_docs_pulls_in_nothing_from_outside(secured):
    css = secured.get("/docs/swagger-ui/swagger-ui.css").get_data(as_text=True)
    targets = re.findall(r"url\(\s*['\"]?([^'\")\s]+)", css)
    assert targets, "expected the stylesheet's inline images"
    assert all(t.startswith("data:") for t in targets), [t for t in targets if not t.startswith("data:")]
    assert "@import" not in css


def test_swagger_ui_files_outside_its_folder_are_not_served(secured):
    for path in ("/docs/swagger-ui/../__init__.py", "/docs/swagger-ui/%2e%2e/__init__.py",
                 "/docs/swagger-ui/no-such-file.js"):
        response = secured.get(path)
        assert response.status_code == 404, path
        assert response.get_json()["error"]["code"] == "not_found"
