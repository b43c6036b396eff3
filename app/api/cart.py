"""cart endpoints (API.md)."""
from __future__ import annotations

from app.api.base import Blueprint

blp = Blueprint("cart", __name__, url_prefix="/api/cart", description="cart")
