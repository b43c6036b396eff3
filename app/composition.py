"""The composition root: the app, the command line and the jobs build their parts here."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings, load_settings
from persistence.db import make_engine, make_session_factory

log = logging.getLogger(__name__)


@dataclass
class Container:
    """Everything a service function needs, built once per process."""

    settings: Settings
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def db(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.db)

    @cached_property
    def redis(self):
        from app.redis_client import make_redis

        return make_redis(self.settings)

    @cached_property
    def stock(self):
        """The reservation engine (app.stock.StockEngine): the only code that touches stock in Redis."""
        from app.stock import StockEngine

        return StockEngine(self.redis, self.sessions, self.settings)

    @cached_property
    def pricing(self):
        """Rules CRUD and the price of a line (app.services.pricing.PricingService)."""
        from app.services.pricing import PricingService

        return PricingService(self.sessions, self.redis, self.settings)

    def close(self) -> None:
        if "stock" in self.__dict__:
            self.stock.close()
        if "db" in self.__dict__:
            self.db.dispose()
        if "redis" in self.__dict__:
            try:
                self.redis.close()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass


def build_container(settings: Settings | None = None) -> Container:
    return Container(settings or load_settings())
