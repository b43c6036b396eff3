"""pricing endpoints (API.md)."""
from __future__ import annotations

from app.api.base import Blueprint

blp = Blueprint("pricing", __name__, url_prefix="/api/pricing", description="pricing")
