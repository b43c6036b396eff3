"""The hot path's own Redis connection: one per thread, commands packed by hand, replies read raw.

redis-py's `Redis.execute_command` costs about 60 us of client CPU per call on top of the socket
round trip (connection-pool checkout and release with a pid check each, the retry wrapper, the
observability hooks, response callbacks); a pipeline costs more. Add-to-cart is one script call, so
that overhead was most of the client's cost of a reservation (bench/README.md). A lane keeps the
parts of redis-py that matter for correctness, its `Connection` (connect, AUTH and SELECT, TLS, the
idle health check, timeouts, turning error replies into `ResponseError`s and socket faults into
`ConnectionError` / `TimeoutError` with the connection dropped), and skips the rest: a command is
packed into RESP once (a script call's fixed part, EVALSHA, the sha and the variant's keys, once per
variant) and sent with one `sendall`, and its replies are read straight off the connection.

Single-node Redis only: on a cluster the engine sends through redis-py's `RedisCluster`, which routes
each call to the primary owning its slot.

Nothing is ever sent twice on a fault (as with the rest of the service: no silent re-sends; a reserve
sent twice would reserve twice): a `ConnectionError` or `TimeoutError` reaches the caller, and the
next call connects again.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import weakref
from typing import Iterable, Sequence

from redis.exceptions import ConnectionError, ResponseError, TimeoutError

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


def bulks(values: Iterable) -> bytes:
    """RESP bulk strings of str and int values, back to back (the hot path's packer)."""
    out = []
    for v in values:
        raw = str(v).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def pack(*args) -> bytes:
    """A whole command as one RESP array."""
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


def script_prefix(sha: str, numkeys: int, fixed: Sequence, total_args: int) -> bytes:
    """The fixed head of an EVALSHA with `total_args` keys and arguments in all, of which `fixed`
    come first: append `bulk()` of the rest to get the whole command."""
    return (b"*%d\r\n" % (3 + total_args) + bulk("EVALSHA") + bulk(sha) + bulk(numkeys)
            + b"".join(map(bulk, fixed)))


def as_dict(reply) -> dict:
    """A HGETALL reply as a dict: RESP3 sends a map, RESP2 a flat list of pairs."""
    if isinstance(reply, dict):
        return reply
    it = iter(reply)
    return dict(zip(it, it))


# A connection left unused this long is checked before use (one non-blocking peek); a busy one is
# not, so a flash sale pays no extra system call per reservation.
IDLE_CHECK_SECONDS = 0.05


def _alive(conn) -> bool:
    """False when the server has closed the connection (or sent something nobody asked for)."""
    sock = conn._sock
    if sock.gettimeout() is not None:
        try:  # redis-py's own check (its pool runs it on every checkout)
            return not conn.can_read()
        except (OSError, ConnectionError, TimeoutError):
            return False
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # end of stream, or unread bytes: not a connection to send on


def _kernel_timeouts(conn) -> None:
    """Let the kernel keep the socket's timeouts (SO_RCVTIMEO / SO_SNDTIMEO) instead of Python.

    A Python socket with a timeout polls before every send and every receive: four system calls per
    round trip where two do. A blocking socket with kernel timeouts makes one `sendto` and one
    `recvfrom`; a receive that times out fails with EAGAIN, which redis-py turns into a
    `ConnectionError` and drops the connection, as it does with its own timeout. TCP sockets only
    (a unix socket or TLS keeps Python's timeouts)."""
    sock = conn._sock
    timeout = conn.socket_timeout
    if not isinstance(sock, socket.socket) or type(sock) is not socket.socket or not timeout:
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)


class Lane:
    """Per-thread connections from a redis-py client's pool settings (not from its pool)."""

    def __init__(self, redis):
        pool = redis.connection_pool
        self._make = lambda: pool.connection_class(**pool.connection_kwargs)
        self._local = threading.local()
        _lanes.add(self)

    def _conn(self):
        local = self._local
        conn = getattr(local, "conn", None)
        now = time.monotonic()
        if conn is None:
            conn = local.conn = self._make()
        elif conn._sock is not None and now - local.used > IDLE_CHECK_SECONDS and not _alive(conn):
            # the server closed it while it sat idle (a restart, a failover, a client timeout):
            # nothing was sent on it, so connecting again is safe, as redis-py's pool does
            conn.disconnect()
        local.used = now
        if conn._sock is None:  # first use, or dropped after a fault
            conn.connect()
            _kernel_timeouts(conn)
        return conn

    def call(self, packed: bytes):
        """Send one packed command, return its reply; an error reply is raised."""
        conn = self._conn()
        conn.send_packed_command((packed,))
        return conn.read_response()

    def call_many(self, packed: bytes, count: int) -> list:
        """Send `count` packed commands in one write, return their replies in order; an error reply
        is returned in its place (as a `ResponseError`), so the others are still read."""
        conn = self._conn()
        conn.send_packed_command((packed,))
        out = []
        for _ in range(count):
            try:
                out.append(conn.read_response())
            except ResponseError as e:
                out.append(e)
        return out

    def execute(self, commands: Iterable[Sequence]) -> list:
        """Plain commands (each a sequence of arguments) in one round trip; see `call_many`."""
        cmds = list(commands)
        return self.call_many(b"".join(pack(*c) for c in cmds), len(cmds)) if cmds else []

    def close(self) -> None:
        """Disconnect this thread's connection (others are dropped with their threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.disconnect()
