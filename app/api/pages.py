"""Pages for people: the /ops/ dashboard's HTML shell, and Swagger UI's own files for /docs.

Neither holds data: the dashboard's script polls GET /api/ops/summary/ with the admin key the
person types in, so the shell and its assets (app/static/, served by Flask's own `static` route)
are public (app/api/auth.py). Everything they load comes from the service itself, so both pages
work without any outside host.
"""
from __future__ import annotations

from flask import Blueprint as FlaskBlueprint
from flask import render_template, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from app.api.base import Blueprint

# Where Swagger UI's files are served; app/__init__.py points OPENAPI_SWAGGER_UI_URL here. Under
# /docs/, so they are public like the page that loads them.
SWAGGER_UI_URL = "/docs/swagger-ui/"

blp = Blueprint("pages", __name__, description="Pages for people")
# A plain Flask blueprint: static files are not operations of the OpenAPI document.
assets = FlaskBlueprint("page-assets", __name__)

# The dashboard loads only its own script and stylesheet and talks only to this service; the
# browser enforces it, so a later edit that pulls something from a CDN fails loudly, and no other
# site may frame the page that holds an admin key.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

_PAGE_DOC = {
    "parameters": [{
        "in": "query", "name": "variant_id", "required": False, "explode": True,
        "description": "variants to pin on the page beside the busiest ones (repeatable)",
        "schema": {"type": "array", "items": {"type": "integer", "minimum": 1}},
    }],
    "responses": {"200": {"description": "the dashboard's HTML page; it holds no data and polls "
                                         "/api/ops/summary/ with an admin key typed into it",
                          "content": {"text/html": {"schema": {"type": "string"}}}}},
}


@blp.route("/ops/")
@blp.doc(summary="The live stock dashboard: an HTML page for people (public; its data needs the admin key)",
         **_PAGE_DOC)
def ops_dashboard():
    response = render_template("ops.html")
    headers = {"Content-Security-Policy": _CSP, "Referrer-Policy": "no-referrer",
               "X-Content-Type-Options": "nosniff"}
    return response, 200, headers


@assets.route(f"{SWAGGER_UI_URL}<path:filename>")
def swagger_ui_file(filename: str):
    # send_from_directory refuses any path that leaves the package's folder (404)
    return send_from_directory(str(swagger_ui_path), filename)
