"""A Redis Sentinel deployment on loopback ports for tests (`EmbeddedSentinelGroup`), beside the
embedded Redis and cluster of app/embedded.py (which also gives this class by its name)."""
from __future__ import annotations

import time
from pathlib import Path

from app.embedded import EmbeddedRedis, find_redis_server


class _EmbeddedSentinel(EmbeddedRedis):
    """A `redis-server --sentinel` on 127.0.0.1 with its own (writable) config file."""

    def __init__(self, directory: str | Path, monitor: tuple[str, int], service: str, quorum: int,
                 down_after_ms: int, failover_timeout_ms: int):
        super().__init__(directory)
        self.monitor = monitor
        self.service = service
        self.settings = [
            f"sentinel monitor {service} {monitor[0]} {monitor[1]} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]

    def command(self) -> list[str]:
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {self.directory}",
            f"logfile {self.directory / 'sentinel.log'}", *self.settings, ""]))
        return [find_redis_server(), str(config), "--sentinel"]


class EmbeddedSentinelGroup:
    """A Redis Sentinel deployment on loopback ports, for tests: one primary, `replicas` replicas of
    it and three sentinels (quorum 2) watching it as `service`, failing over after
    `down_after_ms` of silence.

        group = EmbeddedSentinelGroup(tmp_path).start()   # returns once everyone sees everyone
        group.sentinel_addresses  # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3": REDIS_SENTINELS
        group.service             # "inventory": REDIS_SENTINEL_SERVICE
        group.env                 # both, as a dict of settings
        group.primary_port, group.replica_ports, group.client(port)
        old = group.kill_primary()                 # SIGKILL the current primary; its port
        new = group.wait_for_promotion(timeout)    # the port of the primary a sentinel promoted
        group.stop()                               # every process, dead or alive

    The replicas start without keyspace events (`notify-keyspace-events ""`), as a primary that
    takes over in production may: whoever needs them on the new primary must turn them on.
    """

    def __init__(self, directory: str | Path, replicas: int = 1, service: str = "inventory",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 2000):
        self.directory = Path(directory)
        self.service = service
        # diskless full syncs start at once (Redis waits 5 s by default for more replicas to come)
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.primary = EmbeddedRedis(self.directory / "primary", extra_args=fast_sync)
        self.primary_port = self.primary.port
        self.servers = {self.primary.port: self.primary}
        for i in range(replicas):
            node = EmbeddedRedis(self.directory / f"replica-{i}", extra_args=[
                *fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port), "--notify-keyspace-events", ""])
            self.servers[node.port] = node
        self.sentinels = [
            _EmbeddedSentinel(self.directory / f"sentinel-{i}", ("127.0.0.1", self.primary.port), service, 2,
                              down_after_ms, failover_timeout_ms)
            for i in range(3)
        ]

    @property
    def replica_ports(self) -> list[int]:
        return [port for port in self.servers if port != self.primary_port]

    @property
    def sentinel_addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_SENTINELS": self.sentinel_addresses, "REDIS_SENTINEL_SERVICE": self.service}

    @staticmethod
    def client(port: int):
        import redis

        return redis.Redis(port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout: float = 30.0) -> "EmbeddedSentinelGroup":
        try:
            for node in self.servers.values():
                node.start()
            deadline = time.monotonic() + timeout
            self._until(deadline, self._replicas_online, "the replicas to sync")
            for sentinel in self.sentinels:
                sentinel.start()
            # each sentinel knows the replicas and the other two (hello messages every 2 s)
            self._until(deadline, lambda: all(
                len(self.client(s.port).sentinel_slaves(self.service)) == len(self.servers) - 1
                and int(self.client(s.port).sentinel_master(self.service)["num-other-sentinels"]) == 2
                for s in self.sentinels), "the sentinels to see each other and the replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def _replicas_online(self) -> bool:
        info = self.client(self.primary_port).info("replication")
        return info["connected_slaves"] == len(self.servers) - 1 and all(
            info[f"slave{i}"]["state"] == "online" for i in range(len(self.servers) - 1))

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no goodbye to anyone); returns its port."""
        port = self.primary_port
        proc = self.servers[port].process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return port

    def wait_for_promotion(self, timeout: float = 30.0) -> int:
        """Wait until the sentinels name another primary and it answers as one; returns its port."""
        old = self.primary_port
        deadline = time.monotonic() + timeout

        def promoted() -> int | None:
            for sentinel in self.sentinels:
                addr = self.client(sentinel.port).sentinel_get_master_addr_by_name(self.service)
                if addr and int(addr[1]) != old and \
                        self.client(int(addr[1])).info("replication")["role"] == "master":
                    return int(addr[1])
            return None

        self.primary_port = self._until(deadline, promoted, "a replica to be promoted")
        return self.primary_port

    @staticmethod
    def _until(deadline: float, predicate, what: str):
        import redis

        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (redis.RedisError, OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded sentinel group: timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.servers.values():
            node.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
