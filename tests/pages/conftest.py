"""Fixtures for the pages people open in a browser: the app served on a loopback port, and Debian's
headless Chromium driven by playwright.

Without a browser the browser tests skip, all with one reason; under CI (`CI` set, where .ci/run
installs Chromium) they fail instead, so a broken install cannot pass as green.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

from app import create_app
from app.composition import Container
from app.settings import load_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_missing() -> str | None:
    """Why no browser can be driven here, or None when one can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no browser: {CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no browser driver: the playwright package is not installed (pip install -e '.[test]')"
    return None


@dataclass
class Served:
    """An app answering on a loopback port, and the container it was built from."""

    url: str
    container: Container

    def is_local(self, url: str) -> bool:
        """Whether a URL the browser asked for points at this server (and at nothing outside)."""
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about"):
            return True
        return f"{parts.scheme}://{parts.netloc}" == self.url


@pytest.fixture
def serve(clean_stores):
    """serve(env) -> Served: the app of those settings behind werkzeug's threaded server, stopped
    at the end of the test."""
    running = []

    def start(env: dict) -> Served:
        container = Container(load_settings(env))
        server = make_server("127.0.0.1", 0, create_app(container=container), threaded=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        running.append((server, thread, container))
        return Served(f"http://127.0.0.1:{server.server_port}", container)

    yield start
    for server, thread, container in running:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
        container.close()


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session; each test opens its own context (fresh storage)."""
    reason = browser_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the page tests")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    driver = sync_playwright().start()
    # playwright's launch gives the browser a fresh temporary user-data dir, removed on close
    chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        yield chromium
    finally:
        chromium.close()
        driver.stop()


@dataclass
class Tab:
    """A browser page, and every request it made that was not for the served app (each refused)."""

    page: object
    outside: list


@pytest.fixture
def open_tab(browser):
    """open_tab(served) -> Tab: a page in a fresh context that may only reach the served app; any
    other request is refused and recorded, so a test can assert the page works offline."""
    contexts = []

    def open_(served: Served) -> Tab:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.set_default_timeout(10_000)
        outside: list[str] = []

        def gate(route):
            if served.is_local(route.request.url):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", gate)
        return Tab(context.new_page(), outside)

    yield open_
    for context in contexts:
        context.close()
