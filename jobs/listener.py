"""The fast path of hold expiry: sweep a variant as Redis announces its timer key expired.

Each variant with holds has one timer key, lapsing at its earliest hold expiry (app/keys.py,
variant_timer); the sweep releases what has lapsed and re-arms the timer for the next expiry.

Pub/sub is fire-and-forget, so after every (re)connect the listener runs one sweep for what it
missed; the periodic sweeper remains the guarantee (DESIGN.md, Holds and their expiry).
On a Redis Cluster, expired events are published by the primary that owned the key, to its own
subscribers only: the listener subscribes to every primary and follows topology changes.
With Redis Sentinel (REDIS_SENTINELS) every connection is made to the primary the sentinels name:
when its subscription fails (the primary died, or was demoted: READONLY), the listener connects
again to the primary promoted meanwhile, turns keyspace events on there (a replica that took over
may not have them), subscribes and runs its catch-up sweep.

SIGTERM or SIGINT: the listener finishes what it is doing (a sweep), stops its threads and exits 0,
quietly even when Redis went away at the same moment (Ctrl-C on `inventory run` reaches both).
"""
from __future__ import annotations

import logging
import threading
import time

import redis as redis_lib

from app import keys
from app.composition import Container
from app.engine.expiry import enable_expired_events, expired_channel, is_cluster, node_clients
from app.metrics import count_store_error, release_lag_p99_ms

log = logging.getLogger(__name__)

BATCH = 500
TOPOLOGY_CHECK_S = 5.0
# Redis deletes a lapsed timer key (and only then sends the event) when its expiry cycle samples
# it: with thousands of live holds that takes seconds. So the listener also sweeps what the due
# hints name this often.
FAST_SWEEP_S = 0.25
# While subscribed, the listener rewrites its heartbeat key this often; the key outlives a beat by a
# margin, so it is gone (the listener shows as down) within HEARTBEAT_TTL_MS of the last one.
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_MS = 10_000
# With Sentinel the primary moves: look for the promoted one at least this often while it is down.
SENTINEL_MAX_BACKOFF_S = 1.0


def _node_name(client) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"


class ExpiryListener:
    """Subscribes to expired events on every primary and releases the holds they name."""

    def __init__(self, container: Container, stop: threading.Event | None = None,
                 max_backoff: float = 10.0):
        self.container = container
        self.sweeper = container.sweeper
        self.stop = stop or threading.Event()
        self.max_backoff = max_backoff
        if getattr(getattr(container, "settings", None), "redis_sentinels", ()):
            self.max_backoff = min(max_backoff, SENTINEL_MAX_BACKOFF_S)
        self.released_holds = 0
        self.released_units = 0
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._subscribers: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._up: set[str] = set()

    # -- supervision ------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until `stop` is set: one subscriber per primary (re-checked every few seconds on a
        cluster), and the fast sweep of due hints beside them."""
        fast = threading.Thread(target=self._fast_sweeps, daemon=True, name="expiry-fast-sweep")
        fast.start()
        try:
            self._run_subscribers()
        finally:
            fast.join(5)

    def _fast_sweeps(self) -> None:
        next_beat = 0.0
        while not self.stop.wait(FAST_SWEEP_S):
            try:
                if time.monotonic() >= next_beat and self.heartbeat():
                    next_beat = time.monotonic() + HEARTBEAT_S
                report = self.sweeper.sweep_due()
            except (redis_lib.RedisError, OSError):
                if not self.stop.is_set():
                    count_store_error("redis")
                continue  # the subscribers report and retry the connection
            if report.holds:
                with self._lock:
                    self.released_holds += report.holds
                    self.released_units += report.units
                log.info("released %d lapsed hold(s), %d unit(s) from the due hints", report.holds, report.units)

    def heartbeat(self) -> bool:
        """While subscribed on every primary, (re)write the heartbeat key with this process's
        release-lag p99 (ms, "" when it released nothing lately); True when written."""
        if not self.connected.is_set():
            return False
        p99 = release_lag_p99_ms()
        self.container.runner.run([("SET", keys.listener_heartbeat(), "" if p99 is None else repr(p99),
                                    "PX", HEARTBEAT_TTL_MS)])
        return True

    def _run_subscribers(self) -> None:
        redis = self.container.redis
        if not is_cluster(redis):
            self._subscribe(redis, self.stop)
            return
        next_check = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_check:
                self._follow_topology(redis)
                next_check = time.monotonic() + TOPOLOGY_CHECK_S
            self.stop.wait(0.2)
        for _thread, stop in self._subscribers.values():
            stop.set()
        for thread, _ in self._subscribers.values():
            thread.join(5)
        self.connected.clear()

    def _follow_topology(self, redis) -> None:
        try:
            redis.nodes_manager.initialize()
            clients = {_node_name(c): c for c in node_clients(redis)}
        except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.exceptions.RedisClusterException) as exc:
            log.warning("listener cannot read the cluster topology (%s); keeping current subscriptions",
                        type(exc).__name__)
            return
        for name in list(self._subscribers):
            thread, stop = self._subscribers[name]
            if name not in clients or not thread.is_alive():
                stop.set()
                del self._subscribers[name]
                log.info("listener stops following %s (no longer a primary)", name)
        for name, client in clients.items():
            if name not in self._subscribers:
                stop = threading.Event()
                thread = threading.Thread(target=self._subscribe, args=(client, stop), daemon=True,
                                          name=f"expiry-{name}")
                self._subscribers[name] = (thread, stop)
                thread.start()
                log.info("listener follows primary %s", name)
        self._update_connected()

    def _update_connected(self) -> None:
        with self._lock:
            names = set(self._subscribers) if self._subscribers else {"single"}
            if names and names <= self._up:
                self.connected.set()
            else:
                self.connected.clear()

    # -- one server ---------------------------------------------------------------------------------

    def _subscribe(self, client, stop: threading.Event) -> None:
        name = "single" if not is_cluster(self.container.redis) else _node_name(client)
        backoff = 0.1
        lost = False
        while not stop.is_set() and not self.stop.is_set():
            pubsub = None
            try:
                enable_expired_events(client)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(expired_channel(self.container.redis))
                if lost:
                    log.info("listener subscribed again, on %s", _peer(pubsub))
                    lost = False
                # Subscribed first, then sweep: nothing can lapse unseen in between.
                report = self.sweeper.sweep()
                if report.holds:
                    log.info("catch-up sweep released %d hold(s), %d unit(s)", report.holds, report.units)
                with self._lock:
                    self._up.add(name)
                self._update_connected()
                backoff = 0.1
                self._loop(pubsub, stop)
            except (redis_lib.RedisError, OSError) as exc:
                # connection lost, cluster down or re-sharding, a failover: back off and subscribe again
                with self._lock:
                    self._up.discard(name)
                self._update_connected()
                if stop.is_set() or self.stop.is_set():
                    break  # stopping: Redis going away at the same moment is no news
                count_store_error("redis")
                lost = True
                log.warning("listener lost Redis %s (%s); reconnecting in %.1fs", name, type(exc).__name__,
                            backoff)
                self._pause(stop, backoff)
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - closing a dead connection
                        pass
        with self._lock:
            self._up.discard(name)
        self._update_connected()

    def _pause(self, stop: threading.Event, seconds: float) -> None:
        """Wait `seconds`, or less when this subscriber or the whole listener is told to stop."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, 0.1))

    def _loop(self, pubsub, stop: threading.Event) -> None:
        while not stop.is_set() and not self.stop.is_set():
            message = pubsub.get_message(timeout=0.5)
            batch: list[int] = []
            while message is not None and len(batch) < BATCH:
                if message.get("type") == "message":
                    vid = keys.parse_variant_timer(message["data"])
                    if vid is not None:
                        batch.append(vid)
                message = pubsub.get_message(timeout=0) if len(batch) < BATCH else None
            if batch:
                self.handle(batch)

    def handle(self, variant_ids: list[int], now: int | None = None) -> int:
        """Sweep the variants whose timers lapsed; returns units released. A timer that fired a little
        before this process's clock reached the expiry is re-armed by the sweep (at least 10 ms on),
        so its hold is released on the next event."""
        report = self.sweeper.sweep_variants(variant_ids, now=now)
        if report.holds:
            log.info("released %d lapsed hold(s) of %d variant(s): %d unit(s) back", report.holds,
                     len(set(variant_ids)), report.units)
        with self._lock:
            self.released_holds += report.holds
            self.released_units += report.units
        return report.units


def _peer(pubsub) -> str:
    """host:port of the server a subscription is connected to."""
    conn = getattr(pubsub, "connection", None)
    return f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"


def run_forever(container: Container) -> None:
    """`inventory listen`: run until SIGINT/SIGTERM."""
    import signal

    listener = ExpiryListener(container)

    def _stop(signum, _frame):
        if not listener.stop.is_set():  # `make run` may deliver a Ctrl-C twice
            log.info("listener stopping (%s)", signal.Signals(signum).name)
        listener.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("listening for expired holds on %s", expired_channel(container.redis))
    started = time.monotonic()
    listener.run()
    try:  # shown as down at once rather than when the heartbeat lapses (another listener rewrites it)
        container.runner.run([("DEL", keys.listener_heartbeat())])
    except (redis_lib.RedisError, OSError):
        pass
    log.info("listener stopped after %.0fs: released %d hold(s), %d unit(s)",
             time.monotonic() - started, listener.released_holds, listener.released_units)
