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

Single-node Redis only: on a cluster the engine sends through redis-py's `RedisCluster`, which routes
each call to the primary owning its slot.

Nothing is ever sent twice on a fault (as with the rest of the service: no silent re-sends; a reserve
sent twice would reserve twice): a `ConnectionError` or `TimeoutError` reaches the caller, and the
next call connects again.
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
from redis._parsers import BaseParser
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError, InvalidResponse, ResponseError, TimeoutError

_lanes: "weakref.WeakSet[Lane]" = weakref.WeakSet()


def _forget_all_in_child() -> None:
    # A forked child must not share its parent's sockets: it gets fresh connections on first use.
    # The copies are dropped without a disconnect (which would shut the parent's socket down).
    for lane in list(_lanes):
        lane._local = threading.local()


os.register_at_fork(after_in_child=_forget_all_in_child)


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
        self.sock = conn._sock
        _kernel_timeouts(self.sock, conn.socket_timeout)
        options = {"protocolError": InvalidResponse, "replyError": BaseParser.parse_error,
                   "errors": conn.encoder.encoding_errors}
        if conn.encoder.decode_responses:
            options["encoding"] = conn.encoder.encoding
        self.reader = hiredis.Reader(**options)

    def drop(self) -> None:
        self.sock = self.reader = None
        self.conn.disconnect()

    def roundtrip(self, packed: bytes, count: int) -> list:
        """Send, then read `count` replies (error replies are returned, not raised). A fault drops
        the connection and raises redis-py's ConnectionError or TimeoutError."""
        sock, reader, buf = self.sock, self.reader, self.buf
        out = []
        try:
            sock.sendall(packed)
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
        return out

    def fault(self, exc: BaseException) -> BaseException:
        """Drop the connection after `exc` (nothing more can be read in step on it); what to raise."""
        self.drop()
        if isinstance(exc, (socket.timeout, BlockingIOError)):
            return TimeoutError("Timeout talking to Redis")
        if isinstance(exc, OSError):
            return ConnectionError(f"Error talking to Redis: {exc}")
        return exc  # ConnectionError above, InvalidResponse, or an interrupt mid-reply


def supports(redis) -> bool:
    """A lane speaks over redis-py's own socket connections only (TCP, TLS, unix); a client with
    another connection class (a cluster, a test double) keeps redis-py's usual path."""
    pool = getattr(redis, "connection_pool", None)
    return pool is not None and pool.connection_class in (Connection, SSLConnection, UnixDomainSocketConnection)


class Lane:
    """Per-thread connections from a redis-py client's pool settings (not from its pool), RESP2
    (no push messages can come between replies)."""

    def __init__(self, redis):
        kwargs = {**redis.connection_pool.connection_kwargs, "protocol": 2}
        kwargs.pop("maint_notifications_pool_handler", None)
        kwargs.pop("maint_notifications_config", None)
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
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def call_many(self, packed: bytes, count: int) -> list:
        """Send `count` packed commands in one write, return their replies in order; an error reply
        is returned in its place (as a `ResponseError`), so the others are still read."""
        return self._wire().roundtrip(packed, count)

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
