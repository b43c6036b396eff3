"""The composition root: the app, the command line and the jobs build their parts here."""
from __future__ import annotations

import logging
from dataclasses import dataclass
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

    # -- the engine (app/engine/): Redis only, rows from the repository ---------------------------

    @cached_property
    def runner(self):
        """The one path to the Lua scripts (app.engine.runner.ScriptRunner)."""
        from app.engine.runner import ScriptRunner

        return ScriptRunner(self.redis)

    @cached_property
    def stock_repository(self):
        """What the engine reads from the database (persistence.repository.StockRepository)."""
        from persistence.repository import StockRepository

        return StockRepository(self.sessions)

    @cached_property
    def holds(self):
        """The hold lifecycle and live counters (app.engine.holds.Holds)."""
        from app.engine.holds import Holds

        return Holds(self.runner, self.stock_repository, self.settings)

    @cached_property
    def cart_store(self):
        """Every read and write of a cart (app.engine.carts.CartStore)."""
        from app.engine.carts import CartStore

        return CartStore(self.runner, self.holds)

    @cached_property
    def sweeper(self):
        """Lapsed holds back to stock (app.engine.expiry.Sweeper)."""
        from app.engine.expiry import Sweeper

        return Sweeper(self.runner, self.holds)

    @cached_property
    def reconciler(self):
        """Live counters against the database (app.engine.reconcile.Reconciler)."""
        from app.engine.reconcile import Reconciler

        return Reconciler(self.runner, self.holds, self.cart_store, self.stock_repository, self.settings)

    # -- the services (app/services/): each built here, once, from the parts above ---------------

    @cached_property
    def catalog(self):
        """Categories, products and variants (app.services.catalog.CatalogService)."""
        from app.services.catalog import CatalogService

        return CatalogService(self.sessions, self.holds, self.redis)

    @cached_property
    def pricing(self):
        """Rules CRUD and the price of a line (app.services.pricing.PricingService)."""
        from app.services.pricing import PricingService

        return PricingService(self.sessions, self.redis, self.settings)

    @cached_property
    def cart(self):
        """Add, read, change and remove cart lines (app.services.cart.CartService)."""
        from app.services.cart import CartService

        return CartService(self.holds, self.cart_store, self.pricing, self.settings)

    @cached_property
    def bundle(self):
        """Several lines added all or nothing (app.services.bundle.BundleService, on
        app.engine.bundles.Bundles)."""
        from app.engine.bundles import Bundles
        from app.services.bundle import BundleService

        return BundleService(Bundles(self.runner, self.holds, self.settings), self.cart_store, self.pricing,
                             self.settings)

    @cached_property
    def checkout(self):
        """Carts into orders, and the orders (app.services.checkout.CheckoutService)."""
        from app.services.checkout import CheckoutService

        return CheckoutService(self.sessions, self.holds, self.cart_store, self.cart, self.settings)

    @cached_property
    def idempotency(self):
        """Requests sent with an Idempotency-Key run once (app.services.idempotency.Idempotency)."""
        from app.services.idempotency import Idempotency

        return Idempotency(self.redis)

    @cached_property
    def inventory(self):
        """Stock rows and adjustments (app.services.inventory.InventoryService)."""
        from app.services.inventory import InventoryService

        return InventoryService(self.sessions, self.holds)

    @cached_property
    def ops(self):
        """The live stock summary and the gauges of /metrics (app.services.ops.OpsService)."""
        import socket

        from app.metrics import counter_totals
        from app.services.ops import OpsService

        # the rates come from this host's processes, so each host keeps its own rate samples
        return OpsService(self.runner, self.stock_repository, self.settings, counter_totals,
                          source=socket.gethostname())

    def close(self) -> None:
        if "runner" in self.__dict__:
            self.runner.close()
        if "db" in self.__dict__:
            self.db.dispose()
        if "redis" in self.__dict__:
            try:
                self.redis.close()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass


def build_container(settings: Settings | None = None) -> Container:
    return Container(settings or load_settings())
