"""Access to the composition root from inside a request."""
from __future__ import annotations

from flask import current_app

from app.composition import Container


def container() -> Container:
    return current_app.extensions["container"]
