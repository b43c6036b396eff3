"""Helpers for tests that start a whole stack as processes: its readiness, and its process group."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from app.embedded import free_port  # noqa: F401 - re-exported: a free loopback port

__all__ = ["free_port", "group_members", "readyz"]


def readyz(port: int) -> int:
    """The status of GET /readyz on a local port; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group, as "pid command" lines, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone in between
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ")".
        state, _ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(f"{stat.parent.name} {cmdline.strip()}")
    return members
