"""The catalog service: products, categories and variants in the database.

Every write runs in `_write` (never a bare `sessions.begin()`): it owns the transaction, so a request
that fails changes nothing, and after the commit it marks the catalog as changed
(`app.catalog_cache.write` bumps the version) so no process keeps pricing or selling from a stale
copy; deleting variants drops their counters from Redis.

A row a write refers to (a product's category, a category's parent, a variant's product) is checked
before the write, but another transaction may delete it between the check and the commit; the
database's foreign key then refuses the write, and `_write` answers 404 for the missing row, as the
check would have, instead of letting the IntegrityError become a 500.

Collaborators are passed in: `sessions` (a session factory), `redis` (only for the catalog version)
and `stock` (the reservation engine: `active_holds(ids) -> {id: count}` and `forget(id)`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from app import catalog_cache
from app.errors import Conflict, DuplicateSku, NotFound, ProductHasActiveHolds, ValidationFailed
from persistence.models import Category, Product, Stock, StockMovement, Variant


class VariantHasActiveHolds(Conflict):
    """Deleting a variant that customers hold in their carts would strand those holds."""

    code = "variant_has_active_holds"


class StockHolds(Protocol):
    def active_holds(self, variant_ids: list[int]) -> dict[int, int]: ...

    def forget(self, variant_id: int) -> None: ...


@dataclass(frozen=True)
class Page:
    """One page of a list, shaped like the list envelope of API.md."""

    items: list
    page: int
    per_page: int
    total: int


def _paginate(session: Session, query, page: int, per_page: int) -> Page:
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    items = list(session.scalars(query.limit(per_page).offset((page - 1) * per_page)))
    return Page(items, page, per_page, int(total or 0))


def _get(session: Session, model, ident: int, what: str, **options):
    row = session.get(model, ident, **options)
    if row is None:
        raise NotFound(what, ident)
    return row


def _require(session: Session, model, ident: int | None, what: str) -> None:
    """A body field naming a row that does not exist is 404 (API.md)."""
    if ident is not None and session.get(model, ident) is None:
        raise NotFound(what, ident)


# Body fields naming another row: field -> (model, what a 404 calls it).
_REFERENCES = {"category_id": (Category, "category"), "parent_id": (Category, "category"),
               "product_id": (Product, "product")}


def _explain(sessions: sessionmaker[Session], data: dict[str, Any], target: tuple | None,
             exc: Exception) -> Exception:
    """A concurrent writer beat our checks: name the fact that was violated, as the check would have.

    target is (model, id, what) of the row being changed, or None for a create.
    """
    with sessions() as s:
        if "sku" in data:
            try:
                _check_sku_free(s, data["sku"], target[1] if target else None)
            except DuplicateSku as dup:
                return dup
        if target is not None and s.get(target[0], target[1]) is None:
            return NotFound(target[2], target[1])
        for name, (model, what) in _REFERENCES.items():
            ident = data.get(name)
            if ident is not None and s.get(model, ident) is None:
                return NotFound(what, ident)
    return exc


@contextmanager
def _write(sessions: sessionmaker[Session], redis, data: dict[str, Any] | None = None,
           target: tuple | None = None) -> Iterator[Session]:
    """The transaction of every catalog write: commits, then bumps the catalog version
    (catalog_cache.write); a refusal by the database that a concurrent writer caused (a row we
    checked was deleted meanwhile, a SKU taken) becomes the 404/409 our own checks give.

    data: the fields written (their references are what gets re-checked); target: (model, id,
    what) of the row being changed, None for a create.
    """
    try:
        with catalog_cache.write(sessions, redis) as session:
            yield session
    except (IntegrityError, StaleDataError) as exc:
        raise _explain(sessions, data or {}, target, exc) from exc


def _apply(row, data: dict[str, Any]) -> None:
    for name, value in data.items():
        setattr(row, name, value)


# --- categories -----------------------------------------------------------------------------

def list_categories(sessions: sessionmaker[Session], *, page: int = 1, per_page: int = 50) -> Page:
    """Categories by id."""
    with sessions() as s:
        return _paginate(s, select(Category).order_by(Category.id), page, per_page)


def get_category(sessions: sessionmaker[Session], category_id: int) -> Category:
    """One category. Raises NotFound."""
    with sessions() as s:
        return _get(s, Category, category_id, "category")


def _check_parent(session: Session, category_id: int | None, parent_id: int | None) -> None:
    if parent_id is None:
        return
    _require(session, Category, parent_id, "category")
    if category_id is None:
        return
    seen: set[int] = set()
    current: int | None = parent_id
    while current is not None and current not in seen:
        if current == category_id:
            raise ValidationFailed("A category cannot be its own ancestor",
                                   {"parent_id": ["A category cannot be its own ancestor."]})
        seen.add(current)
        current = session.scalar(select(Category.parent_id).where(Category.id == current))


def create_category(sessions: sessionmaker[Session], data: dict[str, Any], *, redis) -> Category:
    """A new category. Raises NotFound for an unknown parent (also one deleted meanwhile)."""
    with _write(sessions, redis, data) as s:
        _check_parent(s, None, data.get("parent_id"))
        category = Category(**data)
        s.add(category)
    return category


def update_category(sessions: sessionmaker[Session], category_id: int, data: dict[str, Any], *,
                    redis) -> Category:
    """Replace a category's fields. Raises NotFound, or ValidationFailed for a cycle."""
    with _write(sessions, redis, data, (Category, category_id, "category")) as s:
        category = _get(s, Category, category_id, "category")
        if "parent_id" in data:
            _check_parent(s, category_id, data["parent_id"])
        _apply(category, data)
    return category


def delete_category(sessions: sessionmaker[Session], category_id: int, *, redis) -> None:
    """Delete a category; its children become top-level and its products uncategorised (FK SET NULL)."""
    with _write(sessions, redis) as s:
        s.delete(_get(s, Category, category_id, "category"))


# --- products -------------------------------------------------------------------------------

def list_products(sessions: sessionmaker[Session], *, page: int = 1, per_page: int = 50,
                  category_id: int | None = None, status: str | None = None) -> Page:
    """Products by id, optionally only those directly in one category or with one status."""
    query = select(Product).order_by(Product.id)
    if category_id is not None:
        query = query.where(Product.category_id == category_id)
    if status is not None:
        query = query.where(Product.status == status)
    with sessions() as s:
        return _paginate(s, query, page, per_page)


def _product_with_variants(session: Session, product_id: int) -> Product:
    return _get(session, Product, product_id, "product", options=[selectinload(Product.variants)])


def get_product(sessions: sessionmaker[Session], product_id: int) -> Product:
    """One product with its variants. Raises NotFound."""
    with sessions() as s:
        return _product_with_variants(s, product_id)


def create_product(sessions: sessionmaker[Session], data: dict[str, Any], *, redis) -> Product:
    """A new product (no variants yet). Raises NotFound for an unknown category (also one deleted
    meanwhile)."""
    with _write(sessions, redis, data) as s:
        _require(s, Category, data.get("category_id"), "category")
        product = Product(**data, variants=[])
        s.add(product)
    return product


def update_product(sessions: sessionmaker[Session], product_id: int, data: dict[str, Any], *,
                   redis) -> Product:
    """Change the given fields of a product. Raises NotFound (product or category).

    An empty PATCH changes nothing: it answers the product as it is and keeps every cache.
    """
    if not data:
        return get_product(sessions, product_id)
    with _write(sessions, redis, data, (Product, product_id, "product")) as s:
        product = _product_with_variants(s, product_id)
        if "category_id" in data:
            _require(s, Category, data["category_id"], "category")
        _apply(product, data)
        s.flush()
        s.refresh(product, ["updated_at"])
    return product


def _refuse_if_held(stock: StockHolds, variant_ids: list[int], error: type[Conflict], what: str) -> None:
    if not variant_ids:
        return
    held = {vid: n for vid, n in stock.active_holds(variant_ids).items() if n > 0}
    if held:
        raise error(f"{what} has active holds; wait until they lapse or are checked out",
                    {"active_holds": {str(vid): n for vid, n in sorted(held.items())}})


def _forget(stock: StockHolds, variant_ids: Iterable[int]) -> None:
    for vid in variant_ids:
        stock.forget(vid)


def delete_product(sessions: sessionmaker[Session], stock: StockHolds, product_id: int, *,
                   redis) -> None:
    """Delete a product and its variants (stock rows go with them; the ledger and orders stay).

    Raises NotFound, or ProductHasActiveHolds while any of its variants is held in a cart.
    """
    with _write(sessions, redis) as s:
        product = _get(s, Product, product_id, "product")
        variant_ids = list(s.scalars(select(Variant.id).where(Variant.product_id == product_id)))
        _refuse_if_held(stock, variant_ids, ProductHasActiveHolds, f"Product {product_id}")
        s.delete(product)
    _forget(stock, variant_ids)


# --- variants -------------------------------------------------------------------------------

def list_variants(sessions: sessionmaker[Session], *, page: int = 1, per_page: int = 50,
                  product_id: int | None = None) -> Page:
    """Variants by id, optionally of one product."""
    query = select(Variant).order_by(Variant.id)
    if product_id is not None:
        query = query.where(Variant.product_id == product_id)
    with sessions() as s:
        return _paginate(s, query, page, per_page)


def get_variant(sessions: sessionmaker[Session], variant_id: int) -> Variant:
    """One variant. Raises NotFound."""
    with sessions() as s:
        return _get(s, Variant, variant_id, "variant")


def _check_sku_free(session: Session, sku: str, variant_id: int | None = None) -> None:
    query = select(Variant.id).where(Variant.sku == sku)
    if variant_id is not None:
        query = query.where(Variant.id != variant_id)
    if session.scalar(query) is not None:
        raise DuplicateSku(f"SKU {sku} is already taken", {"sku": sku})


def create_variant(sessions: sessionmaker[Session], data: dict[str, Any], *, actor: str = "",
                   redis) -> Variant:
    """A new variant with its stock row; initial stock is written to the ledger.

    Raises NotFound for an unknown product (also one deleted meanwhile), DuplicateSku when the SKU
    is taken.
    """
    data = dict(data)
    on_hand = int(data.pop("on_hand", 0))
    with _write(sessions, redis, data) as s:
        _require(s, Product, data["product_id"], "product")
        _check_sku_free(s, data["sku"])
        variant = Variant(**data)
        variant.stock = Stock(on_hand=on_hand, version=0)
        s.add(variant)
        s.flush()
        if on_hand > 0:
            s.add(StockMovement(variant_id=variant.id, kind="initial", delta=on_hand,
                                on_hand_after=on_hand, reason="initial stock", actor=actor[:64]))
    return variant


def update_variant(sessions: sessionmaker[Session], variant_id: int, data: dict[str, Any], *,
                   redis) -> Variant:
    """Change the given fields of a variant (never its stock).

    Raises NotFound (variant or product), DuplicateSku when the new SKU is taken.
    An empty PATCH changes nothing: it answers the variant as it is and keeps every cache.
    """
    if not data:
        return get_variant(sessions, variant_id)
    with _write(sessions, redis, data, (Variant, variant_id, "variant")) as s:
        variant = _get(s, Variant, variant_id, "variant")
        if "product_id" in data:
            _require(s, Product, data["product_id"], "product")
        if "sku" in data:
            _check_sku_free(s, data["sku"], variant_id)
        _apply(variant, data)
        s.flush()
        s.refresh(variant, ["updated_at"])
    return variant


def delete_variant(sessions: sessionmaker[Session], stock: StockHolds, variant_id: int, *,
                   redis) -> None:
    """Delete a variant and its stock row (the ledger and orders stay).

    Raises NotFound, or VariantHasActiveHolds while it is held in a cart.
    """
    with _write(sessions, redis) as s:
        variant = _get(s, Variant, variant_id, "variant")
        _refuse_if_held(stock, [variant_id], VariantHasActiveHolds, f"Variant {variant_id}")
        s.delete(variant)
    _forget(stock, [variant_id])


class CatalogService:
    """The catalog functions above with the parts they need bound: what the container builds and the
    API calls (the functions stay, each taking its parts, for tests and the seed)."""

    def __init__(self, sessions: sessionmaker[Session], holds: StockHolds, redis):
        self.sessions, self.holds, self.redis = sessions, holds, redis

    def list_categories(self, **args) -> Page:
        return list_categories(self.sessions, **args)

    def get_category(self, category_id: int) -> Category:
        return get_category(self.sessions, category_id)

    def create_category(self, data: dict[str, Any]) -> Category:
        return create_category(self.sessions, data, redis=self.redis)

    def update_category(self, category_id: int, data: dict[str, Any]) -> Category:
        return update_category(self.sessions, category_id, data, redis=self.redis)

    def delete_category(self, category_id: int) -> None:
        delete_category(self.sessions, category_id, redis=self.redis)

    def list_products(self, **args) -> Page:
        return list_products(self.sessions, **args)

    def get_product(self, product_id: int) -> Product:
        return get_product(self.sessions, product_id)

    def create_product(self, data: dict[str, Any]) -> Product:
        return create_product(self.sessions, data, redis=self.redis)

    def update_product(self, product_id: int, data: dict[str, Any]) -> Product:
        return update_product(self.sessions, product_id, data, redis=self.redis)

    def delete_product(self, product_id: int) -> None:
        delete_product(self.sessions, self.holds, product_id, redis=self.redis)

    def list_variants(self, **args) -> Page:
        return list_variants(self.sessions, **args)

    def get_variant(self, variant_id: int) -> Variant:
        return get_variant(self.sessions, variant_id)

    def create_variant(self, data: dict[str, Any], *, actor: str = "") -> Variant:
        return create_variant(self.sessions, data, actor=actor, redis=self.redis)

    def update_variant(self, variant_id: int, data: dict[str, Any]) -> Variant:
        return update_variant(self.sessions, variant_id, data, redis=self.redis)

    def delete_variant(self, variant_id: int) -> None:
        delete_variant(self.sessions, self.holds, variant_id, redis=self.redis)
