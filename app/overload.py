"""Admission control: under more load than the workers can serve in time, answer 429 `overloaded`
with Retry-After at once, before the app does any work, instead of letting every answer get slow.

Two limits, both per worker process of WEB_SERVER=gunicorn-gthread (`StampedThreadWorker`, the
server that sees each request the moment it arrives; the other servers queue requests where the app
cannot see them, so they serve without admission control):

- OVERLOAD_MAX_PENDING: a request that arrives while this many are already waiting for a thread
  is answered 429 at once by the worker's main thread: canned bytes, the request unparsed; a
  whole plain HTTP/1.1 request is taken off the connection, which stays open, anything else (a
  partial request, chunked, Expect, Connection: close) gets the 429 and a closed connection
  (`refuse_unparsed`). The queue stays short,
  so the requests it holds are served in time: without the bound, thousands of connections keep
  thousands of requests queued and every answer waits for all of them.
- OVERLOAD_QUEUE_MS: a request that still waited longer than this for a thread (it arrived during
  a burst) is answered 429 by `Admission`, the WSGI middleware in front of the app, before the
  app runs (no Flask, no Redis, no database), on a connection that stays open.

/healthz and /readyz are never refused (a probe must see the process, not the queue).

Settings (read from the environment, beside the server, as WEB_CONCURRENCY is):
  OVERLOAD_QUEUE_MS       wait budget for a thread, in ms, applied while others wait behind,
                          from 10 s after a worker starts (default 500: a backstop for bursts
                          and stalls; 0: off)
  OVERLOAD_MAX_PENDING    requests waiting for a thread, per worker, beyond which new ones are
                          refused at once (default 64; 0: no bound)
  OVERLOAD_RETRY_AFTER    seconds in the Retry-After header of a 429 (default 1)
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from app.settings import SettingsError, env_int

QUEUED_AT = "inventory.queued_at"  # environ key: time.monotonic() when the request arrived
WAITING = "inventory.waiting"  # environ key: requests waiting behind it when a thread took it up
EXEMPT_PATHS = frozenset({"/healthz", "/healthz/", "/readyz", "/readyz/"})
PROBE_REQUESTS = (b"GET /healthz", b"GET /readyz", b"HEAD /healthz", b"HEAD /readyz")
_local = threading.local()
STARTUP_GRACE_S = 10.0  # OVERLOAD_QUEUE_MS applies from this long after a worker starts


# A bad OVERLOAD_* value: a one-line error naming the setting.
OverloadSettingsError = SettingsError


@dataclass(frozen=True)
class OverloadSettings:
    queue_ms: int = 500
    max_pending: int = 64
    retry_after: int = 1


def overload_settings(env: Mapping[str, str] | None = None) -> OverloadSettings:
    """The OVERLOAD_* settings of `env` (default os.environ)."""
    env = os.environ if env is None else env
    return OverloadSettings(
        queue_ms=env_int(env, "OVERLOAD_QUEUE_MS", 500, 0, 60_000),
        max_pending=env_int(env, "OVERLOAD_MAX_PENDING", 64, 0, 100_000),
        retry_after=env_int(env, "OVERLOAD_RETRY_AFTER", 1, 1, 3600),
    )


def refusal_body(settings: OverloadSettings) -> bytes:
    """The 429 body of API.md's error shape."""
    return json.dumps({"error": {
        "code": "overloaded",
        "message": "The service has more requests than it can serve in time; retry after Retry-After seconds",
        "details": {"retry_after_seconds": settings.retry_after},
    }}, separators=(",", ":")).encode() + b"\n"


def refusal_bytes(settings: OverloadSettings, *, close: bool) -> bytes:
    """A whole HTTP/1.1 429 response, written without going through the app (or a parser)."""
    body = refusal_body(settings)
    head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {settings.retry_after}\r\n"
            f"Cache-Control: no-store\r\n" + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode("ascii") + body


def arrived_at(environ: dict) -> tuple[float | None, int]:
    """(when the server got the request, in time.monotonic(), or None if it does not say; how many
    requests were still waiting behind it when a thread took it up): from environ keys, or what
    StampedThreadWorker noted for the thread serving it."""
    stamp = environ.get(QUEUED_AT)
    if stamp is not None:
        return stamp, environ.get(WAITING, 1)
    return getattr(_local, "queued_at", None), getattr(_local, "waiting", 0)


class Admission:
    """WSGI middleware: 429 `overloaded` for a request that waited for a thread longer than the
    budget while others wait behind it (when the server says: see arrived_at); the app does not
    run for it. A late request with nobody behind it is served: it was slowed by the machine (a
    worker busy starting, another process's load), not by a queue that refusing it would shorten."""

    def __init__(self, app, settings: OverloadSettings, clock: Callable[[], float] = time.monotonic):
        self.app, self.settings, self.clock = app, settings, clock
        self.budget_s = settings.queue_ms / 1000
        self.refused = 0  # this process's count, for tests and logs
        body = refusal_body(settings)
        self._body = [body]
        self._headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                         ("Retry-After", str(settings.retry_after)), ("Cache-Control", "no-store")]

    def __call__(self, environ, start_response):
        stamp, waiting = arrived_at(environ)
        if (stamp is not None and waiting > 0 and self.clock() - stamp > self.budget_s
                and environ.get("PATH_INFO") not in EXEMPT_PATHS):
            self.refused += 1
            start_response("429 Too Many Requests", list(self._headers))
            return self._body
        return self.app(environ, start_response)


def install_admission(flask_app, env: Mapping[str, str] | None = None) -> Admission | None:
    """Wrap the app's WSGI callable (outermost); None when OVERLOAD_QUEUE_MS is 0."""
    settings = overload_settings(env)
    if not settings.queue_ms:
        return None
    admission = Admission(flask_app.wsgi_app, settings)
    flask_app.wsgi_app = admission
    flask_app.extensions["admission"] = admission
    return admission


# -- gunicorn: a threaded worker that stamps when each request arrived ----------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,9})[ \t]*\r\n", re.IGNORECASE)
_NOT_PLAIN = re.compile(rb"\r\n(transfer-encoding|connection:[ \t]*close|expect)", re.IGNORECASE)


def whole_request(data: bytes) -> int | None:
    """The length of the first request in `data` when it is all there and the connection may carry
    another after it: an HTTP/1.1 request with a Content-Length (or none) and no Transfer-Encoding,
    Expect or Connection: close; else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end + 2]
    line = head[:head.find(b"\r\n")]
    if not line.endswith(b" HTTP/1.1") or _NOT_PLAIN.search(head):
        return None
    match = _CONTENT_LENGTH.search(head)
    total = end + 4 + (int(match.group(1)) if match else 0)
    return total if total <= len(data) else None


def refuse_unparsed(sock, keep_alive: bytes, close: bytes) -> bool | None:
    """Answer 429 to the request waiting on a plain socket without the app or gunicorn's parser.

    True: answered, the request consumed, the connection fit for the next request. False: answered
    and the socket closed (the request was not whole, or asked to close). None: nothing done (no
    byte has arrived yet, a TLS socket, or a health probe): the request goes the ordinary way."""
    if type(sock) is not socket.socket:
        return None
    try:
        data = sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        data = b""
    if data.startswith(PROBE_REQUESTS):
        return None
    size = whole_request(data) if data else None
    try:
        if size is not None:
            sock.recv(size, socket.MSG_DONTWAIT)
            if sock.send(keep_alive, socket.MSG_DONTWAIT) == len(keep_alive):
                return True
        elif data:
            # take what came out of the buffer: a socket closed with unread bytes sends a reset,
            # which can reach the client before it read the answer
            while sock.recv(65536, socket.MSG_DONTWAIT):
                pass
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        data = b""
    try:
        if data and size is None:
            sock.send(close, socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
    return False


def _has_data(sock) -> bool:
    """Whether bytes wait on a plain socket (a TLS one: assume so)."""
    if type(sock) is not socket.socket:
        return True
    try:
        return bool(sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _buffered(conn) -> bool:
    """Whether gunicorn's parser already holds bytes of this connection's next request."""
    parser = getattr(conn, "parser", None)
    return parser is not None and bool(parser.unreader.buf.getvalue())


@functools.cache
def _thread_worker_class():
    from gunicorn.workers.gthread import ThreadWorker

    class StampedThreadWorker(ThreadWorker):
        """gunicorn's gthread worker, noting when a request arrived (a connection accepted, or a
        kept-alive one readable again) and refusing at once what arrives while OVERLOAD_MAX_PENDING
        requests already wait for a thread."""

        def init_process(self):
            self.overload = overload_settings()
            self.refusals = (refusal_bytes(self.overload, close=False), refusal_bytes(self.overload, close=True))
            self.submitted = 0  # main thread only
            self.started = 0  # under started_lock (the pool's threads)
            self.started_lock = threading.Lock()
            self.refused_at_once = 0
            self.polled_at = self.arrived_since = time.monotonic()
            # a worker's first requests open its connections and fill its caches: slow once, with
            # no overload to shed; the wait budget applies from then on
            self.budget_from = time.monotonic() + STARTUP_GRACE_S
            super().init_process()

        def wait_for_and_dispatch_events(self, timeout):
            # When did the requests this poll reports arrive? If it returned at once, they were
            # there before it was called: at the latest since the previous poll returned (what
            # came before that, that poll reported). If it waited, they came as it returned.
            # (gunicorn's own method, with the two times noted between the poll and the dispatch)
            called = time.monotonic()
            try:
                events = self.poller.select(timeout)
                now = time.monotonic()
                self.arrived_since = self.polled_at if now - called < 0.0005 else now
                self.polled_at = now
                for key, _ in events:
                    key.data(key.fileobj)
            except OSError as e:
                if e.errno != errno.EINTR:
                    raise

        def enqueue_req(self, conn):
            if not conn.initialized and not conn.data_ready and not _has_data(conn.sock):
                # a new connection whose request has not come yet waits for it in the poller, not in
                # a thread nor uncounted in the queue: it comes back here when its request is in
                conn.timeout = time.monotonic() + self.cfg.keepalive
                self.pending_conns.append(conn)
                self.poller.register(conn.sock, selectors.EVENT_READ,
                                     functools.partial(self.on_pending_socket_readable, conn))
                return
            limit = self.overload.max_pending
            if limit and self.submitted - self.started >= limit and not _buffered(conn):
                kept = refuse_unparsed(conn.sock, *self.refusals)
                if kept is not None:
                    self.refused_at_once += 1
                    if kept:  # back to waiting for its next request, as finish_request does
                        conn.set_timeout()
                        self.keepalived_conns.append(conn)
                        self.poller.register(conn.sock, selectors.EVENT_READ,
                                             functools.partial(self.on_client_socket_readable, conn))
                    else:
                        self.nr_conns -= 1
                    return
            conn.queued_at = self.arrived_since
            self.submitted += 1
            super().enqueue_req(conn)

        def handle(self, conn):
            with self.started_lock:
                self.started += 1
                _local.waiting = self.submitted - self.started
            if _local.waiting and time.monotonic() < self.budget_from:
                _local.waiting = 0
            _local.queued_at = getattr(conn, "queued_at", None)
            try:
                return super().handle(conn)
            finally:
                _local.queued_at = None

    return StampedThreadWorker


def __getattr__(name: str):
    # gunicorn imports "app.overload.StampedThreadWorker" by name; only then is gunicorn imported
    if name == "StampedThreadWorker":
        return _thread_worker_class()
    raise AttributeError(name)
