"""A flash sale against a real web server while a Redis primary is lost, and the checks after it.

`Sale` runs client threads, each add a new customer's one unit, and records every answer: when it
was sent and answered, its status, Retry-After and, for a 201, the item (hold) id. Every customer is
new, so an item id names exactly one acknowledged hold (no later add can make another generation
of it): whether that hold survived is whether its id is still in the variant's holds.
"""
from __future__ import annotations

import itertools
import os
import signal
import math
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from app import keys
from app.engine.holdrec import hold_id_for
from app.runner import child_commands
from tests.faults.conftest import PYTHON, assert_orders_durable, assert_stock_exact, units_sold

REQUEST_TIMEOUT = 10.0  # the clients' own bound: an answer later than this is a hang


def web_command() -> list[str]:
    """`inventory run`'s web command line (gunicorn with app/gunicorn_conf.py)."""
    return next(c.argv for c in child_commands(PYTHON) if c.name == "web")


def call(port: int, method: str, path: str, body: dict | None = None,
         timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request on a fresh connection."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            payload = {"raw": raw[:200].decode(errors="replace")}
        return exc.code, payload, dict(exc.headers)


def ready(port: int) -> bool:
    try:
        return call(port, "GET", "/readyz", timeout=3)[0] == 200
    except OSError:
        return False


@dataclass
class Answer:
    sent: float
    done: float
    variant_id: int
    user: str
    status: int  # 0: no HTTP answer (connection refused, reset or the client's timeout)
    code: str = ""
    retry_after: str | None = None
    item_id: str = ""
    error: str = ""


@dataclass
class Sale:
    """Client threads adding to `hot` variants (half the adds) and to `spread` ones (the rest)."""

    port: int
    hot: list[int]
    spread: list[int]
    threads: int = 12
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._shop, args=(i,), daemon=True) for i in range(self.threads)]

    def start(self) -> "Sale":
        for t in self._workers:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(REQUEST_TIMEOUT + 5)

    def _shop(self, index: int) -> None:
        while not self._stop.is_set():
            n = next(self._seq)
            vid = self.hot[(n // 2) % len(self.hot)] if n % 2 == 0 else self.spread[(n // 2) % len(self.spread)]
            user = f"s{index}x{n}"
            sent = time.monotonic()
            try:
                status, body, headers = call(self.port, "POST", "/api/cart/add/",
                                             {"user_id": user, "variant_id": vid, "quantity": 1})
            except OSError as exc:
                self._record(Answer(sent, time.monotonic(), vid, user, 0, error=repr(exc)))
                continue
            error = (body or {}).get("error") or {} if isinstance(body, dict) else {}
            item = (body or {}).get("item") or {} if status == 201 else {}
            self._record(Answer(sent, time.monotonic(), vid, user, status, error.get("code", ""),
                                headers.get("Retry-After"), item.get("id", "")))
            if status == 201:
                assert item.get("id") == hold_id_for(vid, user), body

    def _record(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    # -- what the clients saw ----------------------------------------------------------------------

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def acknowledged(self) -> list[Answer]:
        return [a for a in self.snapshot() if a.status == 201]

    def last_refusal(self) -> Answer | None:
        refused = [a for a in self.snapshot() if not (served(a) or shed(a))]
        return max(refused, key=lambda a: a.done) if refused else None

    def quiet_since(self, seconds: float, after: float) -> bool:
        """Adds sent after `after` have been served (201, or 400 sold out) only, for the last
        `seconds`, and some were meanwhile."""
        now = time.monotonic()
        last = self.last_refusal()
        recent = [a for a in self.snapshot() if a.sent > max(after, now - seconds)]
        return (now - after > seconds and bool(recent)
                and (last is None or last.done < now - seconds))


def served(a: Answer) -> bool:
    """A hold taken, or the variant sold out (400 insufficient_stock): the service answered."""
    return a.status == 201 or (a.status == 400 and a.code == "insufficient_stock")


def shed(a: Answer) -> bool:
    """429 `overloaded` with Retry-After: more load than the workers serve in time (API.md), which a
    burst of retries after an outage can be; not a failure."""
    return a.status == 429 and a.code == "overloaded" and bool(a.retry_after)


def check_answers(answers: list[Answer], killed_at: float) -> dict:
    """Every answer is a 201, a 400 insufficient_stock, a 429 overloaded or a 503 unavailable, both
    with Retry-After: never a 500, never a hang; returns the figures of the refusals."""
    bad = [a for a in answers if not (served(a) or shed(a) or (a.status == 503 and a.code == "unavailable"
                                                               and a.retry_after))]
    assert not bad, f"{len(bad)} unexpected answer(s), e.g. {bad[:5]}"
    assert max(a.done - a.sent for a in answers) < REQUEST_TIMEOUT
    refused = [a for a in answers if a.status == 503]
    after = [a for a in answers if a.sent >= killed_at]
    return {
        "adds": len(answers), "acknowledged": sum(a.status == 201 for a in answers),
        "sold_out_400": sum(a.status == 400 for a in answers), "refused_503": len(refused),
        "shed_429": sum(shed(a) for a in answers),
        "refused_for_s": round(max(a.done for a in refused) - killed_at, 2) if refused else 0.0,
        "first_refusal_s": round(min(a.done for a in refused) - killed_at, 2) if refused else None,
        "slowest_answer_after_kill_s": round(max(a.done - a.sent for a in after), 2) if after else None,
    }


def fate_of_acknowledged(redis, acknowledged: list[Answer]) -> dict[str, list[Answer]]:
    """Each acknowledged hold: `held` (its id is still in its variant's holds), `reported` (gone, its
    cart line marked lapsed by the reconciler: expiry 0), `line_lost_too` (gone with its cart line:
    nothing left to see), `unreported` (gone, its line still claims it: must never happen)."""
    pipe = redis.pipeline(transaction=False)
    for a in acknowledged:
        pipe.hget(keys.holds(a.variant_id), a.item_id)
        pipe.hget(keys.cart(a.user), a.item_id)
    replies = pipe.execute()
    fate: dict[str, list[Answer]] = {"held": [], "reported": [], "line_lost_too": [], "unreported": []}
    for a, hold, line in zip(acknowledged, replies[0::2], replies[1::2]):
        if hold is not None:
            fate["held"].append(a)
        elif line is None:
            fate["line_lost_too"].append(a)
        elif line.split("|")[2] == "0":
            fate["reported"].append(a)
        else:
            fate["unreported"].append(a)
    return fate


def metric_total(port: int, name: str) -> float:
    """The sum of a counter's samples on /metrics (every worker's)."""
    status, _body, _h = 0, None, None
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
        status, text = response.status, response.read().decode()
    assert status == 200
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def checkout_all(port: int, buyers: list[Answer]) -> Counter:
    """Check out each buyer's cart; returns the answers' statuses (201 order, 410 hold gone)."""
    statuses: Counter = Counter()
    for a in buyers:
        status, body, _h = call(port, "POST", f"/api/cart/{a.user}/checkout/")
        assert status in (201, 410), (status, body)
        if status == 410:
            assert body["error"]["code"] == "reservation_expired", body
        statuses[status] += 1
    return statuses


def print_figures(title: str, figures: dict) -> None:
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def timeline(answers: list[Answer], since: float) -> str:
    """The answers per second from `since`, by status and error code: a failure's explanation."""
    buckets: dict[int, Counter] = {}
    for a in answers:
        buckets.setdefault(math.floor(a.done - since), Counter())[(a.status, a.code or a.error[:60])] += 1
    return "\n".join(f"{second:+d}s: {dict(c)}" for second, c in sorted(buckets.items()))


# -- the scenario, on any topology ----------------------------------------------------------------

REPLICA_LAG_S = 0.5  # how long the replica is stopped before its primary is killed (< node timeout)
# written to the primary first in that moment: more than the kernel's socket buffers take, so what
# the primary acknowledges after it is still in its own output buffer when it is killed
BACKLOG_BYTES = 8 << 20


def replicas_for(request) -> int:
    """Replicas per primary for a test parametrized by `durability`: HOLD_DURABILITY=replicated needs
    a replica after the failover too (an add waits for one), so two, one left when the other is promoted."""
    callspec = getattr(request.node, "callspec", None)
    return 2 if callspec and callspec.params.get("durability") == "replicated" else 1


class Topology:
    """What the scenario needs of a topology (a cluster, or a primary watched by sentinels)."""

    def replica_pids(self) -> list[int]:  # the processes of the lost primary's replicas
        raise NotImplementedError

    @contextmanager
    def pause_replica(self):
        """Every replica of the primary about to be lost stopped (SIGSTOP) inside: it falls behind."""
        pids = self.replica_pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def backlog(self, data: bytes) -> None:  # a write of `data` to the primary about to be lost
        raise NotImplementedError

    def kill_primary(self) -> None:
        raise NotImplementedError

    def wait_healed(self) -> float:  # seconds waited until the topology serves every key again
        raise NotImplementedError

    def reader(self):  # a decoding client of the (new) primary or primaries
        raise NotImplementedError


def sale_across_failover(port: int, container, topology: Topology, hot: list[int], spread: list[int],
                         on_hand: dict[int, int], recovery_bound_s: float, reconcile) -> dict:
    """The flash sale, the primary lost in the middle (its replica behind), and every check after:
    returns the figures. `reconcile()` runs the container's reconciler (retried by the caller's
    bound while its client finds the new primary)."""
    lost_before = metric_total(port, "inventory_holds_lost_total")
    sale = Sale(port, hot, spread, threads=12).start()
    try:
        _until(lambda: len(sale.acknowledged()) >= 80, 40, "80 holds taken")
        early = [a for a in sale.acknowledged() if a.variant_id in hot][:4]
        orders_before = [call(port, "POST", f"/api/cart/{a.user}/checkout/") for a in early]
        assert [s for s, _b, _h in orders_before] == [201] * len(early), orders_before

        with topology.pause_replica():  # the replica falls behind: what the primary acknowledges now is lost
            stopped_at, acked_at_stop = time.monotonic(), len(sale.acknowledged())
            topology.backlog(b"x" * BACKLOG_BYTES)
            in_window = [a for a in sale.acknowledged() if a.variant_id in hot][4:7]
            orders_in_window = [call(port, "POST", f"/api/cart/{a.user}/checkout/") for a in in_window]
            while time.monotonic() - stopped_at < REPLICA_LAG_S:
                time.sleep(0.02)  # a fixed lag on purpose: the window the replica misses
            topology.kill_primary()
            killed_at = time.monotonic()
        acked_in_lag = len(sale.acknowledged()) - acked_at_stop
        deadline = killed_at + recovery_bound_s + 10
        while not sale.quiet_since(2.0, killed_at):
            assert time.monotonic() < deadline, \
                "adds still refused after the failover:\n" + timeline(sale.snapshot(), killed_at)
            time.sleep(0.1)
    finally:
        sale.stop()
    healed_in = topology.wait_healed()
    answers = sale.snapshot()
    figures = check_answers(answers, killed_at)
    assert figures["refused_for_s"] <= recovery_bound_s, figures
    after_kill = [a for a in answers if a.sent > killed_at]
    assert any(served(a) and a.variant_id in hot for a in after_kill), \
        "the hot variants never served again:\n" + timeline([a for a in answers if a.variant_id in hot], killed_at)
    assert [s for s, _b, _h in orders_in_window] == [201] * len(in_window), orders_in_window

    # the reconciler: counters from on_hand and the holds that survived, lost holds reported
    status, report, _h = call(port, "POST", "/api/ops/reconcile/", {})
    assert status == 200, report
    checked_out = {a.user for a in early + in_window}
    reader = topology.reader()
    try:
        fate = fate_of_acknowledged(reader, [a for a in sale.acknowledged() if a.user not in checked_out])
    finally:
        reader.close()
    reported_metric = metric_total(port, "inventory_holds_lost_total") - lost_before
    assert not fate["unreported"], f"acknowledged holds gone, their lines left unreported: {fate['unreported'][:5]}"
    # lines lost with their holds were written back by the web processes that wrote them (app/engine/recent.py)
    assert not fate["line_lost_too"], \
        f"acknowledged holds gone with their cart lines, never reported: {fate['line_lost_too'][:5]}"
    assert report["lost_holds"] == reported_metric
    assert report["lost_holds"] >= len(fate["reported"])
    if report["lost_holds"] <= 100:
        assert {a.item_id for a in fate["reported"]} <= set(report["lost_hold_ids"])
    assert call(port, "POST", "/api/ops/reconcile/", {})[1]["lost_holds"] == 0  # reported once

    # checkout: a reported line is 410, a surviving hold sells; nothing sells beyond on_hand
    held_hot = [a for a in fate["held"] if a.variant_id in hot]
    sample = [a for vid in spread for a in [x for x in fate["held"] if x.variant_id == vid][:3]]
    if fate["reported"]:
        assert checkout_all(port, fate["reported"]) == Counter({410: len(fate["reported"])})
    statuses = checkout_all(port, held_hot + sample)
    sold = units_sold(container, hot + spread)
    for vid in hot + spread:
        assert sold.get(vid, 0) <= on_hand[vid], (vid, sold.get(vid), on_hand[vid])

    # orders written before (and during) the failover stay, and their units stay sold
    assert_orders_durable(container, [body for _s, body, _h in orders_before + orders_in_window])
    final = reconcile()
    levels = assert_stock_exact(container, hot + spread)
    for vid in hot + spread:
        assert levels[vid][0] == on_hand[vid] - sold.get(vid, 0)

    print(timeline([a for a in answers if a.done > killed_at - 1], killed_at))
    return {
        **figures, "healed_in_s": round(healed_in, 2), "acked_during_replica_lag": acked_in_lag,
        "acked_lost": len(fate["reported"]) + len(fate["line_lost_too"]),
        "lost_reported": len(fate["reported"]), "lost_with_their_cart_line": len(fate["line_lost_too"]),
        "report_lost_holds": report["lost_holds"], "metric_delta": reported_metric,
        "checkouts": dict(statuses), "orders_finalized_again": report["orders_finalized"],
        "locks_finalized_after": final.locks_finalized, "drifted_at_first_reconcile": report["drifted"]}


def _until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {message}"
        time.sleep(0.05)
