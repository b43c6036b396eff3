"""The cart store: the one owner of cart lines in Redis (their format, reads and writes).

A cart is a hash `cart:{u<user>}`: field = the line's item id, which is its hold's id
(app/engine/holdrec.py), value = `qty|unit_price|expires_ms|gen|tier` (see `Line.dumps`). A line is
a snapshot of its hold when it was written (quantity, expiry, generation) and of the unit price;
whether it is still held is read from the hold. Carts carry the user's hash tag, so a cart and a
variant's stock never share a script: the hold is taken first and the line written second (a crash
in between leaves a hold with no line, which simply lapses).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterator, Sequence

from app import clock, keys
from app.engine.holdrec import HoldView, parse_hold_id, unpack_hold
from app.engine.expiry import is_cluster, node_clients
from app.engine.holds import Holds, Reservation, hold_reads
from app.engine.recent import RecentLines
from app.engine.runner import Script, ScriptRunner
from app.money import money

log = logging.getLogger(__name__)


@dataclass
class Line:
    """A cart line as stored (see dumps); `sku` comes from the catalog, not from the store."""

    item_id: str
    variant_id: int
    sku: str
    quantity: int
    unit_price: Decimal
    expires_ms: int
    gen: str
    tier: str | None = None

    def dumps(self) -> str:
        """`qty|unit_price|expires_ms|gen|tier`: short enough (<= 64 bytes) that Redis keeps a cart
        as a compact listpack; the variant id is in the item id and the sku in the catalog cache."""
        return f"{self.quantity}|{money(self.unit_price)}|{self.expires_ms}|{self.gen}|{self.tier or ''}"

    @classmethod
    def loads(cls, item_id: str, raw: str) -> "Line":
        parsed = parse_hold_id(item_id)
        if parsed is None:
            raise ValueError(f"not a cart item id: {item_id!r}")
        quantity, price, expires, gen, tier = raw.split("|")
        return cls(item_id, parsed[0], "", int(quantity), Decimal(price), int(expires), gen, tier or None)

    def is_live(self, hold: HoldView | None, now: int) -> bool:
        """Whether the line's own hold (same generation) still holds it at `now`."""
        return hold is not None and hold.gen == self.gen and hold.expires_ms > now

    def is_behind(self, hold: HoldView | None) -> bool:
        """The line's hold lives on but holds another quantity or expiry than the line says."""
        return (hold is not None and hold.gen == self.gen
                and (hold.quantity != self.quantity or hold.expires_ms != self.expires_ms))


def _lines(raw: dict) -> list[Line]:
    return [Line.loads(item_id, body) for item_id, body in raw.items()]


class CartStore:
    """Reads and writes of carts, alone or beside a hold's reserve or reads."""

    def __init__(self, runner: ScriptRunner, holds: Holds):
        self.runner = runner
        self.holds = holds
        # the lines written lately, written back after a failover that lost them with their holds
        self.recent = RecentLines()

    def _remember(self, user: str, lines: Sequence[Line], now: int) -> None:
        """After a write: remember the lines; first, if a call met an outage since, write back the
        lines a failover lost together with their holds (app/engine/recent.py)."""
        recent = self.recent
        if recent.outage_since is not None:
            try:
                recent.restore(self.runner, now)
            except Exception:  # noqa: BLE001 - still failing: kept for the next write
                log.warning("could not yet check the cart lines written before the Redis outage")
        for line in lines:
            recent.wrote(user, line, now)

    def lines(self, user: str) -> list[Line]:
        """Every line of a customer's cart (without skus)."""
        return _lines(self.runner.run([("HGETALL", keys.cart(user))])[0])

    def find(self, item_id: str) -> tuple[str, Line] | None:
        """(user, line) of an item id; None when it is not one or no cart has it."""
        parsed = parse_hold_id(item_id)
        if parsed is None:
            return None
        user = parsed[1]
        raw = self.runner.run([("HGET", keys.cart(user), item_id)])[0]
        return (user, Line.loads(item_id, raw)) if raw is not None else None

    def snapshot(self, user: str, variant_id: int, item_id: str) -> tuple[HoldView | None, object, list[Line]]:
        """In one round trip: the hold of `item_id`, the raw catalog version and the cart's lines."""
        raw_version, raw_cart, raw_hold = self.runner.run([
            ("GET", keys.catalog_version()), ("HGETALL", keys.cart(user)), *hold_reads([(variant_id, item_id)])])
        return unpack_hold(raw_hold), raw_version, _lines(raw_cart)

    def reserve_with_line(self, variant_id: int, user: str, quantity: int, now: int,
                          line: Line | None) -> tuple[Reservation, object, list[Line], bool]:
        """The add-to-cart round trip: reserve, read the raw catalog version and the cart, and
        write `line` where the cart has none for its item yet (HSETNX), all in one round trip.
        Returns (reservation, raw version, the cart's lines as read before the write, whether
        `line` was written). The caller decides whether the written line stands (see CartService)."""
        beside = [("GET", keys.catalog_version()), ("HGETALL", keys.cart(user))]
        if line is not None:
            beside.append(("HSETNX", keys.cart(user), line.item_id, line.dumps()))
        reservation = self.holds.reserve(variant_id, user, quantity, mode="add", now=now,
                                         gen=line.gen if line is not None else None, beside=beside)
        raw_version, raw_cart, *wrote = reservation.beside
        written = bool(wrote and wrote[0])
        if written:
            self._remember(user, (line,), now)
        return reservation, raw_version, _lines(raw_cart), written

    def write(self, user: str, line: Line, pairs: Sequence[tuple[int, str]] = ()) -> list[HoldView | None]:
        """Write a line, and read the holds of (variant_id, hold_id) `pairs` in the same round trip."""
        replies = self.runner.run([("HSET", keys.cart(user), line.item_id, line.dumps()), *hold_reads(pairs)])
        self._remember(user, (line,), clock.now_ms())
        return [unpack_hold(r) for r in replies[1:]]

    def snapshot_many(self, user: str, pairs: Sequence[tuple[int, str]]) -> tuple[list[HoldView | None], object,
                                                                                 list[Line]]:
        """In one round trip: the holds of (variant_id, hold_id) `pairs`, the raw catalog version
        and the cart's lines (a bundle's checks)."""
        raw_version, raw_cart, *raw_holds = self.runner.run([
            ("GET", keys.catalog_version()), ("HGETALL", keys.cart(user)), *hold_reads(pairs)])
        return [unpack_hold(r) for r in raw_holds], raw_version, _lines(raw_cart)

    def write_many(self, user: str, lines: Sequence[Line],
                   pairs: Sequence[tuple[int, str]] = ()) -> list[HoldView | None]:
        """Write several lines of one cart, and read the holds of `pairs`, in one round trip."""
        fields = [x for line in lines for x in (line.item_id, line.dumps())]
        replies = self.runner.run([("HSET", keys.cart(user), *fields), *hold_reads(pairs)])
        self._remember(user, lines, clock.now_ms())
        return [unpack_hold(r) for r in replies[1:]]

    def remove(self, user: str, item_id: str) -> None:
        self.runner.run([("HDEL", keys.cart(user), item_id)])

    def drop_lines(self, lines: Sequence[tuple[str, str, str]]) -> int:
        """Remove (user, item id, gen) lines of finalized or refused holds; a newer line under the
        same item id (another generation) is kept. Returns the lines removed."""
        by_user: dict[str, list] = {}
        for user, item_id, gen in lines:
            by_user.setdefault(user, []).extend([item_id, gen])
        calls = [Script("dropCartLines", [keys.cart(user)], args) for user, args in by_user.items()]
        return sum(int(n) for n in self.runner.run(calls))

    def scan_lines(self, batch: int = 500) -> Iterator[list[tuple[Line, str]]]:
        """Every cart line as (line, its stored text), a batch of carts at a time: SCAN over the cart
        keys of every primary (each node of a cluster), each batch's carts read in one round trip."""
        pattern = keys.cart("*")
        redis = self.runner.redis
        if is_cluster(redis):  # the primaries as the cluster has them now (a failover moves them)
            redis.nodes_manager.initialize()
        for node in node_clients(redis):
            found: list[str] = []
            for key in node.scan_iter(match=pattern, count=batch):
                found.append(key.decode() if isinstance(key, bytes) else key)
                if len(found) >= batch:
                    yield self._read_carts(found)
                    found = []
            if found:
                yield self._read_carts(found)

    def _read_carts(self, cart_keys: list[str]) -> list[tuple[Line, str]]:
        out = []
        for raw in self.runner.run([("HGETALL", key) for key in cart_keys]):
            for item_id, body in raw.items():
                if parse_hold_id(item_id) is not None:
                    out.append((Line.loads(item_id, body), body))
        return out

    def raw_lines(self, items: Sequence[str]) -> list[str | None]:
        """The stored text of these item ids' lines (None where gone), in one round trip."""
        return self.runner.run([("HGET", keys.cart(parse_hold_id(i)[1]), i) for i in items])

    def mark_lost(self, lines: Sequence[tuple[Line, str]]) -> list[str]:
        """Rewrite each (line, its text as read) with expiry 0, only where the line is unchanged;
        returns the item ids marked (a line whose hold was lost then shows as lapsed)."""
        by_user: dict[str, list] = {}
        for line, raw in lines:
            fields = raw.split("|")
            fields[2] = "0"  # qty|unit_price|expires_ms|gen|tier
            by_user.setdefault(parse_hold_id(line.item_id)[1], []).extend([line.item_id, raw, "|".join(fields)])
        calls = [Script("markLostLines", [keys.cart(user)], args) for user, args in by_user.items()]
        return [item for marked in self.runner.run(calls) for item in marked]
