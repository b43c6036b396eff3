"""orders endpoints (API.md)."""
from __future__ import annotations

from app.api.base import Blueprint

blp = Blueprint("orders", __name__, url_prefix="/api/orders", description="orders")
