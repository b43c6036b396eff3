"""The hot path's own Redis connection: one per thread, commands packed by hand, replies read raw.

redis-py's `Redis.execute_command` costs about 60 us of client CPU per call on top of the socket
round trip (connection-pool checkout and release with a pid check each, the retry wrapper, the
observability hooks, response callbacks); a pipeline costs more. Add-to-cart is one script call, so
that overhead was most of the client's cost of a reservation (bench/README.md). A lane keeps what
matters for correctness from redis-py: its `Connection` connects (AUTH, SELECT, TLS, timeouts) and
its error table turns error replies into the same `ResponseError` classes (NOSCRIPT is a
`NoScriptError`). It skips the rest: a command is packed into RESP once (a script call's fixed part,
EVALSHA, the sha and the variant's keys, once per variant), sent with one `sendall`, and its replies
are read off the socket into a hiredis reader; a socket fault drops the connection and raises
redis-py's `ConnectionError` or `TimeoutError`, and a connection that sat idle is checked first.

One server per lane: on a Redis Cluster app/engine/cluster_lane.py keeps a lane per primary and
picks one by the call's hash slot. Behind Sentinel (a client from `Sentinel.master_for`) the lane's
connections are redis-py's `SentinelManagedConnection`s: each connect asks the sentinels for the
primary's address, so after a failover the next connection goes to the new primary; a READONLY reply
(the old primary came back as a replica) drops the connection, so the next call asks again.

Nothing is ever sent twice on a fault (as with the rest of the service: no silent re-sends; a reserve
sent twice would reserve twice): a `ConnectionError` or `TimeoutError` reaches the caller, and the
next call connects again.

What a lane finds out about its connection before sending on it, and what it cannot:
- closed by the server (a restart, CLIENT KILL, a client timeout) while it sat idle for more than
  IDLE_CHECK_SECONDS: the close has reached this host as a FIN or RST, the socket reads as ready
  while no reply is due, and the connection is replaced before anything is written on it;
- closed within IDLE_CHECK_SECONDS of the last call: not looked at (a busy connection pays no system
  call for the check). The command is written into the dead socket, the read finds it closed, and
  the call raises `ConnectionError` with the connection dropped; the next call connects again. The
  command is not sent again: a connection found closed after a write cannot prove the write was not
  read and run (a server can run a command and close before its reply goes out);
- silently dead (no FIN ever arrives: a host or network gone, a middlebox that dropped the flow):
  no local check can tell. The call waits socket_timeout, drops the connection and raises
  `TimeoutError`.

Everything this module takes from redis-py beyond its public API is checked by `check_redis_py()`
whenever a Lane is made (an app can also call it at start), so a redis-py that changed fails there,
loudly, with the internal it misses, instead of somewhere inside a request.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import weakref
from typing import Iterable, Sequence

import hiredis
import redis as redis_py
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import (ConnectionError, InvalidResponse, NoScriptError, ReadOnlyError, ResponseError,
                              TimeoutError)
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

# The redis-py release this module was written and tested against (setup.cfg pins it).
WRITTEN_FOR = "8.1.0"

# Connection arguments of a redis-py pool that only a RESP3 connection can take; a lane speaks RESP2.
_RESP3_ONLY_KWARGS_PREFIX = "maint_notifications"

_lanes: "weakref.WeakSet[Lane]" = weakref.WeakSet()


def _forget_all_in_child() -> None:
    # A forked child must not share its parent's sockets: it gets fresh connections on first use.
    # The copies are dropped without a disconnect (which would shut the parent's socket down).
    for lane in list(_lanes):
        lane._local = threading.local()


os.register_at_fork(after_in_child=_forget_all_in_child)


# --- the redis-py internals a lane relies on ------------------------------------------------------

def _redis_py_error(internal: str) -> RuntimeError:
    return RuntimeError(
        f"app/engine/lane.py relies on redis-py's {internal}, which the installed redis "
        f"{getattr(redis_py, '__version__', '(unknown version)')} does not have or no longer behaves as "
        f"expected; the lane was written for redis {WRITTEN_FOR} (pinned in setup.cfg): install that "
        f"version, or review the lane against the new one")


def _parse_error():
    """redis-py's error-reply table as a hiredis `replyError` callable (NOSCRIPT as NoScriptError...)."""
    try:
        from redis._parsers import BaseParser
    except ImportError:
        raise _redis_py_error("redis._parsers.BaseParser (its error-reply table)") from None
    parse_error = getattr(BaseParser, "parse_error", None)
    if not callable(parse_error):
        raise _redis_py_error("redis._parsers.BaseParser.parse_error (its error-reply table)")
    try:
        ok = isinstance(parse_error("NOSCRIPT No matching script."), NoScriptError)
    except Exception:  # noqa: BLE001 - any failure means the table changed
        ok = False
    if not ok:
        raise _redis_py_error("redis._parsers.BaseParser.parse_error (NOSCRIPT parsed as NoScriptError)")
    return parse_error


def _lane_kwargs(pool) -> dict:
    """The pool's connection arguments as a lane's RESP2 connection takes them."""
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if not k.startswith(_RESP3_ONLY_KWARGS_PREFIX)}
    kwargs["protocol"] = 2
    return kwargs


def check_redis_py(redis=None) -> None:
    """Raise RuntimeError, naming it, when an internal of redis-py the lane relies on is missing.

    Checked: `redis._parsers.BaseParser.parse_error` (error replies as redis-py's classes), a
    Connection's `_sock` (the socket a lane writes and reads), a pool's `connection_kwargs` and
    `connection_class` (how a lane builds its own connections), the encoder settings a lane's
    reader copies, and that a connection can be built from the pool's arguments without the RESP3-
    only `maint_notifications_*` ones. With `redis` (a client), its own pool is checked; without,
    a default one. Nothing is connected. Called whenever a Lane is made; the app may call it at start.
    """
    _parse_error()
    if redis is None:
        pool = redis_py.ConnectionPool()
    else:
        pool = getattr(redis, "connection_pool", None)
        if pool is None:
            raise _redis_py_error("Redis.connection_pool")
    for name in ("connection_kwargs", "connection_class"):
        if not hasattr(pool, name):
            raise _redis_py_error(f"ConnectionPool.{name}")
    if not isinstance(pool.connection_kwargs, dict):
        raise _redis_py_error("ConnectionPool.connection_kwargs (a dict of connection arguments)")
    try:
        conn = pool.connection_class(**_lane_kwargs(pool))
    except Exception as exc:  # noqa: BLE001 - an argument the connection class no longer takes
        raise _redis_py_error(f"ConnectionPool.connection_class(**connection_kwargs) with protocol=2 "
                              f"({type(exc).__name__}: {exc})") from None
    if not hasattr(conn, "_sock"):
        raise _redis_py_error("Connection._sock (the socket of a connected Connection)")
    encoder = getattr(conn, "encoder", None)
    for name in ("encoding", "encoding_errors", "decode_responses"):
        if not hasattr(encoder, name):
            raise _redis_py_error(f"Connection.encoder.{name}")
    if not hasattr(conn, "socket_timeout"):
        raise _redis_py_error("Connection.socket_timeout")


# --- packing ----------------------------------------------------------------------------------------

def bulk(value) -> bytes:
    """One RESP bulk string of a str, int or bytes."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode()
    elif isinstance(value, int) and not isinstance(value, bool):
        raw = b"%d" % value
    else:
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def bulks(values: Sequence) -> bytes:
    """RESP bulk strings of str and int values, back to back (the hot path's packer)."""
    text = "".join([f"${len(s)}\r\n{s}\r\n" for s in map(str, values)])
    if text.isascii():  # then every length counted in characters is one in bytes
        return text.encode()
    return b"".join(map(bulk, map(str, values)))


def pack(*args) -> bytes:
    """A whole command as one RESP array."""
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


def script_prefix(sha: str, numkeys: int, fixed: Sequence, total_args: int) -> bytes:
    """The fixed head of an EVALSHA with `total_args` keys and arguments in all, of which `fixed`
    come first: append `bulk()` of the rest to get the whole command."""
    return (b"*%d\r\n" % (3 + total_args) + bulk("EVALSHA") + bulk(sha) + bulk(numkeys)
            + b"".join(map(bulk, fixed)))


def as_dict(reply: list) -> dict:
    """A HGETALL reply as a dict (a lane speaks RESP2: a flat list of field, value pairs)."""
    it = iter(reply)
    return dict(zip(it, it))


# A connection left unused this long is checked before use (one non-blocking peek); a busy one is
# not, so a flash sale pays no extra system call per reservation.
IDLE_CHECK_SECONDS = 0.05


def _alive(sock) -> bool:
    """False when the server has closed the connection (or sent something nobody asked for): the
    socket is readable while no reply is due."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return not poller.poll(0)
    except OSError:
        return False


def _kernel_timeouts(sock, timeout: float | None) -> None:
    """Let the kernel keep the socket's timeouts (SO_RCVTIMEO / SO_SNDTIMEO) instead of Python.

    A Python socket with a timeout polls before every send and every receive: four system calls per
    round trip where two do. A blocking socket with kernel timeouts makes one `sendto` and one
    `recvfrom`; a receive that times out fails with EAGAIN, a `TimeoutError` here, and the connection
    is dropped, as redis-py does on its own timeout. Plain TCP sockets only (TLS and unix sockets
    keep Python's timeouts)."""
    if type(sock) is not socket.socket or not timeout or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)


class _Wire:
    """One thread's connection: redis-py's `Connection` connects it (AUTH, SELECT, TLS); its socket
    and a hiredis reader of our own carry the commands."""

    __slots__ = ("conn", "sock", "reader", "buf", "used")

    def __init__(self, conn):
        self.conn = conn
        self.sock = None
        self.reader = None
        self.buf = bytearray(65536)
        self.used = 0.0

    def connect(self) -> None:
        conn = self.conn
        conn.connect()
        sock = getattr(conn, "_sock", None)
        if sock is None:  # connected, yet no socket where redis-py 8.1 keeps it
            conn.disconnect()
            raise _redis_py_error("Connection._sock (the socket of a connected Connection)")
        self.sock = sock
        _kernel_timeouts(self.sock, conn.socket_timeout)
        options = {"protocolError": InvalidResponse, "replyError": _parse_error(),
                   "errors": conn.encoder.encoding_errors}
        if conn.encoder.decode_responses:
            options["encoding"] = conn.encoder.encoding
        self.reader = hiredis.Reader(**options)

    def drop(self) -> None:
        self.sock = self.reader = None
        self.conn.disconnect()

    def roundtrip(self, packed: bytes, count: int) -> list:
        """Send, then read `count` replies (error replies are returned, not raised, but see
        `refusal`). A fault drops the connection and raises redis-py's ConnectionError or TimeoutError."""
        self.send(packed)
        return self.read(count)

    def send(self, packed: bytes) -> None:
        """Write packed commands (the first half of `roundtrip`: a cluster writes to every node first)."""
        try:
            self.sock.sendall(packed)
        except BaseException as exc:
            raise self.fault(exc) from None

    def read(self, count: int) -> list:
        """Read `count` replies of what was sent (the second half of `roundtrip`)."""
        sock, reader, buf = self.sock, self.reader, self.buf
        out = []
        try:
            while len(out) < count:
                reply = reader.gets()
                while reply is False:
                    n = sock.recv_into(buf)
                    if not n:
                        raise ConnectionError("Connection closed by server.")
                    reader.feed(buf, 0, n)
                    reply = reader.gets()
                out.append(reply)
        except BaseException as exc:
            raise self.fault(exc) from None
        for reply in out:
            if isinstance(reply, Exception):
                if not isinstance(reply, ResponseError):
                    raise self.refusal(reply)
                if isinstance(reply, ReadOnlyError):
                    self.drop()  # a replica now: the next call connects again (Sentinel: to the new primary)
        return out

    def refusal(self, error: Exception) -> Exception:
        """An error reply redis-py does not class as a `ResponseError` but as a `ConnectionError`:
        the server refused the connection itself, not one command (LOADING while it loads its data
        after a restart: `BusyLoadingError`; NOAUTH or WRONGPASS: `AuthenticationError`; a full
        server: "max number of clients reached"). redis-py raises these even from a pipeline that
        returns error replies in place, and drops the connection; so does a lane (every reply was
        read, so the connection is in step, but it is not one to keep). Returned in place they would
        pass for results: callers tell error replies apart as `ResponseError`s."""
        self.drop()
        return error

    def fault(self, exc: BaseException) -> BaseException:
        """Drop the connection after `exc` (nothing more can be read in step on it); what to raise."""
        self.drop()
        if isinstance(exc, (socket.timeout, BlockingIOError)):
            return TimeoutError("Timeout talking to Redis")
        if isinstance(exc, OSError):
            return ConnectionError(f"Error talking to Redis: {exc}")
        return exc  # ConnectionError above, InvalidResponse, or an interrupt mid-reply


_CONNECTION_CLASSES = (Connection, SSLConnection, UnixDomainSocketConnection,
                       SentinelManagedConnection, SentinelManagedSSLConnection)


def supports(redis) -> bool:
    """A lane speaks over redis-py's own socket connections only (TCP, TLS, unix, a Sentinel's
    primary); a client with another connection class (a cluster, a test double) keeps redis-py's
    usual path."""
    pool = getattr(redis, "connection_pool", None)
    return pool is not None and pool.connection_class in _CONNECTION_CLASSES


class Lane:
    """Per-thread connections from a redis-py client's pool settings (not from its pool), RESP2
    (no push messages can come between replies)."""

    def __init__(self, redis):
        check_redis_py(redis)
        kwargs = _lane_kwargs(redis.connection_pool)
        connection_class = redis.connection_pool.connection_class
        self._make = lambda: _Wire(connection_class(**kwargs))
        self._local = threading.local()
        _lanes.add(self)

    def _wire(self) -> _Wire:
        local = self._local
        wire = getattr(local, "wire", None)
        now = time.monotonic()
        if wire is None:
            wire = local.wire = self._make()
        elif wire.sock is not None and now - wire.used > IDLE_CHECK_SECONDS and not _alive(wire.sock):
            # the server closed it while it sat idle (a restart, a failover, a client timeout):
            # nothing was sent on it, so connecting again is safe, as redis-py's pool does
            wire.drop()
        wire.used = now
        if wire.sock is None:  # first use, or dropped after a fault
            wire.connect()
        return wire

    def call(self, packed: bytes):
        """Send one packed command, return its reply; an error reply is raised.

        The reservation's path, so written out in one frame: with 64 client processes on two cores
        each call runs with cold caches, and every Python call it saves shows (bench/README.md)."""
        wire = getattr(self._local, "wire", None)
        now = time.monotonic()
        if wire is None or wire.sock is None or now - wire.used > IDLE_CHECK_SECONDS:
            wire = self._wire()
        else:
            wire.used = now
        sock, reader = wire.sock, wire.reader
        try:
            sock.sendall(packed)
            reply = reader.gets()
            while reply is False:
                n = sock.recv_into(wire.buf)
                if not n:
                    raise ConnectionError("Connection closed by server.")
                reader.feed(wire.buf, 0, n)
                reply = reader.gets()
        except BaseException as exc:
            raise wire.fault(exc) from None
        if isinstance(reply, Exception):
            if not isinstance(reply, ResponseError):
                raise wire.refusal(reply)
            if isinstance(reply, ReadOnlyError):
                wire.drop()  # see _Wire.read
            raise reply
        return reply

    def call_many(self, packed: bytes, count: int) -> list:
        """Send `count` packed commands in one write, return their replies in order; an error reply
        is returned in its place (as a `ResponseError`), so the others are still read. A refusal of
        the connection itself (LOADING...) is raised once every reply is read; see `_Wire.refusal`."""
        return self._wire().roundtrip(packed, count)

    def send(self, packed: bytes) -> _Wire:
        """Write packed commands on this thread's connection; read their replies with the returned
        connection's `read(count)` (as `call_many`, in two halves: write to several servers first)."""
        wire = self._wire()
        wire.send(packed)
        return wire

    def execute(self, commands: Iterable[Sequence]) -> list:
        """Plain commands (each a sequence of arguments) in one round trip; see `call_many`."""
        cmds = list(commands)
        return self.call_many(b"".join(pack(*c) for c in cmds), len(cmds)) if cmds else []

    def close(self) -> None:
        """Disconnect this thread's connection (others are dropped with their threads)."""
        wire = getattr(self._local, "wire", None)
        if wire is not None:
            self._local.wire = None
            wire.drop()
