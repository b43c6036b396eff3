"""Admission control (app/overload.py): 429 `overloaded` with Retry-After for what cannot be served
in time, before the app does any work; and a real gunicorn-gthread server under more concurrent
shoppers than it may queue, with the invariant checked afterwards."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.overload import (QUEUED_AT, WAITING, Admission, OverloadSettings, OverloadSettingsError, overload_settings,
                          refusal_bytes, refuse_unparsed, whole_request)
from app.webserver import server_argv
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.processes import free_port, readyz

ROOT = Path(__file__).resolve().parents[2]


class _App:
    """A WSGI app that answers 200 and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"served"]


def _call(app, environ):
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


# -- the middleware --------------------------------------------------------------------------------

def test_a_request_that_waited_past_the_budget_is_refused_without_the_app():
    inner = _App()
    now = [100.0]
    admission = Admission(inner, OverloadSettings(queue_ms=50, retry_after=2), clock=lambda: now[0])
    status, headers, body = _call(admission, {"PATH_INFO": "/api/cart/add/", QUEUED_AT: 100.0 - 0.051})
    assert status.startswith("429")
    assert headers["Retry-After"] == "2"
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == "overloaded" and error["details"] == {"retry_after_seconds": 2}
    assert error["message"]
    assert inner.calls == 0 and admission.refused == 1


def test_a_request_within_the_budget_or_without_a_stamp_or_a_queue_reaches_the_app():
    inner = _App()
    admission = Admission(inner, OverloadSettings(queue_ms=50), clock=lambda: 100.0)
    assert _call(admission, {"PATH_INFO": "/api/cart/add/", QUEUED_AT: 100.0 - 0.049})[0] == "200 OK"
    assert _call(admission, {"PATH_INFO": "/api/cart/add/"})[0] == "200 OK"  # the server gave no time
    # late, but nobody waits behind it: refusing it would shorten no queue
    assert _call(admission, {"PATH_INFO": "/api/cart/add/", QUEUED_AT: 99.0, WAITING: 0})[0] == "200 OK"
    assert _call(admission, {"PATH_INFO": "/api/cart/add/", QUEUED_AT: 99.0, WAITING: 1})[0].startswith("429")
    assert inner.calls == 3 and admission.refused == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz/"])
def test_health_probes_are_never_refused(path):
    inner = _App()
    admission = Admission(inner, OverloadSettings(queue_ms=1), clock=lambda: 100.0)
    assert _call(admission, {"PATH_INFO": path, QUEUED_AT: 1.0})[0] == "200 OK"
    assert inner.calls == 1


def test_settings_defaults_and_bad_values():
    assert overload_settings({}) == OverloadSettings(queue_ms=500, max_pending=64, retry_after=1)
    assert overload_settings({"OVERLOAD_QUEUE_MS": "0", "OVERLOAD_MAX_PENDING": "0",
                              "OVERLOAD_RETRY_AFTER": "5"}) == OverloadSettings(0, 0, 5)
    for name, value in [("OVERLOAD_QUEUE_MS", "-1"), ("OVERLOAD_MAX_PENDING", "x"), ("OVERLOAD_RETRY_AFTER", "0")]:
        with pytest.raises(OverloadSettingsError, match=name):
            overload_settings({name: value})


def test_the_app_is_wrapped_unless_the_budget_is_zero(build_app, env, monkeypatch):
    # read from the process environment, beside the server, as WEB_CONCURRENCY is
    monkeypatch.setenv("OVERLOAD_QUEUE_MS", "30")
    client, _ = build_app(env)
    assert isinstance(client.application.wsgi_app, Admission)
    assert client.application.wsgi_app.budget_s == pytest.approx(0.03)
    monkeypatch.setenv("OVERLOAD_QUEUE_MS", "0")
    client, _ = build_app(env)
    assert "admission" not in client.application.extensions


# -- the refusal a worker's main thread sends without parsing ------------------------------------------

POST = (b"POST /api/cart/add/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\n\r\n{\"user_id\":1}")


def test_whole_request_lengths():
    assert whole_request(POST) == len(POST)
    assert whole_request(POST + b"GET / HTTP/1.1\r\n") == len(POST)  # the next one stays
    assert whole_request(POST[:-1]) is None  # body not all there
    assert whole_request(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n") == len(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert whole_request(b"GET /x HTTP/1.1\r\nHost: x\r\n") is None  # head not all there
    assert whole_request(b"GET /x HTTP/1.0\r\n\r\n") is None  # HTTP/1.0: not kept alive
    assert whole_request(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n") is None
    assert whole_request(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") is None


def _read_response(sock) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head, body


def test_a_whole_request_is_refused_and_the_connection_kept():
    settings = OverloadSettings(retry_after=3)
    server, client = socket.socketpair()
    try:
        server.setblocking(False)
        client.sendall(POST + b"GET /next HTTP/1.1\r\n")
        wait_for(lambda: len(server.recv(65536, socket.MSG_PEEK)) == len(POST) + 20, message="the bytes")
        assert refuse_unparsed(server, refusal_bytes(settings, close=False), refusal_bytes(settings, close=True))
        head, body = _read_response(client)
        assert head.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 3" in head and b"Connection: close" not in head
        assert json.loads(body)["error"]["code"] == "overloaded"
        assert server.recv(65536) == b"GET /next HTTP/1.1\r\n"  # the next request is left for the worker
    finally:
        server.close()
        client.close()


def test_a_partial_request_is_refused_and_the_connection_closed():
    settings = OverloadSettings()
    server, client = socket.socketpair()
    try:
        client.sendall(POST[:-3])
        wait_for(lambda: server.recv(65536, socket.MSG_PEEK), message="the bytes")
        assert refuse_unparsed(server, refusal_bytes(settings, close=False),
                               refusal_bytes(settings, close=True)) is False
        head, body = _read_response(client)
        assert head.startswith(b"HTTP/1.1 429 ") and b"Connection: close" in head
        assert client.recv(10) == b""  # closed
        assert server.fileno() == -1
    finally:
        client.close()


def test_nothing_is_done_before_a_byte_arrives_or_for_a_probe():
    settings = OverloadSettings()
    refusals = refusal_bytes(settings, close=False), refusal_bytes(settings, close=True)
    server, client = socket.socketpair()
    try:
        server.setblocking(False)
        assert refuse_unparsed(server, *refusals) is None
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: server.recv(65536, socket.MSG_PEEK), message="the bytes")
        assert refuse_unparsed(server, *refusals) is None
        assert server.recv(65536).startswith(b"GET /healthz")  # left for the worker
    finally:
        server.close()
        client.close()


# -- a real server under more shoppers than it may queue -------------------------------------------------

@pytest.fixture
def tiny_server(tmp_path, env, clean_stores):
    """gunicorn-gthread, one worker with one thread, at most 2 requests waiting, a 20 ms budget."""
    port = free_port()
    child_env = {**os.environ, **env, "PORT": str(port), "WEB_SERVER": "gunicorn-gthread", "WEB_CONCURRENCY": "1",
                 "WEB_THREADS": "1", "OVERLOAD_MAX_PENDING": "2", "OVERLOAD_QUEUE_MS": "20",
                 "OVERLOAD_RETRY_AFTER": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    log = tmp_path / "web.log"
    proc = subprocess.Popen(server_argv(sys.executable, child_env), cwd=ROOT, env=child_env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or readyz(port) == 200, timeout=30, interval=0.2,
                 message="the server")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield port, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_crowd_gets_429_overloaded_and_the_counts_stay_exact(tiny_server, container, sessions):
    port, log = tiny_server
    stock = 150
    variant = make_variant(sessions, on_hand=stock)
    statuses: list[int] = []
    refusals: list[tuple[str | None, dict]] = []
    served_units = 0
    failures: list[str] = []
    lock = threading.Lock()

    def shopper(n: int) -> None:
        nonlocal served_units
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(12):
            body = json.dumps({"user_id": f"c{n}-{i}", "variant_id": variant, "quantity": 1})
            try:
                conn.request("POST", "/api/cart/add/", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read() or b"{}")
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            with lock:
                statuses.append(response.status)
                if response.status == 201:
                    served_units += payload["item"]["quantity"]
                elif response.status == 429:
                    refusals.append((response.getheader("Retry-After"), payload))
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()

    threads = [threading.Thread(target=shopper, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    assert not failures, failures[:5]
    assert len(statuses) == 40 * 12
    assert not [s for s in statuses if s >= 500], log.read_text()[-3000:]
    assert set(statuses) <= {201, 400, 429}, sorted(set(statuses))
    assert refusals, "40 shoppers at one thread with 2 places to wait: some must be refused"
    for retry_after, payload in refusals:
        assert retry_after == "1"
        assert payload["error"]["code"] == "overloaded"
    assert statuses.count(201) > 0
    counters = container.holds.counters([variant])[variant]
    assert counters.available + counters.reserved == stock
    assert counters.reserved == statuses.count(201) == served_units  # one unit per distinct customer
    assert counters.reserved <= stock
