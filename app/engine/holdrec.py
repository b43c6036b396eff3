"""Hold ids and the hold record: the one place that knows their formats.

A hold id is `<variant_id>~<user>`: one hold (and one cart line) per customer and variant, so a
second add merges into it. A hold record is one field of the variant's holds hash, written by the
Lua scripts (lua/includes/holds.lua packs and unpacks it):

    qty|exp_ms|state|user|gen|token|lock_ms

- qty: units held; exp_ms: when the hold lapses (ms since the epoch);
- state: "h" held, "l" locked by a checkout;
- user: the customer; gen: random per fresh hold, so a line or a lock can tell this hold from an
  earlier one under the same id;
- token: the checkout holding the lock ("" when held); lock_ms: when it was locked (0 when held).
"""
from __future__ import annotations

import os
import random
from typing import NamedTuple

HOLD_SEP = "~"

_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)  # a forked child must not repeat its parent's numbers


def new_gen() -> str:
    """A fresh hold's generation: random, to tell a hold from an earlier one under the same id
    (not a secret; seeded from os.urandom per process, so no system call per reserve)."""
    return "%08x" % _rng.getrandbits(32)


def hold_id_for(variant_id: int, user_id: str) -> str:
    """The id of a customer's hold (and cart line) of a variant."""
    return f"{int(variant_id)}{HOLD_SEP}{user_id}"


def parse_hold_id(hold_id: str) -> tuple[int, str] | None:
    """(variant_id, user_id) of a hold id, or None if it is not one."""
    vid, sep, user = hold_id.partition(HOLD_SEP)
    if not sep or not vid.isdigit() or not user or len(vid) > 10:
        return None
    return int(vid), user


class HoldView(NamedTuple):
    """One hold record, parsed."""

    quantity: int
    expires_ms: int
    state: str  # "held" | "locked"
    user: str
    gen: str
    token: str
    locked_ms: int


def unpack_hold(raw: str | None) -> HoldView | None:
    """The hold of a record as the scripts write it; None for no record (or not one)."""
    if not raw:
        return None
    parts = raw.split("|")
    if len(parts) != 7:
        return None
    qty, exp, state, user, gen, token, lockms = parts
    return HoldView(int(qty), int(exp), "locked" if state == "l" else "held", user, gen, token, int(lockms or 0))
