"""Cluster benchmark: the engine on one redis-server and on a 3-primary Redis Cluster, side by side.

The same workload as the engine benchmark's *engine* approach (bench/engine.py): `Holds.reserve`
through a `Container` per client process, 1 unit for a new customer per call, the hot variant
(10**9 units) and 1,000 variants picked at random (10**6 each). Two targets:

- single: the harness's own redis-server (REDIS_URL, a plain redis-py client);
- cluster: an `app.embedded.EmbeddedCluster` of 3 primaries on loopback ports started here, through
  REDIS_URL=<one node>, REDIS_CLUSTER=1 (the engine's lane per primary, app/engine/cluster_lane.py:
  each call goes to the primary that owns its key's hash slot, on the slot map of redis-py's
  RedisCluster).

Both use the same bench database (the counters are rebuilt from its on_hand). Within a case the two
take turns `rounds` times (seconds / rounds each) and the round with the median throughput is
reported, as the engine benchmark does. Before each case both are flushed and their counters rebuilt;
after it the invariant is checked on both over all its rounds (every acknowledged reservation held
exactly once, available + reserved == on_hand, nothing below zero) and the units oversold counted.

On one machine the three primaries share its cores with the clients, so the cluster cannot be
faster here: the ratio shows what the cluster client costs (routing, per-primary connections) and
the checks that correctness holds. On real hardware each primary brings its own core, but every
operation on one variant still runs on the one primary that owns its slot.
"""

from __future__ import annotations

import time

import redis as redis_lib

from app.composition import Container
from app.embedded import EmbeddedCluster
from app.settings import load_settings
from bench.clients import RunResult, run_clients
from bench.engine import (HOT_STOCK, SPREAD_STOCK, SPREAD_VARIANTS, WARMUP_OPS, check_engine, engine_setup,
                          log_case, summarize_rounds)
from bench.stores import Stores, seed_variants, sessions_for

PRIMARIES = 3
TARGETS = ("single", "cluster")
PROCESSES = (8, 32, 64)
CPU_CALLS = 3000  # per repetition of the one-process CPU measurement
CPU_REPS = 5


def _flush(ports: list[int]) -> None:
    for port in ports:
        r = redis_lib.Redis(host="127.0.0.1", port=port)
        try:
            r.flushall()
        finally:
            r.close()


def _evalsha_calls(ports: list[int]) -> list[int]:
    """EVALSHA calls served so far by each primary (INFO commandstats)."""
    out = []
    for port in ports:
        r = redis_lib.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            stats = r.info("commandstats")
        finally:
            r.close()
        out.append(int(stats.get("cmdstat_evalsha", {}).get("calls", 0)))
    return out


def _reset(container: Container, ports: list[int], variant_ids: list[int]) -> int:
    """Empty the server(s), rebuild the counters from the database, load the scripts with one
    reservation from this process (so the forked clients find them cached); returns that 1 unit."""
    _flush(ports)
    container.holds.counters(variant_ids)
    container.runner.load_all()
    container.holds.reserve(variant_ids[0], "parent-warmup", 1)
    return 1


def _server_cpu(ports: list[int]) -> float:
    """CPU seconds the server(s) used so far (INFO cpu: getrusage, microsecond resolution)."""
    total = 0.0
    for port in ports:
        r = redis_lib.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            info = r.info("cpu")
        finally:
            r.close()
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def _cpu_per_call(container: Container, ports: list[int], variant_id: int, calls: int, tag: str) -> dict:
    """One process, no contention: CPU per reserve in this client and in the server(s), over `calls`.
    What the cluster client costs per call, apart from anything the scheduler does with 64 processes."""
    s0 = _server_cpu(ports)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(calls):
        container.holds.reserve(variant_id, f"cpu{tag}-{i}", 1)
    wall, client = time.perf_counter() - t0, time.process_time() - c0
    server = _server_cpu(ports) - s0
    return {
        "client_us": round(client / calls * 1e6, 1),
        "server_us": round(server / calls * 1e6, 1),
        "wall_us": round(wall / calls * 1e6, 1),
    }


def _touched(container: Container, variant_ids: list[int]) -> int:
    return sum(1 for c in container.holds.counters(variant_ids).values() if c.reserved > 0)


def run(stores: Stores, *, seconds: float, rounds: int = 1, processes=PROCESSES, log=print) -> dict:
    """Start the cluster beside the harness's redis-server, run every (processes, workload) case on
    both, stop the cluster (its nodes by pid) whatever happens."""
    cluster = EmbeddedCluster(stores.workdir / "cluster", size=PRIMARIES)
    try:
        cluster.start()
        return _run(stores, cluster, seconds=seconds, rounds=rounds, processes=processes, log=log)
    finally:
        cluster.stop()


def _run(stores: Stores, cluster: EmbeddedCluster, *, seconds: float, rounds: int, processes, log) -> dict:
    engine_db, sessions = sessions_for(stores.database_url)
    envs = {
        "single": stores.env(),
        "cluster": stores.env(REDIS_URL=cluster.url, REDIS_CLUSTER="1"),
    }
    ports = {"single": [stores.redis_server.port], "cluster": list(cluster.ports)}
    containers = {t: Container(load_settings(envs[t])) for t in TARGETS}
    redis_pids = (stores.redis_server.process.pid, *(node.process.pid for node in cluster.nodes))
    log(
        f"  cluster: {PRIMARIES} primaries on ports {', '.join(map(str, cluster.ports))}, "
        f"single node on {stores.redis_server.port}"
    )
    try:
        _, hot = seed_variants(sessions, 1, on_hand=HOT_STOCK)
        _, spread = seed_variants(sessions, SPREAD_VARIANTS, on_hand=SPREAD_STOCK)
        workloads = {"hot": (hot, HOT_STOCK), "1000": (spread, SPREAD_STOCK)}
        # Alternating repetitions, so a burst of foreign load (which slows CPU time too, on shared
        # cores) falls on both; the best repetition of each stands.
        samples: dict[str, list[dict]] = {t: [] for t in TARGETS}
        for t in TARGETS:
            _reset(containers[t], ports[t], hot)
        for rep in range(CPU_REPS):
            for t in TARGETS:
                samples[t].append(_cpu_per_call(containers[t], ports[t], hot[0], CPU_CALLS, str(rep)))
        cpu = {}
        for t in TARGETS:
            best = min(samples[t], key=lambda x: x["client_us"] + x["server_us"])
            cpu[t] = {**best, "calls": CPU_CALLS, "reps": CPU_REPS, "all": samples[t]}
            log(
                f"  cluster  hot x1   {t:<8} CPU per reserve: client {cpu[t]['client_us']:.0f} us, "
                f"redis-server {cpu[t]['server_us']:.0f} us, wall {cpu[t]['wall_us']:.0f} us"
            )
        # CPU per reserve of one process, client and server(s) together: single / cluster, so 1.0
        # means the cluster costs no more CPU per reserve than the single node
        single_us = cpu["single"]["client_us"] + cpu["single"]["server_us"]
        cluster_us = cpu["cluster"]["client_us"] + cpu["cluster"]["server_us"]
        cpu_ratio = round(single_us / cluster_us, 3) if cluster_us else None
        log(f"  cluster  hot x1   cluster/single {cpu_ratio:.2f} (CPU per reserve, client + server, one process; "
            f"client alone {cpu['single']['client_us'] / max(1e-9, cpu['cluster']['client_us']):.2f})")
        rows = []
        for n in processes:
            for workload, (vids, stock) in workloads.items():
                row: dict = {"workload": workload, "processes": n, "rounds": rounds}
                parent = {t: _reset(containers[t], ports[t], vids) for t in TARGETS}
                setups = {t: engine_setup(envs[t], vids) for t in TARGETS}
                runs: dict[str, list[RunResult]] = {t: [] for t in TARGETS}
                by_primary = [0] * PRIMARIES
                for _ in range(rounds):
                    for t in TARGETS:
                        before = _evalsha_calls(ports["cluster"]) if t == "cluster" else None
                        result = run_clients(
                            setups[t], n, seconds / rounds, warmup=WARMUP_OPS, watch_pids=redis_pids
                        )
                        runs[t].append(result)
                        if before is not None:
                            after = _evalsha_calls(ports["cluster"])
                            by_primary = [s + a - b for s, a, b in zip(by_primary, after, before)]
                for t in TARGETS:
                    merged = runs[t][0]
                    for more in runs[t][1:]:
                        merged = merged.merge(more)
                    acknowledged = merged.ok + merged.warmup_ok + parent[t]
                    check = check_engine(containers[t], vids, {v: stock for v in vids}, acknowledged)
                    check["variants_touched"] = _touched(containers[t], vids)
                    summary = summarize_rounds(runs[t], merged, check)
                    row[t] = summary
                    log_case(log, "cluster", workload, n, t, summary, merged, check)
                total = sum(by_primary) or 1
                row["evalsha_by_primary"] = by_primary
                row["evalsha_share_by_primary"] = [round(c / total, 3) for c in by_primary]
                s, c = row["single"]["per_second"], row["cluster"]["per_second"]
                row["cluster_vs_single"] = round(c / s, 3) if s else None
                log(
                    f"  cluster {workload:>4} x{n:<3} cluster/single {row['cluster_vs_single']:.2f}, "
                    f"EVALSHA by primary {'/'.join(f'{x:.0%}' for x in row['evalsha_share_by_primary'])}"
                )
                rows.append(row)
        return {
            "seconds": seconds,
            "rounds": rounds,
            "primaries": PRIMARIES,
            "rows": rows,
            "cpu_per_reserve": cpu,
            "cpu_cluster_vs_single": cpu_ratio,
            "hot_stock": HOT_STOCK,
            "spread_variants": SPREAD_VARIANTS,
            "spread_stock": SPREAD_STOCK,
            "oversold": sum(row["cluster"]["invariant"]["oversold"] for row in rows),
            "note": (
                f"On one machine the {PRIMARIES} primaries share its cores with the clients and the single "
                "redis-server, so the cluster cannot be faster here: the ratio is the cost of the cluster "
                "client (routing each command to its slot's primary, a connection per primary), and "
                "the checks show that correctness holds. On real hardware each primary adds its own core; "
                "a hot variant still runs on the one primary that owns its slot."
            ),
        }
    finally:
        for container in containers.values():
            container.close()
        engine_db.dispose()
        stores.flush_redis()
