"""The record `inventory run` keeps of its stack in ./var/stack.json (API.md, Command line).

`inventory run` writes it once its processes are up, again whenever a child restarts, and marks it
stopped when it stops cleanly; every other command run from the same directory reads it (through
app/settings.py) to find the stores without REDIS_URL or DATABASE_URL. It is written whole to a
temporary file and renamed over the old one, so a reader never sees half a record. Only this
module knows its format:

    {"format": 1, "state": "running" | "stopped", "pid": <inventory run>, "cwd": ...,
     "started_at": ..., "updated_at": ..., "stopped_at"?: ..., "web_url": ...,
     "metrics_dir": <the processes' Prometheus counter files>,
     "stores": {"redis_url", "redis_embedded", "redis_cluster", "rq_redis_url", "database_url"},
     "processes": [{"name", "pid", "restarts", "started_at"}, ...]}

The URLs are kept unredacted (the other commands connect with them), so the file is private to its
owner (mode 0600), like the environment it stands in for.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

FORMAT = 1
FILE_NAME = "stack.json"
RUNNING = "running"
STOPPED = "stopped"


def stack_file(var_dir: Path) -> Path:
    return Path(var_dir) / FILE_NAME


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(path: Path, record: dict) -> None:
    """Replace the record atomically: a temporary file beside it, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"format": FORMAT, **record, "updated_at": now_iso()}, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read(path: Path) -> dict | None:
    """The record, or None when there is none or it is not one this version can read (another
    format, or not JSON): a command then behaves as if no stack were recorded."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("stores"), dict):
        return None
    return record


def running_stores(path: Path) -> dict | None:
    """The stores of a stack recorded as running, else None (none recorded, or stopped)."""
    record = read(path)
    if record is None or record.get("state") != RUNNING:
        return None
    return record["stores"]


def mark_stopped(path: Path, pid: int) -> None:
    """Mark the record of the run `pid` stopped (a record another run has taken over is left alone)."""
    record = read(path)
    if record is None or record.get("pid") != pid:
        return
    record.update(state=STOPPED, stopped_at=now_iso())
    write(path, record)


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists and is not a zombie (a child nobody reaped yet)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: kill(0) is all we know
        return True
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"
