"""app/webserver.py: WEB_SERVER, WEB_CONCURRENCY and WEB_THREADS, and the command lines they make."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.webserver import DEFAULT_SERVER, WebConfig, WebServerError, server_argv, web_command, web_config

PY = "/usr/bin/python3"


def test_defaults_per_server():
    assert DEFAULT_SERVER == "gunicorn-gthread"
    assert web_config({}) == WebConfig("gunicorn-gthread", 2, 4)
    assert web_config({"WEB_SERVER": "granian"}) == WebConfig("granian", 2, 2)
    assert web_config({"WEB_SERVER": "gunicorn-sync"}) == WebConfig("gunicorn-sync", 4, 1)
    assert web_config({"WEB_SERVER": " Granian ", "WEB_CONCURRENCY": "3", "WEB_THREADS": "6"}) == \
        WebConfig("granian", 3, 6)
    # a sync worker has one thread whatever WEB_THREADS says
    assert web_config({"WEB_SERVER": "gunicorn-sync", "WEB_THREADS": "8"}).threads == 1


@pytest.mark.parametrize("env, name", [
    ({"WEB_SERVER": "bjoern"}, "WEB_SERVER"),
    ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
    ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY"),
    ({"WEB_THREADS": "1000"}, "WEB_THREADS"),
])
def test_bad_values_name_the_setting(env, name):
    with pytest.raises(WebServerError, match=name):
        web_config(env)


def test_gunicorn_command_lines_use_the_config_module():
    for server in ("gunicorn-gthread", "gunicorn-sync"):
        argv = [PY, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "app:create_app()"]
        assert server_argv(PY, {"WEB_SERVER": server}) == argv
        assert web_command(PY, {"WEB_SERVER": server}) == argv


def test_granian_command_line_carries_the_settings():
    env = {"WEB_SERVER": "granian", "WEB_CONCURRENCY": "3", "WEB_THREADS": "2", "HOST": "0.0.0.0",
           "PORT": "8123", "LOG_LEVEL": "WARNING", "APP_ENV": "development"}
    argv = server_argv(PY, env)
    assert argv[:3] == [PY, "-m", "granian"]
    pairs = dict(zip(argv[3::1], argv[4::1]))
    assert pairs["--interface"] == "wsgi"
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "8123"
    assert pairs["--workers"] == "3" and pairs["--blocking-threads"] == "2"
    assert pairs["--log-level"] == "warning"
    assert argv[-2:] == ["--factory", "app.webserver:granian_app"]
    assert "--respawn-failed-workers" in argv
    # a supervisor runs the launcher, which reads the environment the process is given
    assert web_command(PY, env) == [PY, "-m", "app.webserver"]


@pytest.mark.parametrize("server, worker_class, workers, threads", [
    ("gunicorn-gthread", "app.overload.StampedThreadWorker", 2, 4),
    ("gunicorn-sync", "sync", 4, 1),
])
def test_the_gunicorn_config_follows_web_server(server, worker_class, workers, threads):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEB_", "OVERLOAD_"))}
    env.update(WEB_SERVER=server, APP_ENV="development")
    code = "import app.gunicorn_conf as c; print(c.worker_class, c.workers, getattr(c, 'threads', 1))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [worker_class, str(workers), str(threads)]


def test_the_threaded_worker_class_is_gunicorns_gthread_worker():
    from gunicorn.util import load_class
    from gunicorn.workers.gthread import ThreadWorker

    cls = load_class("app.overload.StampedThreadWorker")
    assert issubclass(cls, ThreadWorker)
