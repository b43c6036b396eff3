"""HTTP benchmark: add-to-cart and price lookups through gunicorn, beside a trivial endpoint.

The server is the production one: `gunicorn -c python:app.gunicorn_conf wsgi:app` with APP_ENV=production,
API keys, a Prometheus multiprocess directory (as docker-compose.yml runs it), on the bench Redis and
database. One active product with one variant (10**9 units, so nothing is refused) and two pricing rules.
Each endpoint gets a warm-up run, then measured runs at 64 concurrent connections, the three endpoints
taking turns (`rounds` times in the full run, so a change in the machine's speed falls on all three;
the round with the median throughput stands for each, every round is in the JSON):

- GET  /healthz                                   the trivial JSON endpoint (the yardstick)
- GET  /api/pricing/<product>/price/?variant_id=  a price lookup (public)
- POST /api/cart/add/                             add-to-cart, a distinct user id per request (storefront key)
- POST /api/cart/add/, HOLD_DURABILITY=replicated  the same on a second server of the first spec started with
                                                  HOLD_DURABILITY=replicated (HOLD_REPLICA_TIMEOUT_MS as set,
                                                  default 100), its rounds right after the plain add's, with a
                                                  replica (bench.stores.Replica) attached by REPLICAOF and in
                                                  sync for them only; a 503 (no replica confirmed in time) is
                                                  counted apart and is 0 in a healthy run

The load generator is wrk when it is on the PATH (a Lua script makes the user ids and counts statuses),
else a small multiprocess Python client; the result says which. Only 2xx responses count as served;
400 insufficient_stock and anything else are counted apart (503 also on its own).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.embedded import free_port
from app.webserver import DEFAULT_SERVER, server_argv, web_config
from app.settings import ROOT, load_settings
from app.engine.holdrec import unpack_hold
from app import keys
from bench.clients import cpu_snapshot, cpu_use, lower_priority, run_clients
from bench.stores import Replica, Stores, seed_rules, seed_variants, sessions_for

CONNECTIONS = 64
WRK_THREADS = 2
STOCK = 10**9
STOREFRONT_KEY = "bench-storefront-key-0001"
# add-to-cart on a second server of the first spec, with HOLD_DURABILITY=replicated and a replica
REPLICATED = "add_replicated"
ADMIN_KEY = "bench-admin-key-0001"

# Every wrk script's start: each thread numbered (`tid`, for distinct user ids) and kept for `done`.
WRK_THREAD_SETUP = r"""
local threads = {}
local next_tid = 1

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end
"""

WRK_SCRIPT = r"""
-- Counts responses by status; for add-to-cart makes a distinct user id per request.
-- args: mode (get|add) variant_id user_prefix bearer_token
""" + WRK_THREAD_SETUP + r"""
function init(args)
  mode, vid, prefix, token = args[1], args[2], args[3], args[4]
  n, s2xx, s400, s503, sother = 0, 0, 0, 0, 0
  if mode == "add" then
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
  end
  if token ~= nil and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
end

function request()
  if mode ~= "add" then return wrk.format() end
  n = n + 1
  local user = prefix .. "-" .. tid .. "-" .. n
  local body = '{"user_id":"' .. user .. '","variant_id":' .. vid .. ',"quantity":1}'
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then s2xx = s2xx + 1
  elseif status == 400 then s400 = s400 + 1
  else
    sother = sother + 1
    if status == 503 then s503 = s503 + 1 end
  end
end

function done(summary, latency, requests)
  local ok, bad, other, unavailable = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    ok = ok + t:get("s2xx"); bad = bad + t:get("s400"); other = other + t:get("sother")
    unavailable = unavailable + t:get("s503")
  end
  local e = summary.errors
  io.write(string.format('BENCH_RESULT {"requests":%d,"duration_us":%d,"ok":%d,"s400":%d,"other":%d,"s503":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, ok, bad, other, unavailable, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


class Server:
    """The web server app/webserver.py starts for `env` (WEB_SERVER, WEB_CONCURRENCY, WEB_THREADS), on a
    free port; stopped by pid."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path, self.process = env, log_path, None
        self.port = int(env["PORT"])
        self.name = env.get("WEB_SERVER", "")

    def start(self, timeout: float = 60) -> "Server":
        self.log = open(self.log_path, "wb")
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(
            server_argv(sys.executable, env),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_raise_nofile,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                status, _ = request("127.0.0.1", self.port, "GET", "/readyz")
                if status == 200 and self._workers_ready():
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready within {timeout:.0f}s; see {self.log_path}")

    def _workers_ready(self) -> bool:
        """Every worker answered once (one /readyz proves one worker only)."""
        want = int(self.env.get("WEB_CONCURRENCY") or 1)
        return len(self.pids()) - 1 >= want

    def pids(self) -> list[int]:
        """The master and its workers."""
        if self.process is None:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [self.process.pid] + [int(p) for p in children.read_text().split()]
        except OSError:
            return [self.process.pid]

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "log", None):
            self.log.close()


def _raise_nofile() -> None:
    """Children (servers, wrk) may hold thousands of sockets: the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _wrk_preexec() -> None:
    _raise_nofile()
    lower_priority()


def request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 5,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _with_wrk(cpu: dict, rusage_before) -> dict:
    """Move wrk's CPU (a child we reaped during the window) from "other" to "ours"."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    secs = cpu.get("seconds") or 1
    wrk_cores = ((after.ru_utime - rusage_before.ru_utime) + (after.ru_stime - rusage_before.ru_stime)) / secs
    cpu = dict(cpu)
    cpu["our_cores"] = round(cpu["our_cores"] + wrk_cores, 2)
    cpu["other_cores"] = round(max(0.0, cpu["other_cores"] - wrk_cores), 2)
    return cpu


# --- load generators ------------------------------------------------------------------------------


def run_wrk(wrk: str, script: Path, url: str, seconds: float, args: list[str],
            connections: int = CONNECTIONS, timeout_s: int = 10) -> dict:
    cmd = [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        f"{timeout_s}s",
        "-s",
        str(script),
        url,
        "--",
        *args,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=_wrk_preexec
    )
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.MULTILINE)
    if not match:
        raise RuntimeError(
            f"wrk printed no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}"
        )
    raw = json.loads(match.group(1))
    secs = raw["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "requests": raw["requests"],
        "seconds": round(secs, 3),
        "ok": raw["ok"],
        "insufficient_or_400": raw["s400"],
        "other_status": raw["other"],
        "status_503": raw["s503"],  # among other_status
        "socket_errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        "per_second": round(raw["ok"] / secs, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "wrk_output": out.stdout.strip(),
    }


class Refused(Exception):
    """A 400 (insufficient stock): counted apart."""


def python_setup(port: int, method: str, path: str, body_for, headers: dict):
    def setup(index: int):
        seq = itertools.count()
        conn = [http.client.HTTPConnection("127.0.0.1", port, timeout=10)]

        def op() -> bool:
            body = body_for(index, next(seq)) if body_for else None
            try:
                conn[0].request(method, path, body=body, headers=headers)
                response = conn[0].getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn[0].close()
                conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                raise
            if response.will_close:  # gunicorn's sync workers close after each response
                conn[0].close()
                conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if 200 <= response.status < 300:
                return True
            if response.status == 400:
                return False
            raise RuntimeError(f"HTTP {response.status}")

        return op, lambda: conn[0].close()

    return setup


def run_python(port: int, seconds: float, method: str, path: str, body_for, headers: dict) -> dict:
    result = run_clients(python_setup(port, method, path, body_for, headers), CONNECTIONS, seconds, warmup=0)
    s = result.summary()
    return {
        "tool": "python",
        "requests": result.ok + result.refused + result.errors,
        "seconds": s["seconds"],
        "ok": result.ok,
        "insufficient_or_400": result.refused,
        "other_status": result.errors,
        "status_503": None,  # the Python client does not tell the statuses apart
        "socket_errors": 0,
        "per_second": s["per_second"],
        "p50_ms": s["p50_ms"],
        "p90_ms": round(result.pct_ms(90), 3),
        "p99_ms": s["p99_ms"],
        "max_ms": s["max_ms"],
    }


# --- the benchmark --------------------------------------------------------------------------------


# The servers compared (app/webserver.py), each as name:WORKERSxTHREADS; BENCH_WEB_SERVERS overrides.
# The first is the one the price lookup and the top-level figures are for: WEB_SERVER's when set.
SERVERS = ("gunicorn-gthread:2x4", "granian:2x2", "gunicorn-sync:4x1")


def server_specs(env: dict | None = None) -> list[tuple[str, int, int]]:
    env = os.environ if env is None else env
    specs = []
    for item in (env.get("BENCH_WEB_SERVERS") or ",".join(SERVERS)).split(","):
        name, _, shape = item.strip().partition(":")
        workers, _, threads = (shape or "").partition("x")
        cfg = web_config({"WEB_SERVER": name, "WEB_CONCURRENCY": workers, "WEB_THREADS": threads})
        specs.append((cfg.server, cfg.workers, cfg.threads))
    first = (env.get("WEB_SERVER") or DEFAULT_SERVER).strip().lower()
    specs.sort(key=lambda spec: spec[0] != first)  # stable: the default's spec first
    return specs


def label_of(spec: tuple[str, int, int]) -> str:
    server, workers, threads = spec
    return f"{server} {workers}x{threads}" if threads > 1 else f"{server} {workers}"


def start_servers(stores: Stores, specs, extra_env: dict | None = None, tag: str = "") -> dict[str, Server]:
    """One server per spec, each on its own port, all on the same stores (started one by one);
    `tag` names the files of a second set started beside the first (its logs, metrics dirs)."""
    servers: dict[str, Server] = {}
    try:
        for n, spec in enumerate(specs):
            server, workers, threads = spec
            prom_dir = stores.workdir / f"prometheus{tag}-{n}"
            shutil.rmtree(prom_dir, ignore_errors=True)
            env = stores.env(
                PORT=str(free_port()), WEB_SERVER=server, WEB_CONCURRENCY=str(workers),
                WEB_THREADS=str(threads), PROMETHEUS_MULTIPROC_DIR=str(prom_dir), **(extra_env or {}),
            )
            if stores.postgres:
                env.update(APP_ENV="production", API_KEYS=f"admin:{ADMIN_KEY},storefront:{STOREFRONT_KEY}")
            servers[label_of(spec)] = Server(env, stores.workdir / f"web{tag}-{n}.log").start()
    except BaseException:
        for started in servers.values():
            started.stop()
        raise
    return servers


def _server_cpu_us(before: tuple, after: tuple, answered: int) -> float | None:
    """The web server's processes' CPU per answered request, in microseconds: steadier than the
    rate on a shared machine, since another process's load slows the rate but adds nothing here."""
    ticks = after[3] - before[3]
    return round(ticks / os.sysconf("SC_CLK_TCK") * 1e6 / answered, 1) if answered else None


def _measure(stores, server: Server, wrk, script, auth, vid, method, path, secs, prefix, also=()) -> dict:
    ours = server.pids() + [stores.redis_server.process.pid, *also]
    before, rusage_before = cpu_snapshot(ours), resource.getrusage(resource.RUSAGE_CHILDREN)
    web_before = cpu_snapshot(server.pids())
    if wrk:
        args = ["add" if method == "POST" else "get", str(vid), prefix, auth]
        r = run_wrk(wrk, script, f"http://127.0.0.1:{server.port}{path}", secs, args)
        r["cpu"] = _with_wrk(cpu_use(before, cpu_snapshot(ours)), rusage_before)
        r["server_cpu_us"] = _server_cpu_us(web_before, cpu_snapshot(server.pids()), r["requests"])
        return r
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"

    def body_for(i, n):
        return json.dumps({"user_id": f"{prefix}-{i}-{n}", "variant_id": vid, "quantity": 1}).encode()

    return run_python(server.port, secs, method, path, body_for if method == "POST" else None, headers)


def _median(runs: list[dict]) -> dict:
    r = dict(sorted(runs, key=lambda x: x["per_second"])[len(runs) // 2])
    r["per_second_by_round"] = [x["per_second"] for x in runs]
    r["p99_ms_by_round"] = [x["p99_ms"] for x in runs]
    statuses = [x.get("status_503") for x in runs]
    r["status_503_by_round"] = statuses
    r["status_503_total"] = None if None in statuses else sum(statuses)  # 503: never in a healthy run
    cpu = sorted(x["server_cpu_us"] for x in runs if x.get("server_cpu_us") is not None)
    r["server_cpu_us"] = cpu[len(cpu) // 2] if cpu else None
    return r


def run(stores: Stores, *, seconds: float, warmup_seconds: float, rounds: int = 1, log=print) -> dict:
    """Every server of server_specs() on the same app, stores and load: rounds interleaved across
    servers and endpoints (A, B, C, A, B, C, ...); the median round stands for each. Beside them the
    first server's spec once more with HOLD_DURABILITY=replicated: its add-to-cart rounds run right
    after the plain add's, with a replica attached to the bench's Redis for them only."""
    engine_db, sessions = sessions_for(stores.database_url)
    product_id, (vid,) = seed_variants(sessions, 1, on_hand=STOCK)
    seed_rules(sessions, product_id)
    engine_db.dispose()
    specs = server_specs()
    auth = STOREFRONT_KEY if stores.postgres else ""
    wrk = shutil.which("wrk")
    log(f"  http load generator: {'wrk' if wrk else 'python (wrk not on PATH)'}; {CONNECTIONS} connections; "
        f"servers {', '.join(label_of(s) for s in specs)}; {label_of(specs[0])} also with "
        f"HOLD_DURABILITY=replicated")
    script = stores.workdir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    endpoints = {
        "healthz": ("GET", "/healthz"),
        "price": ("GET", f"/api/pricing/{product_id}/price/?variant_id={vid}&quantity=1"),
        "add_to_cart": ("POST", "/api/cart/add/"),
        REPLICATED: ("POST", "/api/cart/add/"),  # the first server's spec, HOLD_DURABILITY=replicated
    }
    servers = start_servers(stores, specs)
    primary = label_of(specs[0])
    first = servers[primary]
    replica = replicated = None
    results: dict = {
        "tool": "wrk" if wrk else "python",
        "connections": CONNECTIONS,
        "server": primary,
        "workers": specs[0][1],
        "threads": specs[0][2],
        "seconds": seconds,
        "rounds": rounds,
        "app_env": first.env["APP_ENV"],
    }
    served_adds = add_runs = 0
    measured: dict[str, dict[str, list[dict]]] = {label: {} for label in servers}
    passes = [("warmup", warmup_seconds)] + [("measure", seconds / rounds)] * rounds
    try:
        replica = Replica(stores)
        replicated = start_servers(stores, specs[:1], {"HOLD_DURABILITY": "replicated"}, tag="-replicated")[primary]
        for run_no, (phase, secs) in enumerate(passes):
            for label, server in servers.items():
                for name, (method, path) in endpoints.items():
                    if name in ("price", REPLICATED) and label != primary:
                        continue
                    target, also = server, ()
                    prefix = f"{phase}{run_no}s{list(servers).index(label)}"  # a distinct user id per add
                    if name == REPLICATED:
                        prefix += "r"
                        target, also = replicated, (replica.pid,)
                        replica.attach()
                    try:
                        r = _measure(stores, target, wrk, script, auth, vid, method, path, secs,
                                     prefix, also)
                    finally:
                        if name == REPLICATED:
                            replica.detach()
                    if method == "POST":
                        served_adds += r["ok"]
                        add_runs += 1
                    if phase == "measure":
                        measured[label].setdefault(name, []).append(r)
        comparison = {}
        for label, by_name in measured.items():
            row = {name: _median(runs) for name, runs in by_name.items()}
            h = row["healthz"]["per_second"]
            row["add_vs_healthz"] = round(row["add_to_cart"]["per_second"] / h, 3) if h else None
            comparison[label] = row
            for name, r in row.items():
                if not isinstance(r, dict):
                    continue
                log(
                    f"  http {label:<24} {name:<12} {r['per_second']:>8,.0f}/s  p50 {r['p50_ms']:.1f} ms  "
                    f"p99 {r['p99_ms']:.1f} ms  (2xx {r['ok']}, 400 {r['insufficient_or_400']}, "
                    f"other {r['other_status']}, socket errors {r['socket_errors']})"
                    + (f", 503 in all rounds {r['status_503_total']}" if name == REPLICATED else "")
                    + (f", server CPU {r['server_cpu_us']:.0f} us/request" if r.get("server_cpu_us") else "")
                    + (f", other load {r['cpu']['other_cores']:.2f} cores" if "cpu" in r else "")
                    + (f"; by round {r['per_second_by_round']}/s, p99 {r['p99_ms_by_round']} ms"
                       if rounds > 1 else "")
                )
            log(f"  http {label:<24} add / healthz {row['add_vs_healthz']}")
    finally:
        for server in [*servers.values(), *([replicated] if replicated else [])]:
            server.stop()
        if replica is not None:
            replica.stop()
    results.update({name: comparison[primary][name] for name in endpoints})
    results["servers"] = {label: {k: v for k, v in row.items() if k != REPLICATED}
                          for label, row in comparison.items()}
    h = results["healthz"]["per_second"]
    results["add_vs_healthz"] = round(results["add_to_cart"]["per_second"] / h, 3) if h else None
    results["price_vs_healthz"] = round(results["price"]["per_second"] / h, 3) if h else None
    results[REPLICATED]["hold_replica_timeout_ms"] = load_settings(
        {**os.environ, **replicated.env}).hold_replica_timeout_ms
    results["replicated_vs_local"] = _vs_local(results["add_to_cart"], results[REPLICATED])
    log(f"  http {primary:<24} replicated / local add {results['replicated_vs_local']}")
    # the replicated server's adds count too: it reserves on the same variant
    results["invariant"] = _check(stores, vid, served_adds, add_runs * CONNECTIONS)
    return results


def _vs_local(local: dict, replicated: dict) -> dict:
    """The replicated add against the plain one, from the median rounds of each."""
    def ratio(key):
        return round(replicated[key] / local[key], 2) if local.get(key) else None

    return {"per_second": ratio("per_second"), "p50_ms": ratio("p50_ms"), "p99_ms": ratio("p99_ms")}


def _check(stores: Stores, vid: int, served: int, in_flight: int) -> dict:
    container = stores.container()
    try:
        c = container.holds.counters([vid])[vid]
        raw = container.redis.hgetall(keys.holds(vid))
        held = sum(h.quantity for h in map(unpack_hold, raw.values()) if h is not None)
        carts = sum(1 for _ in container.redis.scan_iter(match=keys.cart("*"), count=10000))
    finally:
        container.close()
    problems = []
    if c.available + c.reserved != STOCK:
        problems.append(f"available {c.available} + reserved {c.reserved} != on_hand {STOCK}")
    if c.reserved != held:
        problems.append(f"reserved {c.reserved} != held {held}")
    if carts != held:
        problems.append(f"{carts} carts != {held} held units (one single-unit line per customer)")
    # wrk stops with up to one request per connection in flight: served by the server, never counted
    if not served <= c.reserved <= served + in_flight:
        problems.append(
            f"reserved {c.reserved} is not between the 2xx add-to-cart responses {served} "
            f"and that plus the requests in flight when the load stopped ({in_flight})"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "reserved": c.reserved,
        "held": held,
        "served_adds": served,
        "in_flight_bound": in_flight,
        "carts": carts,
        "oversold": max(0, c.reserved - STOCK),
    }
