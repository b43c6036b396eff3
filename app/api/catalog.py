"""catalog endpoints (API.md)."""
from __future__ import annotations

from app.api.base import Blueprint

blp = Blueprint("catalog", __name__, url_prefix="/api/catalog", description="catalog")
