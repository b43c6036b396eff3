"""Gunicorn settings for `gunicorn -c python:app.gunicorn_conf wsgi:app` (inventory run and docker).

No `preload_app`: each worker builds its own Redis and database connections after the fork.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from app.settings import load_settings

_settings = load_settings()

bind = f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"
# WEB_CONCURRENCY is gunicorn's and Heroku's own convention for the worker count, so it is read here
# beside gunicorn rather than in app/settings.py.
workers = int(os.environ.get("WEB_CONCURRENCY") or 4)
worker_class = "sync"
timeout = 30
graceful_timeout = 10
keepalive = 5
max_requests = 0
preload_app = False
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()
proc_name = "inventory-web"
# The control socket's default path is one per user: two stacks on one machine would fight over it.
control_socket_disable = True
# Heartbeat files on tmpfs: a slow disk (or a container's overlay) must not make workers look hung.
if Path("/dev/shm").is_dir():
    worker_tmp_dir = "/dev/shm"


def on_starting(server):
    """Create the Prometheus multiprocess directory; whoever sets it gives a fresh one per run."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)


def child_exit(server, worker):
    """Tell prometheus_client a worker is gone, so its live gauges stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):
    """On Linux, a worker gets SIGTERM when its master dies, even by SIGKILL, instead of lingering."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the ppid check still applies
        return
    if os.getppid() != server.pid:  # the master died before prctl took effect
        os._exit(0)


def post_worker_init(worker):
    """Move what the app built at start-up (about 90,000 objects) into the collector's permanent
    generation: a full collection then walks only what requests left behind. Unfrozen, one takes
    about 45 ms here and stalls every request waiting on that worker; frozen, about nothing."""
    import gc

    gc.freeze()
