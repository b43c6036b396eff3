"""ops endpoints (API.md)."""
from __future__ import annotations

from app.api.base import Blueprint

blp = Blueprint("ops", __name__, url_prefix="/api/ops", description="ops")
