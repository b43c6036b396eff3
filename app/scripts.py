"""Loads the Lua scripts of lua/ once per client and resolves `--@include name` from lua/includes/."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"
_INCLUDE = re.compile(r"^--@include (\w+)\s*$", re.MULTILINE)
_NAME = re.compile(r"^(?P<name>[a-zA-Z]+)-(?P<keys>\d+)\.lua$")


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The full text of lua/<name>-<n>.lua with its includes expanded."""
    path = _path(name)
    text = path.read_text()
    return _INCLUDE.sub(lambda m: (LUA_DIR / "includes" / f"{m.group(1)}.lua").read_text(), text)


def key_count(name: str) -> int:
    return int(_NAME.match(_path(name).name).group("keys"))


def _path(name: str) -> Path:
    matches = sorted(LUA_DIR.glob(f"{name}-*.lua"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one lua/{name}-<keys>.lua, found {len(matches)}")
    return matches[0]


def names() -> list[str]:
    return sorted(_NAME.match(p.name).group("name") for p in LUA_DIR.glob("*.lua"))


class Scripts:
    """redis-py Script objects for every script, registered once; they reload themselves on NOSCRIPT."""

    def __init__(self, redis):
        self.redis = redis
        self._scripts = {name: redis.register_script(source(name)) for name in names()}

    def __getitem__(self, name: str):
        return self._scripts[name]

    def load_all(self) -> None:
        """Put every script into the server's cache now (readiness check, and after a restart)."""
        for script in self._scripts.values():
            self.redis.script_load(script.script)  # a cluster client sends it to every primary
