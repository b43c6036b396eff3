"""The text of the Lua scripts of lua/, with `--@include name` resolved from lua/includes/
(the runner, app/engine/runner.py, loads and calls them)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import lua

LUA_DIR = Path(lua.__file__).resolve().parent
_INCLUDE = re.compile(r"^--@include (\w+)\s*$", re.MULTILINE)
_NAME = re.compile(r"^(?P<name>[a-zA-Z]+)-(?P<keys>\d+)\.lua$")


@lru_cache(maxsize=64)  # one entry per script of lua/
def source(name: str) -> str:
    """The full text of lua/<name>-<n>.lua with its includes expanded."""
    path = _path(name)
    text = path.read_text()
    return _INCLUDE.sub(lambda m: (LUA_DIR / "includes" / f"{m.group(1)}.lua").read_text(), text)


# A file named `<name>-0.lua` takes a varying number of KEYS (reserveBundle: a group of keys per
# line); its header says how they are laid out. runner.prepare refuses it (its KEYS are not fixed).
VARIABLE_KEYS = 0


def key_count(name: str) -> int:
    """The number of KEYS of lua/<name>-<n>.lua: n, or VARIABLE_KEYS."""
    return int(_NAME.match(_path(name).name).group("keys"))


def _path(name: str) -> Path:
    matches = sorted(LUA_DIR.glob(f"{name}-*.lua"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one lua/{name}-<keys>.lua, found {len(matches)}")
    return matches[0]


def names() -> list[str]:
    return sorted(_NAME.match(p.name).group("name") for p in LUA_DIR.glob("*.lua"))
