"""/docs in a real headless browser: Swagger UI renders every operation with no outside host."""
from __future__ import annotations

import json
import urllib.request

HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def test_docs_renders_its_list_of_operations_with_authentication_on_and_no_outside_host(serve, auth_env, open_tab):
    served = serve(auth_env)
    with urllib.request.urlopen(f"{served.url}/openapi.json", timeout=10) as response:
        paths = json.load(response)["paths"]
    operations = sum(1 for item in paths.values() for method in item if method in HTTP_METHODS)
    tab = open_tab(served)

    tab.page.goto(f"{served.url}/docs")
    tab.page.wait_for_selector(".opblock")
    # every operation of the document is drawn once Swagger UI has read it (the tag groups open)
    tab.page.wait_for_function("n => document.querySelectorAll('.opblock').length === n", arg=operations)
    assert tab.page.locator(".opblock-summary-path", has_text="/api/cart/add/").count() == 1
    assert tab.outside == []


def test_a_request_for_an_outside_host_is_refused_and_recorded_so_the_offline_checks_have_teeth(
        serve, env, open_tab):
    served = serve(env)
    tab = open_tab(served)
    tab.page.goto(f"{served.url}/healthz")
    failed = tab.page.evaluate("() => fetch('https://cdn.example.invalid/x.js').then(() => false, () => true)")
    assert failed is True
    assert tab.outside == ["https://cdn.example.invalid/x.js"]
