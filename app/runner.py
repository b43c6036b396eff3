"""`inventory run`: the whole stack on one machine (DESIGN.md, Processes).

Starts an embedded Redis when REDIS_URL is unset (SQLite under ./var/ is the settings' own default),
migrates and seeds the database, then runs web, listener, worker and scheduler as child processes in
this process group. A child other than web that exits is restarted with backoff; if web exits the
whole stack stops with a non-zero code. SIGINT or SIGTERM stops every child (SIGTERM, then SIGKILL
after a timeout) and the embedded Redis, and returns 0.

Its stores and processes are recorded in ./var/stack.json (app/stack.py) once the children are up and
again on every restart, and marked stopped when it stops: the other commands run from the same
directory find the stores there.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from app import stack
from app.settings import VAR_DIR, Settings, redact_url
from app.webserver import web_command

log = logging.getLogger("inventory.run")

STOP_TIMEOUT_SECONDS = 15.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# A child that stayed up this long is considered healthy again: its next crash restarts it at once.
STABLE_AFTER_SECONDS = 60.0
POLL_SECONDS = 0.2
# make forwards the signal it gets to its child, so `make run` delivers each Ctrl-C or group SIGTERM
# twice within milliseconds; only a repeat after this long means "stop waiting, kill them".
REPEAT_SIGNAL_SECONDS = 1.0


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    critical: bool = False  # web: its exit stops the stack
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    failures: int = 0
    restarts: int = 0
    started_at_iso: str = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _url_host(host: str) -> str:
    """Where to point a browser at the web server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def child_commands(python: str = sys.executable) -> list[Child]:
    """The processes of DESIGN.md, as this machine's Python runs them."""
    return [
        # the app factory, not wsgi.py: an installed package runs from any directory
        Child("web", web_command(python), critical=True),  # WEB_SERVER: app/webserver.py
        Child("listener", [python, "-m", "app.cli", "listen"]),
        Child("worker", [python, "-m", "app.cli", "worker"]),
        Child("scheduler", [python, "-m", "app.cli", "scheduler"]),
    ]


def backoff_seconds(failures: int) -> float:
    """1, 2, 4, ... seconds, capped at BACKOFF_MAX_SECONDS."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * (2 ** max(0, failures - 1)))


class Supervisor:
    """Starts, watches, restarts and stops the children."""

    def __init__(self, children: list[Child], env: dict[str, str], cwd: Path,
                 on_restart: Callable[[], None] | None = None):
        self.children = children
        self.env = env
        self.cwd = cwd
        self.on_restart = on_restart  # called after a child was started again (the stack record)
        self.stopping = threading.Event()
        self.first_signal_at: float | None = None

    def start(self, child: Child) -> None:
        # Children stay in our process group: a terminal's Ctrl-C, or a signal sent to the group,
        # reaches every one of them, and nothing can be left behind in another group.
        child.process = subprocess.Popen(child.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL)
        child.started_at = time.monotonic()
        child.started_at_iso = stack.now_iso()
        child.restart_at = None

    def on_signal(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.first_signal_at is None:
            self.first_signal_at = now
            log.info("%s received: stopping", signal.Signals(signum).name)
        elif now - self.first_signal_at >= REPEAT_SIGNAL_SECONDS:  # a second Ctrl-C: no more waiting
            log.warning("%s received again: killing the children", signal.Signals(signum).name)
            for child in self.children:
                if child.running():
                    child.process.kill()
        self.stopping.set()

    def watch(self) -> int:
        """Supervise until a signal (returns 0) or the web server's exit (returns 1)."""
        while not self.stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                exited = child.process is not None and child.process.poll() is not None
                if exited and child.restart_at is None:
                    code = child.process.returncode
                    if self.stopping.is_set():
                        break
                    if child.critical:
                        log.error("%s (pid %s) exited with code %s: stopping the stack",
                                  child.name, child.pid, code)
                        return 1
                    if now - child.started_at >= STABLE_AFTER_SECONDS:
                        child.failures = 0
                    child.failures += 1
                    delay = backoff_seconds(child.failures)
                    log.warning("%s (pid %s) exited with code %s; restarting in %.0fs",
                                child.name, child.pid, code, delay)
                    child.restart_at = now + delay
                elif child.restart_at is not None and now >= child.restart_at:
                    self.start(child)
                    child.restarts += 1
                    log.info("%s restarted (pid %s)", child.name, child.pid)
                    if self.on_restart is not None:
                        self.on_restart()
            self.stopping.wait(POLL_SECONDS)
        return 0

    def stop_all(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM every running child, SIGKILL what is left after the timeout, reap all."""
        for child in self.children:
            child.restart_at = None
            if child.running():
                try:
                    child.process.terminate()
                except ProcessLookupError:  # pragma: no cover - exited in between
                    pass
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) did not stop within %.0fs: killing it",
                            child.name, child.pid, timeout)
                child.process.kill()
                child.process.wait()


def _child_env(settings: Settings, redis_url: str, metrics_dir: Path) -> dict[str, str]:
    # The children read their settings from the environment like any process of the service; this
    # hands them the stores chosen here so that every process agrees on them.
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=redis_url,
        PORT=str(settings.port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare_database(settings: Settings) -> bool:
    """Migrate, then seed the demo data if the catalog is empty; True when it seeded."""
    from app.seed import seed_if_empty
    from persistence.db import make_engine, make_session_factory, migrate

    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        return seed_if_empty(make_session_factory(engine))
    finally:
        engine.dispose()


class StackRecord:
    """This run's entry in ./var/stack.json: its stores, and its processes as they are now."""

    def __init__(self, path: Path, settings: Settings, redis_url: str, redis_server, metrics_dir: Path):
        self.path = path
        self.pid = os.getpid()
        self.redis_server = redis_server
        self.record = {
            "state": stack.RUNNING, "pid": self.pid, "cwd": str(Path.cwd()), "started_at": stack.now_iso(),
            "web_url": f"http://{_url_host(settings.host)}:{settings.port}/",
            # where the processes keep their counters: `inventory status` and `top` take the rates there
            "metrics_dir": str(metrics_dir),
            "stores": {"redis_url": redis_url, "redis_embedded": redis_server is not None,
                       "redis_cluster": settings.redis_cluster, "rq_redis_url": settings.rq_redis_url,
                       "database_url": settings.database_url},
        }
        self.redis_started_at = stack.now_iso()

    def save(self, children: list[Child]) -> None:
        processes = [{"name": "run", "pid": self.pid, "restarts": 0, "started_at": self.record["started_at"]}]
        if self.redis_server is not None and self.redis_server.process is not None:
            processes.append({"name": "redis", "pid": self.redis_server.process.pid, "restarts": 0,
                              "started_at": self.redis_started_at})
        processes += [{"name": c.name, "pid": c.pid, "restarts": c.restarts, "started_at": c.started_at_iso}
                      for c in children]
        try:
            stack.write(self.path, {**self.record, "processes": processes})
        except OSError as exc:  # the stack runs on; only the other commands' discovery is lost
            log.warning("cannot write %s: %s", self.path, exc)

    def stopped(self) -> None:
        try:
            stack.mark_stopped(self.path, self.pid)
        except OSError as exc:
            log.warning("cannot mark %s stopped: %s", self.path, exc)


def _another_run(path: Path) -> int | None:
    """The pid of another live `inventory run` recorded as running from this directory, if any."""
    record = stack.read(path)
    if record is None or record.get("state") != stack.RUNNING:
        return None
    pid = record.get("pid")
    if pid == os.getpid() or not stack.pid_alive(pid):
        return None
    try:  # a run killed long ago may have left its pid to an unrelated process
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if b"inventory" in cmdline or b"app.cli" in cmdline else None


def _banner(settings: Settings, redis_url: str, embedded: bool, seeded: bool, children: list[Child]) -> str:
    redis_note = f"embedded, data in {VAR_DIR / 'redis'}" if embedded else "from REDIS_URL"
    db_note = "demo data seeded" if seeded else "existing data kept"
    lines = [
        f"inventory run: http://{_url_host(settings.host)}:{settings.port}/  (API docs /docs, readiness /readyz)",
        f"  redis     {redact_url(redis_url)} ({redis_note})",
        f"  database  {settings.redacted_database_url()} ({db_note})",
    ]
    for child in children:
        lines.append(f"  {child.name:<9} pid {child.pid:<7} {' '.join(child.argv[1:])}")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


class _SetupInterrupt:
    """Before the children exist, SIGINT or SIGTERM unwinds like Ctrl-C (once: make sends it twice)."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum, _frame) -> None:
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stack(settings: Settings) -> int:
    """Run web, listener, worker and scheduler until interrupted; the exit code of `inventory run`."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)  # keep the banner readable
    from app.embedded import EmbeddedRedis

    supervisor: Supervisor | None = None
    redis_server: EmbeddedRedis | None = None
    record: StackRecord | None = None
    record_path = stack.stack_file(VAR_DIR)
    other = _another_run(record_path)
    if other is not None:
        # Two runs in one directory would share ./var (the embedded Redis's data, the SQLite file).
        print(f"inventory run: another inventory run (pid {other}) is running from this directory "
              f"(recorded in {record_path}); stop it first", file=sys.stderr)
        return 1
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Until the supervisor takes over, SIGTERM unwinds like Ctrl-C so the embedded Redis is stopped.
    setup_interrupt = _SetupInterrupt()
    for sig in previous:
        signal.signal(sig, setup_interrupt)
    try:
        redis_url = settings.redis_url
        if not redis_url:
            # not reached by the terminal's Ctrl-C: it is stopped last, once the children are gone
            redis_server = EmbeddedRedis(VAR_DIR / "redis", persist=True, own_group=True)
            try:
                redis_server.start()
            except RuntimeError as exc:
                print(f"inventory run: {exc}", file=sys.stderr)
                return 1
            redis_url = redis_server.url
        try:
            seeded = _prepare_database(settings)
        except Exception as exc:  # noqa: BLE001 - one line, as the command line promises
            print(f"inventory run: cannot prepare the database "
                  f"{settings.redacted_database_url()}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1

        metrics_dir = _fresh_dir(VAR_DIR / "prometheus")
        children = child_commands()
        record = StackRecord(record_path, settings, redis_url, redis_server, metrics_dir)
        supervisor = Supervisor(children, _child_env(settings, redis_url, metrics_dir), Path.cwd(),
                                on_restart=lambda: record.save(children))
        for sig in previous:
            signal.signal(sig, supervisor.on_signal)
        for child in children:
            supervisor.start(child)
        record.save(children)
        print(_banner(settings, redis_url, redis_server is not None, seeded, children), flush=True)
        return supervisor.watch()
    except KeyboardInterrupt:
        log.info("interrupted while starting: stopping")
        return 0
    finally:
        if supervisor is not None:
            supervisor.stop_all()
        if redis_server is not None:
            redis_server.stop()
        if record is not None:
            record.stopped()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if supervisor is not None:
            log.info("stopped: %s", ", ".join(c.name for c in supervisor.children))
