"""The fast path of hold expiry: release holds as Redis announces their timer keys expired.

Pub/sub is fire-and-forget, so after every (re)connect the listener runs one sweep for what it
missed; the periodic sweeper remains the guarantee (DESIGN.md, Holds and their expiry).
"""
from __future__ import annotations

import heapq
import logging
import threading
import time

import redis as redis_lib

from app import clock, keys
from app.composition import Container

log = logging.getLogger(__name__)

BATCH = 500


def ensure_expired_events(redis) -> bool:
    """Turn on `notify-keyspace-events Ex` (keeping other flags); False where CONFIG is not allowed."""
    try:
        nodes = redis.get_primaries() if hasattr(redis, "get_primaries") else [None]
        for node in nodes:
            target = {"target_nodes": node} if node is not None else {}
            current = redis.config_get("notify-keyspace-events", **target)
            if isinstance(current, dict) and node is not None and "notify-keyspace-events" not in current:
                current = next(iter(current.values()), {})
            flags = (current or {}).get("notify-keyspace-events", "")
            if ("E" in flags and ("x" in flags or "A" in flags)):
                continue
            merged = "".join(sorted(set(flags + "Ex")))
            redis.config_set("notify-keyspace-events", merged, **target)
        return True
    except redis_lib.exceptions.ResponseError as exc:
        log.warning("cannot enable keyspace expiry events (%s): the sweeper releases lapsed holds alone", exc)
        return False


def expired_channel(redis) -> str:
    db = redis.connection_pool.connection_kwargs.get("db", 0) if hasattr(redis, "connection_pool") else 0
    return f"__keyevent@{db}__:expired"


class ExpiryListener:
    """Subscribes to expired events and releases the holds they name; reconnects with backoff."""

    def __init__(self, container: Container, stop: threading.Event | None = None,
                 max_backoff: float = 10.0):
        self.container = container
        self.engine = container.stock
        self.stop = stop or threading.Event()
        self.max_backoff = max_backoff
        self.released_holds = 0
        self.released_units = 0
        self.connected = threading.Event()
        self._not_due: list[tuple[int, int, str]] = []  # heap of (expiry ms, variant id, hold id)

    def run(self) -> None:
        backoff = 0.1
        while not self.stop.is_set():
            pubsub = None
            try:
                ensure_expired_events(self.container.redis)
                pubsub = self.container.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(expired_channel(self.container.redis))
                # Subscribed first, then sweep: nothing can lapse unseen in between.
                report = self.engine.sweep()
                if report.holds:
                    log.info("catch-up sweep released %d hold(s), %d unit(s)", report.holds, report.units)
                self.connected.set()
                backoff = 0.1
                self._loop(pubsub)
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError) as exc:
                self.connected.clear()
                log.warning("listener lost Redis (%s); reconnecting in %.1fs", type(exc).__name__, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - closing a dead connection
                        pass
        self.connected.clear()

    def _loop(self, pubsub) -> None:
        while not self.stop.is_set():
            message = pubsub.get_message(timeout=0.5)
            batch = []
            while message is not None and len(batch) < BATCH:
                if message.get("type") == "message":
                    parsed = keys.parse_hold_timer(message["data"])
                    if parsed:
                        batch.append(parsed)
                message = pubsub.get_message(timeout=0) if len(batch) < BATCH else None
            now = clock.now_ms()
            while self._not_due and self._not_due[0][0] <= now:
                _, vid, hid = heapq.heappop(self._not_due)
                batch.append((vid, hid))
            if batch:
                self.handle(batch, now)

    def handle(self, batch: list[tuple[int, str]], now: int | None = None) -> int:
        """Release the named holds; returns units released. Holds not yet due are retried at expiry."""
        results = self.engine.release_lapsed(batch, now=now)
        units = 0
        for (vid, hid), (released, not_before) in zip(batch, results):
            if released:
                units += released
                self.released_holds += 1
                log.info("released hold %s of variant %s: %d unit(s) back", hid, vid, released)
            elif not_before:
                heapq.heappush(self._not_due, (not_before, vid, hid))
        self.released_units += units
        return units


def run_forever(container: Container) -> None:
    """`inventory listen`: run until SIGINT/SIGTERM."""
    import signal

    listener = ExpiryListener(container)

    def _stop(signum, _frame):
        log.info("listener stopping (signal %s)", signum)
        listener.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("listening for expired holds on %s", expired_channel(container.redis))
    started = time.monotonic()
    listener.run()
    log.info("listener stopped after %.0fs: released %d hold(s), %d unit(s)",
             time.monotonic() - started, listener.released_holds, listener.released_units)
