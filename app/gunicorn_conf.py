"""Gunicorn settings for `gunicorn -c python:app.gunicorn_conf wsgi:app` (WEB_SERVER=gunicorn-sync or
gunicorn-gthread: app/webserver.py starts it).

No `preload_app`: each worker builds its own Redis and database connections after the fork.
"""
from __future__ import annotations

import os
from pathlib import Path

from app.settings import load_settings
from app.webserver import DEFAULTS, die_with_parent, freeze_startup_objects, web_config

_settings = load_settings()
_web = web_config()

bind = f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"
# WEB_CONCURRENCY is gunicorn's and Heroku's own convention for the worker count, so it is read
# beside the server (app/webserver.py) rather than in app/settings.py.
if _web.server == "gunicorn-gthread":
    workers, threads = _web.workers, _web.threads
    # the gthread worker that notes when each request arrived, for app/overload.py's queue budget
    worker_class = "app.overload.StampedThreadWorker"
    # every connection of a flash sale is accepted and its requests queue where they are timed
    # (not in the kernel's backlog, unseen): at most this many per worker
    worker_connections = 4096
else:  # gunicorn-sync (also when this file is used directly while WEB_SERVER names another server)
    workers = _web.workers if _web.server == "gunicorn-sync" else DEFAULTS["gunicorn-sync"][0]
    worker_class = "sync"
backlog = 2048
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
    die_with_parent(server.pid)


def post_worker_init(worker):
    """Move what the app built at start-up (about 90,000 objects) into the collector's permanent
    generation: a full collection then walks only what requests left behind. Unfrozen, one takes
    about 45 ms here and stalls every request waiting on that worker; frozen, about nothing."""
    freeze_startup_objects()
