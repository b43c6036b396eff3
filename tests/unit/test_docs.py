"""docs/API.md and the OpenAPI document the service serves describe the same operations.

The endpoint tables of docs/API.md are the contract people read; /openapi.json is generated from
the routes. Each check here fails in the direction that makes the two drift apart: a new route
missing from the tables, a documented route that no longer exists, or a row still marked planned
after its route has been built.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from app import create_app
from app.settings import load_settings

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"
PLANNED = "planned, not yet served"
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
# These two serve the OpenAPI document and its browsable page; the document does not list itself,
# so they are checked against the app's routes instead.
SELF_DESCRIBING = {("GET", "/openapi.json"), ("GET", "/docs")}

Operation = tuple[str, str]  # (method, normalised path)


def normalise(path: str) -> str:
    """`/api/cart/{user_id}/?x=1` -> `/api/cart/{}`: parameter names differ between the contract
    and the routes (`{id}` against `{product_id}`), and every path works with or without its slash."""
    path = path.strip().strip("`").split("?", 1)[0]
    path = re.sub(r"\{[^}]*\}", "{}", path)
    return path.rstrip("/") or "/"


def documented_operations(text: str) -> tuple[set[Operation], set[Operation]]:
    """(served, planned) operations of every markdown table row whose first cell holds HTTP
    methods ("GET / PUT / DELETE") and whose second cell is a path."""
    served: set[Operation] = set()
    planned: set[Operation] = set()
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        methods = [m.strip().upper() for m in re.split(r"[/,]", cells[0])]
        path = cells[1].strip("`").strip()
        if not methods or not set(methods) <= HTTP_METHODS or not path.startswith("/"):
            continue
        target = planned if PLANNED in line else served
        target.update((method, normalise(path)) for method in methods)
    return served, planned


@pytest.fixture(scope="module")
def app():
    # No store is needed to build the app and render its OpenAPI document: connections are made
    # on first use, and the start-up check of Redis's expiry events only logs when Redis is absent.
    # An explicit environment keeps the machine's own variables (API_KEYS, APP_ENV) out of it.
    # a Redis URL nothing answers on: building the app connects to nothing, the document needs no store
    return create_app(load_settings({"APP_ENV": "test", "DATABASE_URL": "sqlite://", "LOG_LEVEL": "ERROR",
                                     "REDIS_URL": "redis://127.0.0.1:9/0"}))


@pytest.fixture(scope="module")
def openapi_operations(app) -> set[Operation]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    paths = response.get_json()["paths"]
    operations = {(method.upper(), normalise(path))
                  for path, item in paths.items() for method in item if method.upper() in HTTP_METHODS}
    assert operations, "the OpenAPI document lists no operation"
    return operations


@pytest.fixture(scope="module")
def documented() -> tuple[set[Operation], set[Operation]]:
    return documented_operations(API_MD.read_text())


def routed(app, operation: Operation) -> bool:
    """Whether the app's URL map serves this method on this path (a sample value for parameters)."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    method, path = operation
    try:
        app.url_map.bind("localhost").match(path.replace("{}", "1"), method=method)
    except (NotFound, MethodNotAllowed):
        return False
    return True


def test_the_tables_of_docs_api_are_read_as_operations():
    served, planned = documented_operations(
        "| method | path | body |\n|---|---|---|\n"
        "| GET / PUT / DELETE | `/api/products/categories/{id}/` | |\n"
        "| POST | `/api/cart/bundle/` | 201 **(planned, not yet served)** |\n"
        "| `HOLD_TTL_SECONDS` | `900` | how long a hold lasts |\n")
    assert served == {("GET", "/api/products/categories/{}"), ("PUT", "/api/products/categories/{}"),
                      ("DELETE", "/api/products/categories/{}")}
    assert planned == {("POST", "/api/cart/bundle")}


def test_every_served_operation_is_in_docs_api(openapi_operations, documented):
    served, _planned = documented
    missing = sorted(openapi_operations - served)
    assert not missing, f"served but not in a table of docs/API.md (or marked planned there): {missing}"


def test_every_operation_docs_api_calls_served_is_in_the_openapi_document(app, openapi_operations, documented):
    served, _planned = documented
    unknown = sorted(op for op in served - openapi_operations
                     if not (op in SELF_DESCRIBING and routed(app, op)))
    assert not unknown, f"in docs/API.md but not served (mark them planned, or fix the path): {unknown}"


def test_no_operation_docs_api_marks_planned_is_served_yet(app, openapi_operations, documented):
    _served, planned = documented
    built = sorted(op for op in planned if op in openapi_operations or routed(app, op))
    assert not built, f"served now: remove the planned mark from these rows of docs/API.md: {built}"
