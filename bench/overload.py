"""Overload benchmark: far more shoppers than the workers can serve, on one hot variant.

The production server (app/webserver.py: WEB_SERVER, WEB_CONCURRENCY, WEB_THREADS; the admission
knobs OVERLOAD_* of app/overload.py as set in the environment, else their defaults) on the bench
stores. For each of 512 and 2,048 connections, wrk adds one unit per request for a distinct user
to a variant with 10**9 units (so every refusal is the server's, not the stock's); then the same
at 2,048 connections on a sold-out variant (0 units: every answer is 400 insufficient_stock).

wrk counts answers by status. Its latency histogram mixes the served answers with the refusals,
so a small Python client (PROBE_CONNECTIONS keep-alive connections, in threads) sends the same
requests beside it and times each answer by status: served p99 and 429 p50/p99 come from it.
Beside: at 64 connections, the rate of sold-out adds (400) against successful ones (201), as
`refused cheaply` asks. Afterwards the invariant: available + reserved == on_hand, and reserved
equals the 2xx answers (wrk's and the probe's) up to the requests in flight when wrk stopped.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time

from app import keys
from app.engine.holdrec import unpack_hold
from bench.stores import Stores, seed_variants, sessions_for
from bench.web import STOREFRONT_KEY, WRK_SCRIPT, WRK_THREAD_SETUP, WRK_THREADS, _wrk_preexec, run_wrk, start_servers, \
    server_specs

STOCK = 10**9
LOADS = (512, 2048)
PROBE_CONNECTIONS = 8

WRK_OVERLOAD = r"""
-- Counts answers by status class for add-to-cart, a distinct user per request.
-- args: variant_id user_prefix bearer_token
""" + WRK_THREAD_SETUP + r"""
function init(args)
  vid, prefix, token = args[1], args[2], args[3]
  n, s2xx, s400, s429, s5xx, sother, retry_after = 0, 0, 0, 0, 0, 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if token ~= nil and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
end

function request()
  n = n + 1
  local body = '{"user_id":"' .. prefix .. "-" .. tid .. "-" .. n .. '","variant_id":' .. vid .. ',"quantity":1}'
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then s2xx = s2xx + 1
  elseif status == 400 then s400 = s400 + 1
  elseif status == 429 then
    s429 = s429 + 1
    if headers["Retry-After"] ~= nil then retry_after = retry_after + 1 end
  elseif status >= 500 then s5xx = s5xx + 1
  else sother = sother + 1 end
end

function done(summary, latency, requests)
  local t = {s2xx = 0, s400 = 0, s429 = 0, s5xx = 0, sother = 0, retry_after = 0}
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + th:get(k) end
  end
  local e = summary.errors
  io.write(string.format('OVERLOAD_RESULT {"requests":%d,"duration_us":%d,"s2xx":%d,"s400":%d,"s429":%d,' ..
    '"s5xx":%d,"sother":%d,"retry_after":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, t.s2xx, t.s400, t.s429, t.s5xx, t.sother, t.retry_after,
    e.connect, e.read, e.write, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * q / 100))], 1)


class Probe:
    """A few keep-alive connections in threads, timing each add-to-cart answer by its status."""

    def __init__(self, port: int, vid: int, prefix: str, auth: str, connections: int = PROBE_CONNECTIONS):
        self.port, self.vid, self.prefix, self.auth = port, vid, prefix, auth
        self.stop = threading.Event()
        self.times: dict[int, list[float]] = {}
        self.errors = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(connections)]

    def _run(self, index: int) -> None:
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = f"Bearer {self.auth}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = 0
        mine: dict[int, list[float]] = {}
        while not self.stop.is_set():
            n += 1
            body = json.dumps({"user_id": f"{self.prefix}-p{index}-{n}", "variant_id": self.vid, "quantity": 1})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/cart/add/", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            mine.setdefault(response.status, []).append((time.perf_counter() - t0) * 1000)
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()
        with self.lock:
            for status, values in mine.items():
                self.times.setdefault(status, []).extend(values)

    def __enter__(self) -> "Probe":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)

    def summary(self) -> dict:
        served = [v for s, values in self.times.items() if 200 <= s < 300 for v in values]
        refused = self.times.get(429, [])
        return {
            "answers": {str(s): len(v) for s, v in sorted(self.times.items())},
            "served_p50_ms": _pct(served, 50),
            "served_p99_ms": _pct(served, 99),
            "overloaded_p50_ms": _pct(refused, 50),
            "overloaded_p99_ms": _pct(refused, 99),
            "sold_out_p99_ms": _pct(self.times.get(400, []), 99),
            "socket_errors": self.errors,
            "served": len(served),
        }


def _wrk_overload(wrk: str, script, port: int, seconds: float, connections: int, vid: int, prefix: str,
                  auth: str) -> dict:
    cmd = [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}/api/cart/add/", "--",
           str(vid), prefix, auth]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=_wrk_preexec)
    match = re.search(r"^OVERLOAD_RESULT (\{.*\})$", out.stdout, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(match.group(1))
    secs = raw["duration_us"] / 1e6
    answered = raw["s2xx"] + raw["s400"] + raw["s429"] + raw["s5xx"] + raw["sother"]
    return {
        "connections": connections,
        "seconds": round(secs, 3),
        "served": raw["s2xx"],
        "served_per_second": round(raw["s2xx"] / secs, 1),
        "sold_out_400": raw["s400"],
        "sold_out_per_second": round(raw["s400"] / secs, 1),
        "overloaded_429": raw["s429"],
        "overloaded_share": round(raw["s429"] / answered, 3) if answered else None,
        "overloaded_with_retry_after": raw["retry_after"],
        "status_5xx": raw["s5xx"],
        "other_status": raw["sother"],
        "socket_errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        "all_p50_ms": raw["p50_us"] / 1000,
        "all_p99_ms": raw["p99_us"] / 1000,
        "all_max_ms": raw["max_us"] / 1000,
    }


def _one(wrk, script, server, seconds, connections, vid, prefix, auth) -> dict:
    with Probe(server.port, vid, prefix, auth) as probe:
        r = _wrk_overload(wrk, script, server.port, seconds, connections, vid, prefix, auth)
    r["probe"] = probe.summary()
    return r


def run(stores: Stores, *, seconds: float, log=print) -> dict:
    wrk = shutil.which("wrk")
    if not wrk:
        raise RuntimeError("the overload benchmark needs wrk on the PATH (thousands of connections)")
    engine_db, sessions = sessions_for(stores.database_url)
    _, (hot,) = seed_variants(sessions, 1, on_hand=STOCK)
    _, (sold_out,) = seed_variants(sessions, 1, on_hand=0)
    engine_db.dispose()
    auth = STOREFRONT_KEY if stores.postgres else ""
    spec = server_specs()[0]
    knobs = {k: v for k, v in os.environ.items() if k.startswith("OVERLOAD_")}
    (label, server), = start_servers(stores, [spec], knobs).items()
    if not stores.postgres:  # start_servers sets keys only with Postgres
        auth = ""
    script = stores.workdir / "overload.lua"
    script.write_text(WRK_OVERLOAD)
    plain = stores.workdir / "bench.lua"
    plain.write_text(WRK_SCRIPT)
    results: dict = {"server": label, "seconds": seconds, "knobs": knobs or "defaults",
                     "probe_connections": PROBE_CONNECTIONS}
    served = sold_out_served = 0
    in_flight = 0
    try:
        # warm-up, and the sold-out cost at 64 connections beside a successful add
        run_wrk(wrk, plain, f"http://127.0.0.1:{server.port}/api/cart/add/", 1, ["add", str(hot), "warm", auth])
        in_flight += 64
        ok = run_wrk(wrk, plain, f"http://127.0.0.1:{server.port}/api/cart/add/", seconds,
                     ["add", str(hot), "ok64", auth])
        refused = run_wrk(wrk, plain, f"http://127.0.0.1:{server.port}/api/cart/add/", seconds,
                          ["add", str(sold_out), "so64", auth])
        in_flight += 64
        served += ok["ok"]
        sold_out_served = refused["ok"]
        ok_rate, so_rate = ok["per_second"], refused["insufficient_or_400"] / max(refused["seconds"], 1e-6)
        results["at_64"] = {
            "add_per_second": ok_rate, "add_p99_ms": ok["p99_ms"], "add_not_2xx": ok["other_status"],
            "sold_out_per_second": round(so_rate, 1), "sold_out_p99_ms": refused["p99_ms"],
            "sold_out_vs_add": round(so_rate / ok_rate, 2) if ok_rate else None,
        }
        log(f"  overload 64 connections: add {ok_rate:,.0f}/s (p99 {ok['p99_ms']:.1f} ms), sold-out add "
            f"{so_rate:,.0f}/s (p99 {refused['p99_ms']:.1f} ms): x{results['at_64']['sold_out_vs_add']}")
        runs = [(f"hot_{c}", c, hot) for c in LOADS] + [(f"sold_out_{LOADS[-1]}", LOADS[-1], sold_out)]
        for name, connections, vid in runs:
            r = _one(wrk, script, server, seconds, connections, vid, name, auth)
            if vid == hot:
                in_flight += connections + PROBE_CONNECTIONS
                served += r["served"] + r["probe"]["served"]
            else:
                sold_out_served += r["served"] + r["probe"]["served"]
            results[name] = r
            p = r["probe"]
            log(
                f"  overload {name:<14} served {r['served_per_second']:>7,.0f}/s, 429 share {r['overloaded_share']}, "
                f"5xx {r['status_5xx']}, socket errors {r['socket_errors']}; probe: served p99 "
                f"{p['served_p99_ms']} ms, 429 p50/p99 {p['overloaded_p50_ms']}/{p['overloaded_p99_ms']} ms, "
                f"sold-out p99 {p['sold_out_p99_ms']} ms, answers {p['answers']}"
            )
    finally:
        server.stop()
    results["invariant"] = _check(stores, hot, served, in_flight)
    results["sold_out_invariant"] = _check(stores, sold_out, sold_out_served, 0, on_hand=0)
    return results


def _check(stores: Stores, vid: int, served: int, in_flight: int, on_hand: int = STOCK) -> dict:
    container = stores.container()
    try:
        c = container.holds.counters([vid])[vid]
        raw = container.redis.hgetall(keys.holds(vid))
        held = sum(h.quantity for h in map(unpack_hold, raw.values()) if h is not None)
    finally:
        container.close()
    problems = []
    if c.available + c.reserved != on_hand:
        problems.append(f"available {c.available} + reserved {c.reserved} != on_hand {on_hand}")
    if c.reserved != held:
        problems.append(f"reserved {c.reserved} != held {held}")
    if not served <= c.reserved <= served + in_flight:
        problems.append(f"reserved {c.reserved} is not between the 2xx answers {served} and that plus "
                        f"the requests in flight when the load stopped ({in_flight})")
    return {"ok": not problems, "problems": problems, "reserved": c.reserved, "served_adds": served,
            "in_flight_bound": in_flight, "oversold": max(0, c.reserved - on_hand)}

