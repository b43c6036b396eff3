"""Named points in multi-step code paths where tests inject a crash.

In-process tests register a callable for a point (`inject`), typically raising `SimulatedCrash`,
which derives from BaseException so no `except Exception` clean-up runs: just like a killed process.
Subprocess tests set FAULT_PAUSE_AT=<point> (never honoured in production) and the process stops
there, writing `<FAULT_PAUSE_FILE>` so the test knows when to SIGKILL it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

_hooks: dict[str, Callable[[], None]] = {}
_pause_at: str = ""
_pause_file: str = ""


class SimulatedCrash(BaseException):
    """The process 'dies' here."""


def configure(pause_at: str, pause_file: str) -> None:
    global _pause_at, _pause_file
    _pause_at, _pause_file = pause_at, pause_file


def inject(point: str, hook: Callable[[], None]) -> None:
    _hooks[point] = hook


def clear() -> None:
    _hooks.clear()


def point(name: str) -> None:
    """A fault point; costs one dict lookup when nothing is injected."""
    hook = _hooks.get(name)
    if hook is not None:
        hook()
    if _pause_at and _pause_at == name:
        if _pause_file:
            Path(_pause_file).write_text(name)
        while True:  # wait to be killed
            time.sleep(3600)
