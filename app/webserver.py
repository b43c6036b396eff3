"""The web server: which one runs the app, with how many workers and threads (WEB_SERVER,
WEB_CONCURRENCY, WEB_THREADS), and the command that starts it.

`python -m app.webserver` reads those settings from its environment and replaces itself with the
server (exec: the same pid, so a supervisor's or a container's SIGTERM reaches the server itself):
docker-compose.yml and the Dockerfile start the web process that way. `inventory run` runs
`web_command` (gunicorn's own command line, or this module for granian); the benchmarks and tests
call `server_argv` with the environment they give the server.

- gunicorn-gthread  (default) gunicorn, threaded workers that note when each request arrived and
                    refuse what they cannot serve in time (app/overload.py); 2 workers x 4 threads
- granian           granian (Rust HTTP server) in WSGI mode, WEB_THREADS Python threads per worker;
                    2 x 2; no admission control (its queue is out of the app's sight)
- gunicorn-sync     gunicorn, sync workers: one request at a time per worker, a connection per
                    request; 4 workers; no admission control

Every server builds the app in each worker after the fork (no preload: Redis and database
connections are never shared between processes) and freezes what start-up built (gc.freeze).
gunicorn tells prometheus_client when a worker exits (child_exit, app/gunicorn_conf.py); granian
has no such hook, and needs none here: marking a process dead only drops live-gauge files, and
this service keeps no gauge in them (app/metrics.py reads its gauges at scrape time). On SIGTERM
both stop accepting, let the requests in progress finish (10 s at most) and exit; a worker that
dies is started again (granian: --respawn-failed-workers).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping

from app.settings import SettingsError, env_int

SERVERS = ("gunicorn-gthread", "granian", "gunicorn-sync")
# gunicorn-gthread: the one server here that sees a request the moment it arrives, so the one that can
# refuse what it cannot serve in time (app/overload.py); granian spends less CPU per request but queues
# requests where the app cannot see them (bench/README.md, server comparison and overload)
DEFAULT_SERVER = "gunicorn-gthread"
# per server: (workers, threads) when WEB_CONCURRENCY / WEB_THREADS are not set
DEFAULTS = {"gunicorn-sync": (4, 1), "gunicorn-gthread": (2, 4), "granian": (2, 2)}
GRANIAN_BACKLOG = 2048
GRACEFUL_SECONDS = 10  # as app/gunicorn_conf.py's graceful_timeout


# A bad WEB_SERVER, WEB_CONCURRENCY or WEB_THREADS: a one-line error naming the setting.
WebServerError = SettingsError


@dataclass(frozen=True)
class WebConfig:
    server: str
    workers: int
    threads: int


def _count(env: Mapping[str, str], name: str, default: int, high: int) -> int:
    return env_int(env, name, default, 1, high)


def web_config(env: Mapping[str, str] | None = None) -> WebConfig:
    """WEB_SERVER, WEB_CONCURRENCY and WEB_THREADS of `env` (default os.environ), checked."""
    env = os.environ if env is None else env
    server = (env.get("WEB_SERVER") or DEFAULT_SERVER).strip().lower()
    if server not in SERVERS:
        raise WebServerError(f"WEB_SERVER must be one of {', '.join(SERVERS)}, got {server!r}")
    workers, threads = DEFAULTS[server]
    workers = _count(env, "WEB_CONCURRENCY", workers, 64)
    threads = 1 if server == "gunicorn-sync" else _count(env, "WEB_THREADS", threads, 256)
    return WebConfig(server, workers, threads)


def server_argv(python: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The command line of the configured server, for the environment `env` (default os.environ)."""
    env = os.environ if env is None else env
    cfg = web_config(env)
    if cfg.server.startswith("gunicorn"):
        # app/gunicorn_conf.py reads WEB_SERVER, WEB_CONCURRENCY and WEB_THREADS itself
        return [python, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "app:create_app()"]
    from app.settings import load_settings

    settings = load_settings(env)
    return [
        python, "-m", "granian",
        "--interface", "wsgi",
        "--host", settings.host.strip("[]"),
        "--port", str(settings.port),
        "--workers", str(cfg.workers),
        "--blocking-threads", str(cfg.threads),
        "--backlog", str(GRANIAN_BACKLOG),
        "--http", "1",
        "--no-ws",
        "--log-level", settings.log_level.lower(),
        "--no-access-log",
        "--respawn-failed-workers",
        "--respawn-interval", "1",
        "--workers-kill-timeout", str(GRACEFUL_SECONDS),
        "--factory", "app.webserver:granian_app",
    ]


def web_command(python: str = sys.executable, env: Mapping[str, str] | None = None) -> list[str]:
    """What a supervisor runs for the web process, for WEB_SERVER of `env` (default os.environ).

    gunicorn's command line as it is (app/gunicorn_conf.py reads the rest of the environment when
    it starts); for granian, this module, which builds granian's command line from the environment
    the process gets (HOST, PORT, ...) and replaces itself with it."""
    if web_config(env).server.startswith("gunicorn"):
        return server_argv(python, env)
    return [python, "-m", "app.webserver"]


# -- in a worker ----------------------------------------------------------------------------------

def die_with_parent(parent_pid: int | None) -> None:
    """On Linux, this process gets SIGTERM when its parent dies, even by SIGKILL, instead of
    lingering; if the parent is already gone, exit now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def freeze_startup_objects() -> None:
    """Move what the app built at start-up into the collector's permanent generation: a full
    collection then walks only what requests left behind (about 45 ms less per full collection)."""
    import gc

    gc.freeze()


def granian_app():
    """The WSGI app of one granian worker (granian calls this factory in each worker process)."""
    die_with_parent(None)
    from app import create_app

    app = create_app()
    freeze_startup_objects()
    return app


def main() -> None:  # pragma: no cover - replaces the process
    argv = server_argv(sys.executable)
    os.execv(argv[0], argv)


if __name__ == "__main__":  # pragma: no cover
    main()
