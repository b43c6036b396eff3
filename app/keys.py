"""Every Redis key name of the service is built here, and nowhere else.

Per-variant keys share the hash tag ``{v<id>}`` so one script can touch all of them and the
layout works unchanged on Redis Cluster; a cart carries its user's tag ``{u<id>}``.
"""
from __future__ import annotations

PREFIX = "inv:"


def variant_tag(variant_id: int) -> str:
    return f"{{v{int(variant_id)}}}"


def stock(variant_id: int) -> str:
    """Hash: available, reserved, version; adj_pending, adj_since (an adjustment half-way);
    mm_version, mm_local, mm_since (a version mismatch the reconciler is waiting out); idx_exp (the
    expiry the sweep index holds for the variant)."""
    return f"{PREFIX}stock:{variant_tag(variant_id)}"


def holds(variant_id: int) -> str:
    """Hash: hold id -> hold record (the format: app/engine/holdrec.py)."""
    return f"{PREFIX}holds:{variant_tag(variant_id)}"


def hold_expiry(variant_id: int) -> str:
    """Sorted set: hold id scored by its expiry time in ms."""
    return f"{PREFIX}hexp:{variant_tag(variant_id)}"


def customer_units(variant_id: int) -> str:
    """Hash: user id -> units held plus ordered (MAX_UNITS_PER_CUSTOMER)."""
    return f"{PREFIX}cust:{variant_tag(variant_id)}"


TIMER_PREFIX = f"{PREFIX}ht:"


def variant_timer(variant_id: int) -> str:
    """String whose TTL lapses at the variant's earliest hold expiry; it exists only to raise the
    keyspace `expired` event, on which the listener sweeps the variant (one timer per variant with
    holds, not one per hold: a key less to write per reservation, and few keys with a TTL, so Redis's
    sampled expiry finds the lapsed ones quickly)."""
    return f"{TIMER_PREFIX}{variant_tag(variant_id)}"


def parse_variant_timer(key: str) -> int | None:
    """The variant id of a timer key name, or None if it is not one."""
    if not key.startswith(TIMER_PREFIX + "{v") or not key.endswith("}"):
        return None
    vid = key[len(TIMER_PREFIX) + 2:-1]
    return int(vid) if vid.isdigit() and len(vid) <= 12 else None


SLOTS = 16384
_slot_tags: list[str] | None = None


def _tags() -> list[str]:
    """For every cluster hash slot, a short tag that hashes to it (computed once per process, ~0.1 s)."""
    global _slot_tags
    if _slot_tags is None:
        import binascii

        tags: list[str | None] = [None] * SLOTS
        left, i = SLOTS, 0
        while left:
            raw = b"%x" % i
            slot = binascii.crc_hqx(raw, 0) & (SLOTS - 1)
            if tags[slot] is None:
                tags[slot] = raw.decode()
                left -= 1
            i += 1
        _slot_tags = tags  # type: ignore[assignment]
    return _slot_tags  # type: ignore[return-value]


def variant_slot(variant_id: int) -> int:
    import binascii

    return binascii.crc_hqx(f"v{int(variant_id)}".encode(), 0) & (SLOTS - 1)


def sweep_index(variant_id: int) -> str:
    """Sorted set of the variants with holds in one hash slot, scored by their earliest expiry.

    It lives in the variant's own slot (its tag hashes there), so the reserve, sweep and reconcile
    scripts keep it exact inside their one atomic step, on a single Redis and on a cluster alike.
    """
    return sweep_index_of_slot(variant_slot(variant_id))


def sweep_index_of_slot(slot: int) -> str:
    return f"{PREFIX}sweep:{{{_tags()[slot]}}}"


DUE_SHARDS = 16


def due_hint(variant_id: int) -> str:
    """Sorted set: variant ids scored by a hold's expiry, written beside each reserve (a hint, not
    exact) so the listener finds lapsing holds in a few cheap reads; sharded so no one key (or
    cluster node) takes every reserve. What a lost hint misses, the sweeper's exact indexes find."""
    return f"{PREFIX}due:{{d{int(variant_id) % DUE_SHARDS}}}"


def due_hints() -> list[str]:
    return [f"{PREFIX}due:{{d{shard}}}" for shard in range(DUE_SHARDS)]


def sweep_indexes() -> list[str]:
    """Every slot's sweep index: the sweeper reads them all (16,384 cheap reads, pipelined)."""
    return [sweep_index_of_slot(slot) for slot in range(SLOTS)]


def bundle_journal(slot: int, bundle_id: str) -> str:
    """Hash: what a bundle reserved in one hash slot, hold id -> `gen|added|target|exp|prev_qty|prev_exp`
    (lua/reserveBundle-0.lua writes it beside the reserves and lapses it with the holds); it lives
    in that slot, so the bundle's undo, or a retry of it, gives back exactly what it took there."""
    return f"{PREFIX}bundle:{{{_tags()[slot]}}}:{bundle_id}"


def cart(user_id: str) -> str:
    """Hash: item (hold) id -> cart line (the format: app/engine/carts.py, Line.dumps)."""
    return f"{PREFIX}cart:{{u{user_id}}}"


def idempotency(key: str) -> str:
    """String: an Idempotency-Key's request fingerprint, then its result (the key hashed: any
    printable text, of a bounded length, with no brace to break a hash tag)."""
    import hashlib

    return f"{PREFIX}idem:{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def catalog_version() -> str:
    """Integer bumped on every catalog or pricing-rule change, so every process drops its cache."""
    return f"{PREFIX}catalog-version"


def readiness_probe() -> str:
    """String written by /readyz (with a short TTL): a Redis that refuses writes is not ready."""
    return f"{PREFIX}readyz"


def reconcile_lock() -> str:
    return f"{PREFIX}lock:reconcile"


def sweep_lock() -> str:
    return f"{PREFIX}lock:sweep"


# -- operations: what the jobs, the listener and the summary leave for each other -------------------

JOBS = ("sweep", "reconcile")


def job_status(job: str) -> str:
    """Hash: the job's last success, `at_ms`, and what it did (sweep: `released`; reconcile:
    `drifted`, `repaired`); written by jobs/tasks.py, read by the ops summary and /metrics."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}")
    return f"{PREFIX}job:{job}"


def listener_heartbeat() -> str:
    """String with a TTL, rewritten every few seconds by a subscribed expiry listener: present
    means a listener is alive; its value is that listener's release-lag p99 in ms ("" when unknown)."""
    return f"{PREFIX}listener:heartbeat"


def ops_rate_sample(source: str) -> str:
    """Hash: the last two samples of one host's reservation and refusal counters (summed over its
    processes) with their times, from which the ops summary computes its per-second rates."""
    return f"{PREFIX}ops:rates:{source}"


def ops_scan() -> str:
    """String with a TTL: the ops summary's last scan of every variant (JSON), shared by every
    process while it is fresh; written only when a scan is slow (app/services/ops.py)."""
    return f"{PREFIX}ops:scan"
