"""The reservation engine: the only module that reads or changes stock in Redis (stub, being written)."""
from __future__ import annotations


class StockEngine:
    def __init__(self, redis, sessions, settings):
        self.redis, self.sessions, self.settings = redis, sessions, settings

    def ensure_scripts_loaded(self) -> None:
        self.redis.ping()

    def active_holds(self, variant_ids: list[int]) -> dict[int, int]:
        """Number of live holds per variant."""
        return {vid: int(self.redis.hlen(f"inv:holds:{{v{vid}}}")) for vid in variant_ids}

    def forget(self, variant_id: int) -> None:
        """Drop a deleted variant's counters and holds from Redis."""
