"""The live view of stock for people and dashboards: `GET /api/ops/summary/`, `inventory status` and
`inventory top`, the `/ops/` page and the gauges of /metrics all read it from here.

It only reads what already exists, so nothing is added to the add-to-cart path:

- every stock row of the database (`on_hand`, `version`; the sku only of the rows shown), 500 at a
  time, and per batch one pipelined Redis round trip: the variant's counters (HMGET of its stock
  hash) and three counts of its hold-expiry sorted set (ZCOUNT);
- the Prometheus counters the engine keeps (`inventory_holds_total{event="created"}` and
  `inventory_rejections_total`), summed over the processes of this host, differenced against the
  previous sample kept in Redis: the per-second rates;
- what the jobs and the listener leave in Redis: each job's last success and the listener's heartbeat.

What each figure approximates (docs/OPERATIONS.md repeats it for people):

- `active_holds`, `holds_live`: holds whose expiry time is still ahead (a lapsed hold waiting for its
  sweep, normally under a second, is not counted);
- `reservations_per_minute` of a variant: its holds made or renewed within the last minute that
  are still live. A hold's expiry is set to its reserve time plus HOLD_TTL_SECONDS, so these are the
  holds whose expiry lies in the last minute of that span. It counts adds (a new hold, a top-up or
  a change, which renew it), less those of the minute already released or checked out; with a
  HOLD_TTL_SECONDS under 60 the window is the TTL, scaled to a minute;
- "busiest": most `reservations_per_minute`, then most units `reserved`, then most `active_holds`,
  then the lower id;
- `reservations_per_second` / `refusals_per_second`: reserves that succeeded / were refused, averaged
  since the previous sample (one taken at least a second earlier by any caller: whoever asks,
  samples); 0 on the very first summary;
- `invariant`: `available + reserved == on_hand` and `available >= 0` per variant, skipping a
  variant with a change in flight as the reconciler does (an adjustment half-way, or Redis's
  `version` not the database's: a checkout or adjustment between its database commit and its Redis
  step). A variant whose counters were never built is not checked (they are built on first use);
- `generated_at`: when the stock figures were read. On a store big enough that reading every variant
  takes over REUSE_FROM_MS, one scan serves every caller of every process for REUSE_FACTOR times as
  long as it took (10,000 variants: about a second), so dashboards and scrapes cannot pile up scans.
  The rates, the jobs, the listener and the variants asked for by id are always read anew.
"""
from __future__ import annotations

import heapq
import json
import time
from typing import Callable, Iterable

from app import clock, keys
from app.errors import NotFound

BATCH = 500  # variants per database query and per Redis round trip
MAX_LIMIT = 500  # the most variants a summary lists as the busiest (API.md)
MINUTE_MS = 60_000
RATE_MIN_WINDOW_MS = 1_000  # a rate is never taken over less than this
RATE_SAMPLE_TTL_S = 24 * 3600
MAX_VIOLATIONS_LISTED = 1_000  # the gauge counts them all; the summary names the first ones
# A scan of a big store is shared for a while, so that any number of dashboards, `inventory top`s
# and scrapes cost at most a sixth of one process's time: a scan that took at least
# REUSE_FROM_MS is reused, by every process, for REUSE_FACTOR times as long as it took. Below that
# (a store of a few thousand variants) every call reads the stores.
REUSE_FROM_MS = 100
REUSE_FACTOR = 5


class OpsService:
    """Reads the summary; see the module docstring for what each figure means."""

    def __init__(self, runner, repository, settings, counter_totals: Callable[[], dict[str, float]],
                 source: str = "local"):
        self.runner = runner  # app.engine.runner.ScriptRunner: plain commands, one round trip per batch
        self.repository = repository  # persistence.repository.StockRepository
        self.ttl_ms = settings.hold_ttl_seconds * 1000
        self.counter_totals = counter_totals  # app.metrics.counter_totals
        self.source = source  # whose counters the rates are taken from (this host)
        self.reuse_from_ms = REUSE_FROM_MS

    # -- the summary ---------------------------------------------------------------------------

    def summary(self, limit: int = 50, variant_ids: Iterable[int] = ()) -> dict:
        """API.md's summary: the `limit` busiest variants and those asked for, totals, rates, the
        invariant, the jobs and the listener. NotFound for an asked-for variant that does not exist."""
        wanted = list(dict.fromkeys(int(v) for v in variant_ids))
        asked = self.repository.stock_rows(wanted) if wanted else []
        unknown = set(wanted) - {vid for vid, *_ in asked}
        if unknown:
            raise NotFound("variant", min(unknown))
        now = clock.now_ms()
        jobs, heartbeat, samples, shared = self._read_status()
        view = self._view(now, shared)
        rates = self._rates(now, samples)
        busiest = view["top"][:limit]
        shown = {row["variant_id"] for row in busiest}
        pinned = {}
        if asked:
            rows = self._read_rows([(vid, on_hand, version) for vid, _sku, on_hand, version in asked], now)[0]
            pinned = {row["variant_id"]: {**row, "sku": sku} for row, (_vid, sku, *_rest) in zip(rows, asked)}
        return {
            "variants": busiest + [pinned[v] for v in wanted if v not in shown],
            "totals": view["totals"],
            "holds_lapsing_next_minute": view["lapsing"],
            "reservations_per_second": rates["reserved"],
            "refusals_per_second": rates["refused"],
            "invariant": {"ok": not view["violation_count"], "violations": view["violations"]},
            **self._status(jobs, heartbeat),
            "generated_at": clock.ms_to_iso(view["at_ms"]),
        }

    def gauges(self) -> dict:
        """What /metrics reports as gauges: {totals, violations (a count), job_success_s: {job:
        epoch seconds or None}}. No rate sample is taken."""
        jobs, _heartbeat, _samples, shared = self._read_status()
        view = self._view(clock.now_ms(), shared)
        return {"totals": view["totals"], "violations": view["violation_count"],
                "job_success_s": {job: (int(h["at_ms"]) / 1000 if h.get("at_ms") else None)
                                  for job, h in jobs.items()}}

    # -- the scan ------------------------------------------------------------------------------

    def _view(self, now: int, shared: str | None) -> dict:
        """The stock figures: the shared scan while it is fresh, else a new scan (shared when slow)."""
        if shared:
            view = json.loads(shared)
            if now - view["at_ms"] < view["reuse_ms"]:
                return view
        started = time.monotonic()
        view = self._scan(now)
        took_ms = (time.monotonic() - started) * 1000
        if took_ms >= self.reuse_from_ms:
            view["reuse_ms"] = int(took_ms * REUSE_FACTOR)
            self.runner.run([("SET", keys.ops_scan(), json.dumps(view, separators=(",", ":")),
                              "PX", view["reuse_ms"])])
        return view

    def _scan(self, now: int) -> dict:
        """Every variant, a batch at a time: totals, holds lapsing soon, the invariant and the
        MAX_LIMIT busiest rows, busiest first (their skus read once, at the end)."""
        totals = {"on_hand": 0, "available": 0, "reserved": 0, "holds_live": 0}
        top: list[tuple] = []
        violations: list[int] = []
        lapsing = 0
        for levels in self.repository.level_batches(None, BATCH):
            read, soon, broken = self._read_rows(levels, now)
            lapsing += soon
            violations += broken
            for row in read:
                totals["on_hand"] += row["on_hand"]
                totals["available"] += row["available"]
                totals["reserved"] += row["reserved"]
                totals["holds_live"] += row["active_holds"]
                key = (row["reservations_per_minute"], row["reserved"], row["active_holds"], -row["variant_id"])
                if len(top) < MAX_LIMIT:
                    heapq.heappush(top, (key, row))
                elif key > top[0][0]:
                    heapq.heapreplace(top, (key, row))
        busiest = [row for _key, row in sorted(top, key=lambda kr: kr[0], reverse=True)]
        skus = {vid: sku for vid, sku, *_ in self.repository.stock_rows(row["variant_id"] for row in busiest)}
        for row in busiest:
            row["sku"] = skus.get(row["variant_id"], "")  # "": deleted since its batch was read
        return {"at_ms": now, "reuse_ms": 0, "totals": totals, "lapsing": lapsing, "top": busiest,
                "violations": violations[:MAX_VIOLATIONS_LISTED], "violation_count": len(violations)}

    def _read_rows(self, levels, now: int) -> tuple[list[dict], int, list[int]]:
        """Variants' (variant_id, on_hand, version) with their live figures, in one round trip;
        returns (API.md's variant rows, their sku left None; the holds lapsing within a minute; the
        ids that break the invariant)."""
        window_ms = min(MINUTE_MS, self.ttl_ms)
        recent_from = f"({now + self.ttl_ms - window_ms}"  # a hold reserved within the window expires after
        live_from, soon_to = f"({now}", now + MINUTE_MS
        calls = []
        for vid, _on_hand, _version in levels:
            exp = keys.hold_expiry(vid)
            calls += [("HMGET", keys.stock(vid), "available", "reserved", "version", "adj_pending"),
                      ("ZCOUNT", exp, live_from, "+inf"),
                      ("ZCOUNT", exp, live_from, soon_to),
                      ("ZCOUNT", exp, recent_from, "+inf")]
        replies = self.runner.run(calls)
        out, lapsing, broken = [], 0, []
        for i, (vid, on_hand, version) in enumerate(levels):
            (available, reserved, r_version, pending), live, soon, recent = replies[4 * i:4 * i + 4]
            if available is None:  # never built: everything on hand is available, nothing held
                available, reserved = on_hand, 0
            else:
                available, reserved = int(available), int(reserved or 0)
                settled = int(r_version or 0) == version and not int(pending or 0)
                if settled and (available + reserved != on_hand or available < 0):
                    broken.append(vid)
            lapsing += int(soon)
            out.append({"variant_id": vid, "sku": None, "on_hand": on_hand, "available": available,
                        "reserved": reserved, "active_holds": int(live),
                        "reservations_per_minute": round(int(recent) * MINUTE_MS / window_ms)})
        return out, lapsing, broken

    # -- rates ---------------------------------------------------------------------------------

    def _rates(self, now: int, stored: dict) -> dict[str, float]:
        """Per-second rates of the counters since the last sample at least RATE_MIN_WINDOW_MS old.

        The sample hash keeps two samples, `a` older than `b`: when `b` is old enough it is the base
        and the current values become the new `b`; when it is too recent, `a` (always a window older
        than `b`) is the base. So callers a few milliseconds apart never divide by a tiny span, and
        frequent callers still move the samples on."""
        current = self.counter_totals()
        base = None
        writes: dict[str, object] = {}
        if "b_ms" in stored and now - int(stored["b_ms"]) >= RATE_MIN_WINDOW_MS:
            base = "b"
            writes = {"a_ms": stored["b_ms"], "a_reserved": stored["b_reserved"], "a_refused": stored["b_refused"]}
        elif "a_ms" in stored and now - int(stored["a_ms"]) >= RATE_MIN_WINDOW_MS:
            base = "a"
        if base == "b" or "b_ms" not in stored:
            writes.update({"b_ms": now, "b_reserved": str(current["reserved"]), "b_refused": str(current["refused"])})
            key = keys.ops_rate_sample(self.source)
            self.runner.run([("HSET", key, *[x for kv in writes.items() for x in kv]),
                             ("EXPIRE", key, RATE_SAMPLE_TTL_S)])
        if base is None:
            return {"reserved": 0.0, "refused": 0.0}
        seconds = (now - int(stored[f"{base}_ms"])) / 1000
        out = {}
        for name in ("reserved", "refused"):
            before = float(stored[f"{base}_{name}"])
            # a counter below its sample means the processes restarted: all of it is new
            grown = current[name] - before if current[name] >= before else current[name]
            out[name] = round(grown / seconds, 2)
        return out

    # -- jobs and listener ---------------------------------------------------------------------

    def _read_status(self) -> tuple[dict[str, dict], str | None, dict, str | None]:
        """(each job's status hash, the listener's heartbeat or None, the rate samples, the shared
        scan or None): one round trip."""
        replies = self.runner.run([*[("HGETALL", keys.job_status(job)) for job in keys.JOBS],
                                   ("GET", keys.listener_heartbeat()),
                                   ("HGETALL", keys.ops_rate_sample(self.source)),
                                   ("GET", keys.ops_scan())])
        jobs = {job: reply or {} for job, reply in zip(keys.JOBS, replies)}
        return jobs, replies[-3], replies[-2] or {}, replies[-1]

    @staticmethod
    def _status(jobs: dict[str, dict], heartbeat: str | None) -> dict:

        def number(h: dict, field: str) -> int | None:
            return int(h[field]) if h.get(field) not in (None, "") else None

        sweep, reconcile = jobs["sweep"], jobs["reconcile"]
        return {
            "jobs": {
                "sweep": {"last_success_at": clock.ms_to_iso(number(sweep, "at_ms")),
                          "released": number(sweep, "released")},
                "reconcile": {"last_success_at": clock.ms_to_iso(number(reconcile, "at_ms")),
                              "drifted": number(reconcile, "drifted"), "repaired": number(reconcile, "repaired")},
            },
            "listener": {"alive": heartbeat is not None,
                         "lag_p99_ms": float(heartbeat) if heartbeat else None},
        }
