"""A small TCP proxy for fault tests: put it between the app and the database, then cut it.

`cut()` closes the listening socket and every live connection, as when the database host goes
away: new connections are refused and open ones fail. `restore()` listens again on the same port.
`cut_after_commit()` arms the nastiest cut: the next `COMMIT` a client sends reaches the server,
the server's answer is swallowed and then everything is cut, so the client cannot know whether
its transaction committed (it did).
"""
from __future__ import annotations

import socket
import threading

_CHUNK = 65536
# The simple-query message psycopg2 sends for connection.commit(): 'Q', length, "COMMIT\0".
_COMMIT = b"COMMIT\x00"


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int = 0):
        self.target = (target_host, target_port)
        self.port = listen_port
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._commit_trap = threading.Event()
        self.commits_swallowed = 0
        self.accepted = 0
        self._keep_listening = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "TcpProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="proxy-accept").start()
        return self

    def cut(self) -> None:
        """Refuse new connections and break every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)

    def restore(self) -> None:
        if self._listener is None:
            self.start()

    def cut_after_commit(self, keep_listening: bool = False) -> None:
        """Cut right after the server has answered the next COMMIT, swallowing that answer.

        keep_listening: break only the open connections; new ones still get through (a blip).
        """
        self._keep_listening = keep_listening
        self._commit_trap.set()

    def drop_connections(self) -> None:
        """Break every open connection but keep accepting new ones."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)

    @property
    def up(self) -> bool:
        return self._listener is not None

    # -- plumbing ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _close(client)
                    _close(upstream)
                    return
                self._conns.update((client, upstream))
                self.accepted += 1
            state = {"swallow": False}
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, to_server: bool) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if to_server:
                    if self._commit_trap.is_set() and _COMMIT in data:
                        self._commit_trap.clear()
                        state["swallow"] = True  # set before the server can answer
                    dst.sendall(data)
                elif state["swallow"]:
                    # The server has answered the COMMIT: it is durable. The client never hears it.
                    self.commits_swallowed += 1
                    if self._keep_listening:
                        self.drop_connections()
                    else:
                        self.cut()
                    return
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
