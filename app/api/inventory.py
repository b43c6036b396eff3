"""inventory endpoints (API.md)."""
from __future__ import annotations

from app.api.base import Blueprint

blp = Blueprint("inventory", __name__, url_prefix="/api/inventory", description="inventory")
